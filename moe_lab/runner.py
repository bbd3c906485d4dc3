"""One job runner for every launcher: data -> tokenizer -> model -> MoETrainer -> outputs.

    summary = run_job(load_job("jobs/default.yaml"))             # in this process
    result = run_task(task, make_runtime)                        # what every launcher calls

A job (a validated :class:`~moe_lab.jobs.JobSpec`) becomes a :class:`TrainTask` (model
config, the training section as one TrainingConfig, prepared data); :func:`run_task` builds
the model, lets the launcher's runtime shard it, builds the trainer and fits. The local path
(:func:`run_job`), the Ray Train worker function (:mod:`moe_lab.orchestration.train`),
``torchrun`` (:mod:`moe_lab.launch`) and Tune trials all call it. No Ray here.

Outputs in the job's output directory:
- ``model/`` (final checkpoint) and ``checkpoints/step-N/``;
- ``metrics.jsonl`` and ``tensorboard/``;
- ``summary.json``: final losses, the eval set's unigram-entropy baseline, throughput, paths;
- ``loss_curve.png``; ``job.yaml`` (the resolved job).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .config import TrainingConfig
from .jobs import JobSpec, record_job
from .checkpoint import write_json_atomic
from .training.results import TrainingResult
from .training.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids (+ domain)
    eval: Any
    tokenizer: Any
    stats: Dict[str, Any]


def build_tokenizer(spec: JobSpec, sample_texts: Any = None) -> Any:
    from .data import load_tokenizer, train_bpe_tokenizer

    name = spec.data.tokenizer
    if name == "bpe":
        if sample_texts is None:
            raise ValueError("a BPE tokenizer needs texts to train on")
        return train_bpe_tokenizer(sample_texts, vocab_size=spec.data.bpe_vocab_size)
    return load_tokenizer(name)


def load_raw_text(spec: JobSpec) -> Tuple[Any, Any]:
    """The job's raw text as (train, eval) ``datasets.Dataset`` with a text column."""
    from .data import build_corpus, load_text_dataset, train_eval_split

    d = spec.data
    if d.dataset == "builtin":
        corpus = build_corpus(size_bytes=d.corpus_size_bytes, seed=d.corpus_seed)
        return train_eval_split(corpus, eval_fraction=d.eval_fraction, seed=d.corpus_seed)
    train = load_text_dataset(d.dataset, text_column=d.text_column)
    if d.eval_dataset:
        return train, load_text_dataset(d.eval_dataset, text_column=d.text_column)
    return train_eval_split(train, eval_fraction=d.eval_fraction, seed=d.corpus_seed)


def prepare_data(spec: JobSpec, tokenizer: Any = None) -> PreparedData:
    """Tokenize and pack the job's data into ``max_length`` blocks."""
    from .data import prepare_moe_dataset

    d = spec.data
    raw_train, raw_eval = load_raw_text(spec)
    if tokenizer is None:
        tokenizer = build_tokenizer(spec, raw_train[d.text_column] if d.tokenizer == "bpe" else None)
    label = d.label_column if d.label_column and d.label_column in raw_train.column_names else None
    train, tstats = prepare_moe_dataset(
        raw_train, tokenizer, max_length=d.max_length, num_proc=d.num_proc, text_column=d.text_column,
        label_column=label, return_stats=True,
    )
    evald, estats = prepare_moe_dataset(
        raw_eval, tokenizer, max_length=d.max_length, num_proc=d.num_proc, text_column=d.text_column,
        label_column=label, return_stats=True,
    )
    stats = {"train": vars(tstats), "eval": vars(estats)}
    return PreparedData(train, evald, tokenizer, stats)


def unigram_baseline(eval_: Any, vocab_size: int) -> float:
    """Entropy (nats/token) of the eval set's own unigram distribution.

    The best loss any model that ignores context can reach on this eval set (a unigram model
    fitted on the training data can only do worse), so a trained LM must beat it clearly.
    """
    counts = np.zeros(vocab_size, dtype=np.float64)
    for batch in eval_.iter(batch_size=1024):
        flat = np.concatenate([np.asarray(x[1:], dtype=np.int64) for x in batch["input_ids"]])  # predicted positions
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def build_model(spec: JobSpec, vocab_size: int) -> torch.nn.Module:
    from .model import MoEModel

    return MoEModel.from_config(spec.model.to_config(vocab_size))


@dataclass
class TrainTask:
    """Everything one training process needs, whatever launched it (picklable).

    The model is rebuilt from ``model_config`` (+ ``init_state``, full unsharded weights) in
    the process that trains it, then sharded by its runtime. ``training`` holds every training
    setting; there is no other channel for them.
    """

    model_config: Dict[str, Any]
    training: TrainingConfig
    train_data: Any  #: token rows, a BatchStream, or None (the launcher supplies a stream)
    eval_data: Any = None
    tokenizer: Any = None
    init_state: Optional[Dict[str, torch.Tensor]] = None  #: None: a fresh init seeded by training.seed
    resume_from: Optional[str] = None  #: a checkpoint directory or "latest"
    expert_parallel_size: int = 1
    #: the layout (a :class:`~moe_lab.parallel.ParallelDims`); None: data + ``expert_parallel_size``
    dims: Any = None
    max_length: int = 512  #: block length for raw text
    callbacks: List[Any] = field(default_factory=list)


