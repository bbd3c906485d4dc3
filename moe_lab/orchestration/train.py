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

import collections
import functools
import io
import json
import logging
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from ray import cloudpickle
from torch import nn

from ..errors import ConfigError, DistributedError
from ..jobs import JobSpec
from ..parallel.expert_parallel import ExpertParallelism, validate_parallel_sizes
from ..parallel.runtime import DistributedRuntime
from ..training.checkpoint import (
    TRAINER_STATE,
    latest_checkpoint,
    load_model_state,
    load_optimizer_state,
    load_training_state,
    optimizer_state_by_name,
    read_json,
)
from ..training.runtime import Runtime
from ..training.trainer import RESULT_FILE, MoETrainer, TrainingResult
from .cluster import init_ray, local_cpu_count

logger = logging.getLogger(__name__)

#: train() options the driver forwards to the workers
_FORWARDED_TRAIN_KWARGS = ("max_steps", "logging_steps", "save_total_limit", "eval_samples", "max_length", "seed")


class _ParamPickler(cloudpickle.CloudPickler):
    """Pickles parameters by name (persistent ids), so that the optimizer and scheduler a
    user built on the driver's model are rebound to a worker's own (sharded) parameters."""

    def __init__(self, file: Any, names: Dict[int, str]) -> None:
        super().__init__(file)
        self.names = names

    def persistent_id(self, obj: Any) -> Optional[str]:
        if isinstance(obj, nn.Parameter):
            if id(obj) not in self.names:
                raise ConfigError("the optimizer holds a parameter that is not one of the model's parameters")
            return self.names[id(obj)]
        return None


class _ParamUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, params: Dict[str, nn.Parameter]) -> None:
        super().__init__(file)
        self.params = params

    def persistent_load(self, pid: str) -> nn.Parameter:
        if pid not in self.params:
            raise DistributedError(f"the optimizer refers to parameter {pid!r}, which the worker's model lacks")
        return self.params[pid]


def pack_optimizer(model: nn.Module, optimizer: Any, scheduler: Any) -> Dict[str, Any]:
    """The user's optimizer and scheduler specs (instances, classes or factories), ready to be
    rebuilt on a worker by :func:`unpack_optimizer`: same class, same hyperparameters per
    parameter group, parameters matched by name. Optimizer state travels by parameter name,
    as in a checkpoint, so that it can be sliced for sharded experts."""
    names = {id(p): n for n, p in model.named_parameters()}
    packed: Dict[str, Any] = {"state": None}
    saved_state = saved_step = None
    if isinstance(optimizer, torch.optim.Optimizer):
        if any(optimizer.state.values()):
            packed["state"] = optimizer_state_by_name(model, optimizer)
        saved_state, optimizer.state = optimizer.state, collections.defaultdict(dict)
        saved_step = optimizer.__dict__.pop("step", None)  # a scheduler's step-counting wrapper (holds a weakref)
    try:
        buf = io.BytesIO()
        _ParamPickler(buf, names).dump((optimizer, scheduler))
    finally:
        if saved_state is not None:
            optimizer.state = saved_state
        if saved_step is not None:
            optimizer.step = saved_step
    packed["blob"] = buf.getvalue()
    return packed


def unpack_optimizer(packed: Dict[str, Any], model: nn.Module, expert_slices: Optional[Dict[str, slice]] = None):
    """Inverse of :func:`pack_optimizer` on a worker: ``(optimizer_spec, scheduler_spec)``."""
    optimizer, scheduler = _ParamUnpickler(io.BytesIO(packed["blob"]), dict(model.named_parameters())).load()
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        _count_steps_for_scheduler(scheduler.optimizer)
    if packed.get("state") is not None and isinstance(optimizer, torch.optim.Optimizer):
        tensors, meta = packed["state"]
        load_optimizer_state(model, optimizer, tensors, meta, expert_slices)
    return optimizer, scheduler


