"""A job, end to end, without Ray: data -> tokenizer -> model -> MoETrainer -> outputs.

These plain functions are what every launcher calls. ``moe-lab train`` runs them inside Ray
Train workers (:mod:`moe_lab.orchestration.train`); tests and notebooks can call
:func:`run_job_local` directly.

Outputs in the job's output directory:
- ``model/`` (final checkpoint) and ``checkpoints/step-N/``;
- ``metrics.jsonl`` and ``tensorboard/``;
- ``summary.json``: final losses, the eval set's unigram-entropy baseline, throughput, paths;
- ``loss_curve.png``; ``job.yaml`` (the resolved job).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from .jobs import JobSpec
from .training.checkpoint import write_json_atomic

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


def trainer_kwargs(spec: JobSpec) -> Dict[str, Any]:
    """MoETrainer constructor options from the job's training section."""
    t = spec.training
    return dict(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        device=t.device,
        logging_steps=t.logging_steps,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        min_lr_ratio=t.min_lr_ratio,
        save_total_limit=t.save_total_limit,
        progress_bar=t.progress_bar,
        eval_samples=t.eval_samples,
        fast_paths=t.fast_paths,
    )


def train_kwargs(spec: JobSpec, output_dir: str) -> Dict[str, Any]:
    """MoETrainer.train options from the job's training section."""
    t = spec.training
    kw: Dict[str, Any] = dict(
        num_epochs=t.num_epochs,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        eval_steps=t.eval_steps,
        save_steps=t.save_steps,
        output_dir=output_dir,
    )
    if t.max_steps is not None:
        kw["max_steps"] = t.max_steps
    return kw


def run_job_local(spec: JobSpec, output_dir: Optional[str] = None, resume: bool = False) -> Dict[str, Any]:
    """Train the job in this process and write its outputs. Returns the summary dict."""
    from .training import MoETrainer

    out = Path(output_dir or spec.training.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec.to_yaml(out / "job.yaml")
    t0 = time.perf_counter()
    data = prepare_data(spec)
    model = build_model(spec, len(data.tokenizer))
    trainer = MoETrainer(model, tokenizer=data.tokenizer, **trainer_kwargs(spec))
    result = trainer.train(data.train, data.eval, resume_from="latest" if resume else None, **train_kwargs(spec, str(out)))
    return finalize(spec, out, result.to_dict(), data, model, time.perf_counter() - t0)


def finalize(
    spec: JobSpec,
    out: Path,
    result: Dict[str, Any],
    data: PreparedData,
    model: Optional[torch.nn.Module],
    elapsed: float,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Write ``summary.json`` and ``loss_curve.png``; return the summary."""
    from .analytics.plots import plot_training_curves

    vocab = len(data.tokenizer)
    baseline = unigram_baseline(data.eval, vocab)
    eval_loss = result.get("eval_loss")
    summary: Dict[str, Any] = {
        "job": spec.name,
        "global_step": result.get("global_step"),
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
    if model is not None and hasattr(model, "num_parameters"):
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
    lines = [
        f"job {summary['job']}: {summary['global_step']} steps in {summary['elapsed_seconds']:.0f}s "
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