RuntimeFactory = Callable[[torch.nn.Module, TrainTask], Runtime]


def build_task_model(task: TrainTask) -> torch.nn.Module:
    """The task's model with its initial weights; resume weights load later (in the trainer),
    or here when the runtime will shard the parameters and the checkpoint is a full one (it
    holds full tensors). A sharded (DCP) checkpoint loads in the trainer, after sharding, at
    whatever layout the runtime gives (:meth:`moe_lab.checkpoint.ShardedCheckpoint.load_sharded`)."""
    from .checkpoint import Checkpoint, is_sharded_checkpoint, latest_checkpoint
    from .model import MoEModel

    torch.manual_seed(task.training.seed)
    model = MoEModel.from_config(task.model_config)
    if task.init_state is not None:
        model.load_state_dict(task.init_state)
    resume = task.resume_from
    if resume == "latest":
        resume = latest_checkpoint(Path(task.training.output_dir).expanduser().resolve())
    sharded = task.expert_parallel_size > 1 or (task.dims is not None and (task.dims.sharded or task.dims.ep > 1))
    if resume is not None and sharded and not is_sharded_checkpoint(resume):
        # full weights, before the runtime shards them (FSDP, TP, EP); the optimizer state is
        # cut to this rank's pieces when the trainer resumes (moe_lab.checkpoint.load_optimizer_state)
        Checkpoint.open(resume).load_into(model)
    return model


def run_task(
    task: TrainTask,
    make_runtime: Optional[RuntimeFactory] = None,
    make_objects: Optional[Callable[[torch.nn.Module, Runtime], Dict[str, Any]]] = None,
    **objects: Any,
) -> TrainingResult:
    """Train ``task`` in this process: build the model, hand it to ``make_runtime`` (which may
    shard it; default: one process), build the trainer from ``task.training`` and fit.

    The one place where a trainer is assembled, for the in-process path, Ray Train workers,
    torchrun and Tune trials alike. ``objects`` (optimizer/scheduler specs, monitor, sinks) go
    to the trainer; ``make_objects(model, runtime)`` builds more of them once the model is
    sharded (an optimizer must see the parameters this rank holds).
    """
    from .training import MoETrainer

    model = build_task_model(task)
    runtime = make_runtime(model, task) if make_runtime is not None else Runtime()
    if make_objects is not None:
        objects.update(make_objects(model, runtime))
    trainer = MoETrainer.from_config(model, task.training, runtime=runtime, tokenizer=task.tokenizer,
                                     max_length=task.max_length, callbacks=list(task.callbacks), **objects)
    loss_sum_fn = getattr(runtime, "loss_sum_fn", None)
    if loss_sum_fn is not None:  # the layout computes the loss itself (TP: from vocabulary-sharded logits)
        trainer.settings = dataclasses.replace(trainer.settings, loss_sum_fn=loss_sum_fn, head_loss_fn=None)
    return trainer.fit(task.train_data, task.eval_data, resume_from=task.resume_from)


def job_task(spec: JobSpec, data: PreparedData, output_dir: Path, resume: bool = False, **overrides: Any) -> TrainTask:
    """The TrainTask of a job: its model config, training section and prepared data."""
    return TrainTask(
        model_config=spec.model.to_config(len(data.tokenizer)).to_dict(),
        training=spec.training.replace(output_dir=str(output_dir)),
        train_data=data.train,
        eval_data=data.eval,
        tokenizer=data.tokenizer,
        resume_from="latest" if resume else None,
        expert_parallel_size=spec.scaling.expert_parallel,
        dims=spec.scaling.parallel_dims(),
        max_length=spec.data.max_length,
        **overrides,
    )


