"""Distributed training on Ray Train: each TorchTrainer worker hosts a shard of the experts.

    trainer = DistributedMoETrainer(model, world_size=2, expert_parallel_size=2, max_failures=1)
    result = trainer.train(train_ds, eval_ds, batch_size=16, max_steps=100, output_dir="outputs/ep2")

The driver ships the model's initial weights and the data to the workers. Each worker
(:func:`train_worker`) rebuilds the model, loads a checkpoint if Ray restarted it, shards
the experts over the expert-parallel group (``ExpertParallelism.parallelize_experts``) and
runs the *same* :class:`~moe_lab.training.MoETrainer` loop as a single process, with a
runtime whose collectives are torch.distributed (gloo on CPU, NCCL on GPU) and whose
checkpoint saves are reported to Ray Train. ``batch_size`` is the global batch: with the
same seed, step ``i`` sees the same global batch on 1 worker or N.

:func:`run_job_ray` is what ``moe-lab train`` runs: the job spec's ``scaling`` section
picks the workers, and ``data.streaming`` streams batches through Ray Data.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import ConfigError, DistributedError
from ..jobs import JobSpec
from ..parallel.expert_parallel import ExpertParallelism, validate_parallel_sizes
from ..parallel.runtime import DistributedRuntime
from ..training.checkpoint import latest_checkpoint, load_model_state
from ..training.runtime import Runtime
from ..training.trainer import RESULT_FILE, MoETrainer, TrainingResult
from .cluster import init_ray, local_cpu_count

logger = logging.getLogger(__name__)

#: train() options the driver forwards to the workers
_FORWARDED_TRAIN_KWARGS = ("max_steps", "logging_steps", "save_total_limit", "eval_samples", "max_length", "seed")


def _report(metrics: Dict[str, Any], checkpoint_dir: Optional[str], is_main: bool) -> None:
    import ray.train
    from ray.train import Checkpoint

    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    ckpt = Checkpoint.from_directory(checkpoint_dir) if (checkpoint_dir and is_main) else None
    ray.train.report(clean, checkpoint=ckpt)


class RayRuntime(Runtime):
    """One Ray Train worker: checkpoint saves are reported to Ray Train."""

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        _report(metrics, checkpoint_dir, True)


class RayDistributedRuntime(DistributedRuntime):
    """Several Ray Train workers: torch.distributed collectives + reports to Ray Train."""

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        _report(metrics, checkpoint_dir, self.is_main)


def train_worker(config: Dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer."""
    import ray
    import ray.train
    import ray.train.torch

    from ..model import MoEModel

    torch.set_num_threads(config["torch_threads"])
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs each report at INFO on the root logger
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    model = MoEModel.from_config(config["model_config"])
    model.load_state_dict(ray.get(config["init_state"]))
    resume_dir: Optional[str] = None
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None:  # Ray restarted us after a failure: continue from the last report
        resume_dir = tempfile.mkdtemp(prefix="moe-lab-resume-")
        ray_ckpt.to_directory(resume_dir)
    elif config.get("resume_from"):
        resume_dir = config["resume_from"]
    if resume_dir is not None:
        load_model_state(model, resume_dir)  # full weights, before sharding
    if world > 1:
        groups = ExpertParallelism.parallelize_experts(model, config["expert_parallel_size"])
        runtime: Runtime = RayDistributedRuntime(model, groups)
    else:
        runtime = RayRuntime()
    tokenizer = ray.get(config["tokenizer"]) if config.get("tokenizer") is not None else None
    trainer = MoETrainer(model, runtime=runtime, tokenizer=tokenizer, device=str(device), **config["trainer_kwargs"])
    if config.get("streaming"):
        from .data import RayDataStream

        per_rank = config["train_kwargs"]["batch_size"] // world
        train_data: Any = RayDataStream(ray.train.get_dataset_shard("train"), per_rank, seed=config["trainer_kwargs"]["seed"])
    else:
        train_data = ray.get(config["train_data"])
    eval_data = ray.get(config["eval_data"]) if config.get("eval_data") is not None else None
    trainer.train(train_data, eval_data, resume_from=resume_dir, **config["train_kwargs"])


def _cpus_per_worker(num_workers: int, local: bool, requested: Optional[float]) -> float:
    if requested:
        return requested
    if not local:
        return 1.0
    # leave at least one logical CPU for Ray Data next to the workers
    return max(0.25, min(1.0, (local_cpu_count() - 1) / num_workers))