def _count_steps_for_scheduler(optimizer: torch.optim.Optimizer) -> None:
    """What ``LRScheduler.__init__`` does to its optimizer: mark ``step`` so the scheduler can
    tell that the optimizer stepped first (the wrapper is not picklable, so it is redone)."""
    step = type(optimizer).step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(optimizer, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


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
        ExpertParallelism.parallelize_experts(model, config["expert_parallel_size"])
        runtime: Runtime = RayDistributedRuntime(model, ExpertParallelism.get_groups(model))
    else:
        runtime = RayRuntime()
    tokenizer = ray.get(config["tokenizer"]) if config.get("tokenizer") is not None else None
    optimizer = scheduler = None
    if config.get("optimizer") is not None:  # the user's optimizer/scheduler, rebound to this worker's parameters
        optimizer, scheduler = unpack_optimizer(ray.get(config["optimizer"]), model, runtime.expert_slices(model))
    trainer = MoETrainer(model, optimizer=optimizer, scheduler=scheduler, runtime=runtime, tokenizer=tokenizer,
                         device=str(device), **config["trainer_kwargs"])
    if config.get("streaming"):
        from .data import RayDataStream

        per_rank = config["train_kwargs"]["batch_size"] // world
        train_data: Any = RayDataStream(ray.train.get_dataset_shard("train"), per_rank, seed=config["trainer_kwargs"]["seed"],
                                        pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
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
        **kwargs: MoETrainer options (``optimizer`` and ``scheduler`` as instances, classes or
            factories: each worker rebuilds them on its own parameters, same class and
            hyperparameters per parameter group) plus ``use_gpu`` (False), ``resources_per_worker``
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
            "optimizer": (ray.put(pack_optimizer(self.model, self.optimizer_spec, self.scheduler_spec))
                          if self.optimizer_spec is not None or self.scheduler_spec is not None else None),
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
            self._load_final_training_state(Path(d), learning_rate, warmup_steps)
        if not (res.checkpoint_path and Path(res.checkpoint_path).is_dir()):  # rank 0 wrote it on another node
            res.checkpoint_path = str(result.checkpoint.path)
        self.global_step = res.global_step
        return res


    def _load_final_training_state(self, directory: Path, learning_rate: float, warmup_steps: int) -> None:
        """Give the driver the workers' final optimizer, schedule and data position, so that
        ``save_model(path, save_optimizer=True)`` writes them (a user's optimizer instance is
        updated in place)."""
        state = read_json(directory / TRAINER_STATE) if (directory / TRAINER_STATE).exists() else {}
        self._build_optim(learning_rate, warmup_steps, int(state.get("total_steps") or state.get("global_step") or 1))
        load_training_state(directory, self.model, self.optimizer, self.scheduler)
        self.position = (int(state.get("epoch", 0)), int(state.get("micro_batch_in_epoch", 0)))


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
    # prepare the data before Ray starts here: tokenizing forks data.num_proc processes,
    # which is unsafe in a process that runs Ray (prepare_moe_dataset would fall back to one)
    if spec.data.streaming:
        from ..data import save_tokenizer
        from .data import held_out_documents, streaming_dataset

        held_out = held_out_documents(spec)  # eval documents: kept out of the stream and of the BPE sample
        tokenizer = build_tokenizer(spec, _bpe_sample(spec, held_out) if spec.data.tokenizer == "bpe" else None)
        tok_dir = out / "tokenizer"
        save_tokenizer(tokenizer, tok_dir)
        data = PreparedData(None, _streaming_eval(spec, tokenizer, held_out), tokenizer,
                            {"train": "streamed with Ray Data"})
        init_ray(address or sc.address, num_gpus=None)
        train_data: Any = streaming_dataset(spec, str(tok_dir), num_actors=1, held_out=held_out)
    else:
        data = prepare_data(spec)
        train_data = data.train
        init_ray(address or sc.address, num_gpus=None)
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


def _streaming_eval(spec: JobSpec, tokenizer: Any, held_out: Any = None) -> Any:
    """The streaming job's eval set, packed in the driver.

    ``held_out``: its raw documents (default :func:`~moe_lab.orchestration.data.held_out_documents`),
    which :func:`~moe_lab.orchestration.data.streaming_dataset` keeps out of the training stream.
    """
    from ..data import prepare_moe_dataset
    from .data import held_out_documents

    d = spec.data
    raw = held_out_documents(spec) if held_out is None else held_out
    return prepare_moe_dataset(raw, tokenizer, max_length=d.max_length, num_proc=d.num_proc,
                               text_column=d.text_column, label_column=d.label_column)


def _bpe_sample(spec: JobSpec, held_out: Any) -> Any:
    """Texts to train a streaming job's BPE tokenizer on: training documents, never eval ones."""
    from ..data import load_text_dataset
    from ..data.pack import as_text, document_digest, document_digests
    from .data import CORPUS_SHARDS, builtin_shard

    d = spec.data
    if d.dataset == "builtin":  # the shards the stream trains on (the eval corpus has another seed)
        return [text for shard in range(CORPUS_SHARDS) for text in builtin_shard(spec, shard)["text"]]
    exclude = document_digests(held_out[d.text_column])
    texts = (as_text(v) for v in load_text_dataset(d.dataset, text_column=d.text_column)[d.text_column])
    return [t for t in texts if t is not None and document_digest(t) not in exclude]