def run_job(spec: JobSpec, runtime: Optional[Runtime] = None, output_dir: Optional[str] = None,
            resume: bool = False) -> Dict[str, Any]:
    """Train the job in this process (or on the ranks of ``runtime``) and write its outputs.
    Returns the summary dict (see :func:`finalize`)."""
    out = Path(output_dir or spec.training.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    record_job(spec, out)
    t0 = time.perf_counter()
    data = prepare_data(spec)
    task = job_task(spec, data, out, resume)
    result = run_task(task, (lambda model, task: runtime) if runtime is not None else None)
    return finalize(spec, out, result.to_dict(), data, None, time.perf_counter() - t0,
                    parameters=parameter_counts(spec, len(data.tokenizer)))


def run_job_local(spec: JobSpec, output_dir: Optional[str] = None, resume: bool = False) -> Dict[str, Any]:
    """:func:`run_job` in this one process."""
    return run_job(spec, None, output_dir, resume)


def parameter_counts(spec: JobSpec, vocab_size: int) -> Dict[str, int]:
    """Total and active parameters of the job's model, counted on the meta device (no memory)."""
    from .model import MoEModel

    with torch.device("meta"):
        model = MoEModel.from_config(spec.model.to_config(vocab_size))
    return {"total": model.num_parameters(), "active": model.num_parameters(active_only=True)}


def finalize(
    spec: JobSpec,
    out: Path,
    result: Dict[str, Any],
    data: PreparedData,
    model: Optional[torch.nn.Module],
    elapsed: float,
    extra: Optional[Dict[str, Any]] = None,
    parameters: Optional[Dict[str, int]] = None,
) -> Dict[str, Any]:
    """Write ``summary.json`` and ``loss_curve.png``; return the summary."""
    from .analytics.plots import plot_training_curves

    vocab = len(data.tokenizer)
    baseline = unigram_baseline(data.eval, vocab)
    eval_loss = result.get("eval_loss")
    summary: Dict[str, Any] = {
        "job": spec.name,
        "global_step": result.get("global_step"),
        #: steps this invocation ran (global_step minus the step it resumed from)
        "steps_run": result.get("steps_run", result.get("global_step")),
        "train_loss": result.get("train_loss"),
        "eval_loss": eval_loss,
        "eval_perplexity": result.get("eval_perplexity"),
        "unigram_baseline_loss": baseline,
        "beats_baseline_by": (baseline - eval_loss) if eval_loss is not None else None,
        "tokens_per_second": result.get("tokens_per_second"),
        "total_tokens": result.get("total_tokens"),
        "elapsed_seconds": elapsed,
        "checkpoint": result.get("checkpoint_path"),
        "output_dir": str(out),
        "data": data.stats,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    if parameters is not None:
        summary["parameters"] = parameters
    elif model is not None and hasattr(model, "num_parameters"):
        summary["parameters"] = {"total": model.num_parameters(), "active": model.num_parameters(active_only=True)}
    summary.update(extra or {})
    history = result.get("history") or {}
    if history.get("loss"):  # the loss against the baseline, and routing health
        curves = {k: history[k] for k in LOSS_CURVE_SERIES if history.get(k)}
        plot_training_curves(curves, save_path=str(out / "loss_curve.png"), baseline=baseline)
    if spec.analyze and result.get("checkpoint_path"):
        summary["report"] = write_job_report(spec, out, Path(result["checkpoint_path"]), data)
    write_json_atomic(out / "summary.json", summary)
    return summary


#: the history series that ``loss_curve.png`` plots
LOSS_CURVE_SERIES = ("step", "loss", "eval_step", "eval_loss", "load_imbalance", "dropped_fraction")

#: eval blocks the end-of-training report routes (a few seconds on a laptop CPU)
REPORT_SAMPLES = 256


def write_job_report(spec: JobSpec, out: Path, checkpoint: Path, data: PreparedData) -> Optional[str]:
    """``report.html`` (router analytics) for the job's checkpoint, on its eval data.

    Needs a label column (the built-in corpus has ``domain``); without one, or if the
    analysis fails, training still counts as done and the reason is logged.
    """
    from .analytics import write_report
    from .errors import MoEError

    label = spec.data.label_column
    if not label or label not in getattr(data.eval, "column_names", []):
        logger.warning("no report: the eval data has no label column %r (set data.label_column)", label)
        return None
    try:
        path = write_report(checkpoint, out, data=data.eval, num_samples=REPORT_SAMPLES, label_column=label,
                            max_length=spec.data.max_length)
    except MoEError as exc:
        logger.warning("no report: %s", exc)
        return None
    return str(path)


def format_summary(summary: Dict[str, Any]) -> str:
    ev = summary.get("eval_loss")
    base = summary["unigram_baseline_loss"]
    step, ran = summary["global_step"], summary.get("steps_run", summary["global_step"])
    steps = f"{ran} steps" if ran == step else f"{ran} steps (resumed at step {step - ran}, now at {step})"
    lines = [
        f"job {summary['job']}: {steps} in {summary['elapsed_seconds']:.0f}s "
        f"({summary['tokens_per_second']:,.0f} tokens/s)",
        f"final train loss   {summary['train_loss']:.4f}",
    ]
    if ev is not None:
        lines.append(f"final eval loss    {ev:.4f}  (perplexity {math.exp(min(ev, 50)):.2f})")
    verdict = ""
    if ev is not None:
        verdict = f"  -> beaten by {base - ev:.4f} nats/token" if ev < base else "  -> NOT beaten (train longer)"
    lines.append(f"unigram baseline   {base:.4f}{verdict}")
    if summary.get("report"):
        lines.append(f"router report      {summary['report']}")
    lines.append(f"outputs in {summary['output_dir']}")
    return "\n".join(lines)