class DistributedMoETrainer(MoETrainer):
    """:class:`MoETrainer` on Ray Train workers with expert parallelism.

    Args:
        model: the model to train (its weights are the initial weights on every worker).
        world_size: number of Ray Train workers (each is a data-parallel rank).
        expert_parallel_size: ranks the experts are sharded over (divides world_size and
            num_experts).
        model_parallel_size, pipeline_parallel_size: must be 1 (not supported yet).
        **kwargs: MoETrainer options plus ``use_gpu`` (False), ``resources_per_worker``
            (``{"CPU": n, ...}``), ``address`` (a Ray cluster; default: local),
            ``storage_path`` (Ray Train storage; default ``output_dir/ray``), ``max_failures``
            (0), ``name`` (run name), ``run_config_callbacks`` (Ray Train callbacks for the
            ``RunConfig``, e.g. a ``TuneReportCallback`` when a Tune trial drives the run).
    """

    def __init__(
        self,
        model: nn.Module,
        world_size: int,
        expert_parallel_size: int = 1,
        model_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        **kwargs: Any,
    ) -> None:
        validate_parallel_sizes(
            world_size, model.config.num_experts, expert_parallel_size, model_parallel_size, pipeline_parallel_size
        )
        if kwargs.get("optimizer") is not None or kwargs.get("scheduler") is not None:
            raise ConfigError(
                "DistributedMoETrainer builds the optimizer and schedule inside each worker; "
                "pass weight_decay / adam_* / min_lr_ratio options instead of objects"
            )
        kwargs.pop("optimizer", None)
        kwargs.pop("scheduler", None)
        self.world_size = world_size
        self.expert_parallel_size = expert_parallel_size
        self.use_gpu = bool(kwargs.pop("use_gpu", False))
        self.resources_per_worker = kwargs.pop("resources_per_worker", None)
        self.address = kwargs.pop("address", None)
        self.storage_path = kwargs.pop("storage_path", None)
        self.max_failures = int(kwargs.pop("max_failures", 0))
        self.run_name = kwargs.pop("name", None)
        self.run_config_callbacks = list(kwargs.pop("run_config_callbacks", None) or [])
        kwargs.setdefault("device", "cpu")  # the driver only holds the weights
        super().__init__(model, **kwargs)
        self.ray_result: Any = None

    def _worker_trainer_kwargs(self) -> Dict[str, Any]:
        kw = self.args.to_dict()
        for k in ("num_epochs", "batch_size", "learning_rate", "warmup_steps", "eval_steps", "save_steps",
                  "output_dir", "max_steps", "device"):
            kw.pop(k, None)
        kw.update(max_length=self.max_length, tensorboard=self.tensorboard, callbacks=self.step_callbacks)
        return kw

    def train(
        self,
        train_dataset: Any,
        eval_dataset: Any = None,
        num_epochs: int = 3,
        batch_size: int = 16,
        learning_rate: float = 1e-4,
        warmup_steps: int = 1000,
        eval_steps: int = 500,
        save_steps: int = 1000,
        output_dir: str = "./outputs",
        **kwargs: Any,
    ) -> TrainingResult:
        """Same contract as :meth:`MoETrainer.train`; the loop runs on ``world_size`` Ray workers.

        ``train_dataset`` may also be a ``ray.data.Dataset`` of packed blocks (streamed with
        Ray Data; needs ``max_steps``). Extra keyword ``resume_from``: a checkpoint directory
        or "latest" (the newest under ``output_dir``).
        """
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        if batch_size % self.world_size:
            raise DistributedError(
                f"batch_size ({batch_size}) must be divisible by the number of data-parallel ranks ({self.world_size})"
            )
        unknown = sorted(set(kwargs) - set(_FORWARDED_TRAIN_KWARGS) - {"resume_from", "callbacks"})
        if unknown:
            raise ConfigError(f"unknown train() option(s) {unknown}")
        self.step_callbacks += list(kwargs.pop("callbacks", None) or [])
        if "max_length" in kwargs:
            self.max_length = int(kwargs["max_length"])
        out = Path(output_dir).expanduser().resolve()  # workers run in other directories
        out.mkdir(parents=True, exist_ok=True)
        resume = kwargs.pop("resume_from", None)
        if resume == "latest":
            resume = latest_checkpoint(out)
        init_ray(self.address)
        local = self.address is None and not os.environ.get("RAY_ADDRESS")

        import ray.data

        streaming = isinstance(train_dataset, ray.data.Dataset)
        datasets = {}
        if streaming:
            if kwargs.get("max_steps") is None:
                raise ConfigError("streaming (Ray Data) training needs max_steps")
            datasets["train"] = train_dataset
            train_ref = None
        else:
            train_ref = ray.put(self.as_token_dataset(train_dataset, "train_dataset"))
        eval_ref = ray.put(self.as_token_dataset(eval_dataset, "eval_dataset")) if eval_dataset is not None else None
        train_kwargs = dict(
            num_epochs=num_epochs, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
            eval_steps=eval_steps, save_steps=save_steps, output_dir=str(out),
            **{k: v for k, v in kwargs.items() if k in _FORWARDED_TRAIN_KWARGS},
        )
        cpus = _cpus_per_worker(self.world_size, local, (self.resources_per_worker or {}).get("CPU"))
        resources = {**(self.resources_per_worker or {}), "CPU": cpus}
        threads = max(1, (os.cpu_count() or 1) // self.world_size) if local else max(1, int(cpus))
        config = {
            "model_config": self.model.config.to_dict(),
            "init_state": ray.put({k: v.detach().cpu() for k, v in self.model.state_dict().items()}),
            "expert_parallel_size": self.expert_parallel_size,
            "use_gpu": self.use_gpu,
            "torch_threads": threads,
            "tokenizer": ray.put(self.tokenizer) if self.tokenizer is not None else None,
            "trainer_kwargs": self._worker_trainer_kwargs(),
            "train_kwargs": train_kwargs,
            "train_data": train_ref,
            "eval_data": eval_ref,
            "streaming": streaming,
            "resume_from": str(resume) if resume else None,
        }
        storage = Path(self.storage_path).expanduser().resolve() if self.storage_path else out / "ray"
        run_name = self.run_name or f"moe-lab-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=self.world_size, use_gpu=self.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=3),
                callbacks=self.run_config_callbacks or None,
            ),
            datasets=datasets or None,
        )
        result = trainer.fit()
        self.ray_result = result
        if result.error is not None:
            raise DistributedError(f"distributed training failed: {result.error}") from result.error
        if result.checkpoint is None or not (result.metrics or {}).get("final"):
            raise DistributedError(f"distributed training ended without its final checkpoint (metrics: {result.metrics})")
        with result.checkpoint.as_directory() as d:  # the final model, as Ray stored it
            res = TrainingResult(**json.loads((Path(d) / RESULT_FILE).read_text()))
            load_model_state(self.model, d)
        if not (res.checkpoint_path and Path(res.checkpoint_path).is_dir()):  # rank 0 wrote it on another node
            res.checkpoint_path = str(result.checkpoint.path)
        self.global_step = res.global_step
        return res


def run_job_ray(spec: JobSpec, output_dir: Optional[str] = None, resume: bool = False,
                address: Optional[str] = None) -> Dict[str, Any]:
    """``moe-lab train``: the job on Ray Train workers (a local embedded cluster by default)."""
    from ..pipeline import (
        PreparedData,
        build_model,
        build_tokenizer,
        finalize,
        prepare_data,
        train_kwargs,
        trainer_kwargs,
    )

    out = Path(output_dir or spec.training.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec.to_yaml(out / "job.yaml")
    t0 = time.perf_counter()
    sc = spec.scaling
    init_ray(address or sc.address, num_gpus=None)
    if spec.data.streaming:
        from ..data import save_tokenizer
        from .data import streaming_dataset

        tokenizer = build_tokenizer(spec, _bpe_sample(spec) if spec.data.tokenizer == "bpe" else None)
        tok_dir = out / "tokenizer"
        save_tokenizer(tokenizer, tok_dir)
        train_data: Any = streaming_dataset(spec, str(tok_dir), num_actors=1)
        data = PreparedData(None, _streaming_eval(spec, tokenizer), tokenizer, {"train": "streamed with Ray Data"})
    else:
        data = prepare_data(spec)
        train_data = data.train
    model = build_model(spec, len(data.tokenizer))
    kw = trainer_kwargs(spec)
    trainer = DistributedMoETrainer(
        model,
        world_size=sc.num_workers,
        expert_parallel_size=sc.expert_parallel_size,
        use_gpu=sc.use_gpu,
        resources_per_worker={"CPU": sc.cpus_per_worker} if sc.cpus_per_worker else None,
        address=address or sc.address,
        storage_path=sc.storage_path,
        max_failures=sc.max_failures,
        name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tokenizer=data.tokenizer,
        **kw,
    )
    result = trainer.train(train_data, data.eval, resume_from="latest" if resume else None, **train_kwargs(spec, str(out)))
    return finalize(spec, out, result.to_dict(), data, trainer.model, time.perf_counter() - t0,
                    extra={"scaling": sc.to_dict()})


def _streaming_eval(spec: JobSpec, tokenizer: Any) -> Any:
    """A small held-out set, prepared in the driver (train shards use other seeds)."""
    from ..data import (
        build_corpus,
        load_text_dataset,
        prepare_moe_dataset,
        train_eval_split,
    )

    d = spec.data
    if d.dataset == "builtin":
        raw = build_corpus(size_bytes=max(20_000, int(d.corpus_size_bytes * d.eval_fraction)), seed=d.corpus_seed)
    elif d.eval_dataset:
        raw = load_text_dataset(d.eval_dataset, text_column=d.text_column)
    else:
        _, raw = train_eval_split(load_text_dataset(d.dataset, text_column=d.text_column), d.eval_fraction, d.corpus_seed)
    return prepare_moe_dataset(raw, tokenizer, max_length=d.max_length, text_column=d.text_column,
                               label_column=d.label_column or "domain")


def _bpe_sample(spec: JobSpec) -> Any:
    from ..pipeline import load_raw_text

    train, _ = load_raw_text(spec)
    return train[spec.data.text_column]
