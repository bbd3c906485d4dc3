"""Distributed training on Ray Train: a driver and a worker function (Ray's own pattern).

    trainer = DistributedMoETrainer(model, world_size=2, expert_parallel_size=2, max_failures=1)
    result = trainer.train(train_ds, eval_ds, batch_size=16, max_steps=100, output_dir="outputs/ep2")

The driver turns what it was given into one :class:`~moe_lab.runner.TrainTask` (model config
and initial weights, the whole TrainingConfig, the data) and hands it to the TorchTrainer.
Each worker (:func:`train_worker`) calls :func:`moe_lab.runner.run_task`, the same assembly
every launcher uses: it rebuilds the model, shards the experts over the expert-parallel
group, and runs the same :class:`~moe_lab.training.MoETrainer` loop as one process, with a
runtime whose collectives are torch.distributed (gloo on CPU, NCCL on GPU) and whose
checkpoint saves are reported to Ray Train. ``batch_size`` is the global batch: with the
same seed, step ``i`` sees the same global batch on 1 worker or N. After the run the driver
holds the final weights, optimizer and schedule.

:func:`run_job_ray` is what ``moe-lab train`` runs: the job spec's ``scaling`` section
picks the workers, and ``data.streaming`` streams batches through Ray Data.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import logging
import os
import pickle
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from ray import cloudpickle
from torch import nn

from ..errors import ConfigError, DistributedError
from ..jobs import JobSpec, record_job
from ..parallel.expert_parallel import validate_parallel_sizes
from ..parallel.mesh import ParallelDims
from ..parallel.runtime import DistributedRuntime, parallel_runtime
from ..parallel.tensor_parallel import TPSharedStream
from ..runner import TrainTask, job_task, run_task
from ..checkpoint import Checkpoint, latest_checkpoint, load_optimizer_state, optimizer_state_by_name
from ..training.loop import MoETrainer
from ..training.results import RESULT_FILE, TrainingResult
from ..training.runtime import Runtime
from .cluster import init_ray, local_cpu_count

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# the user's optimizer and scheduler, rebuilt on each worker
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------


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


def _ray_runtime(model: nn.Module, task: TrainTask) -> Runtime:
    import ray.train

    if ray.train.get_context().get_world_size() == 1:
        return RayRuntime()
    dims = task.dims if task.dims is not None else ParallelDims(ep=task.expert_parallel_size)
    return parallel_runtime(model, runtime_cls=RayDistributedRuntime, dims=dims)


def watch_driver(pid: int, interval_s: float = 0.1) -> None:
    """Exit this worker at once when the driver process ``pid`` (on this machine) is gone, so
    that no worker outlives its driver by more than ``interval_s`` (Ray puts actors in their
    own process groups, so a SIGKILL of the driver's group does not reach them). A checkpoint
    being written then is never renamed into place: it stays a ``.tmp-*`` that the next run
    removes."""

    def loop() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, another user's process
                pass
            time.sleep(interval_s)

    threading.Thread(target=loop, name="moe-lab-driver-watch", daemon=True).start()


def train_worker(config: Dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer: :func:`~moe_lab.runner.run_task` with a Ray runtime."""
    import ray
    import ray.train
    import ray.train.torch

    if config.get("driver_pid") is not None:
        watch_driver(config["driver_pid"])
    torch.set_num_threads(config["torch_threads"])
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs each report at INFO on the root logger
    task: TrainTask = ray.get(config["task"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    changes: Dict[str, Any] = {"training": task.training.replace(device=str(device))}
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None:  # Ray restarted us after a failure: continue from the last report
        resume_dir = tempfile.mkdtemp(prefix="moe-lab-resume-")
        ray_ckpt.to_directory(resume_dir)
        changes["resume_from"] = resume_dir
    tp_stream: Optional[TPSharedStream] = None
    if config["streaming"]:
        from .data import RayDataStream

        world = ray.train.get_context().get_world_size()
        dims = task.dims.resolve(world) if task.dims is not None else None
        dp = dims.dp if dims is not None else world  # every worker is a data-parallel rank
        tp = dims.tp if dims is not None else 1
        pad = getattr(task.tokenizer, "pad_token_id", None) or 0
        # under TP each worker reads 1/tp of its replica's micro-batch; the TP group joins them
        stream: Any = RayDataStream(ray.train.get_dataset_shard("train"), task.training.batch_size // (dp * tp),
                                    seed=task.training.seed, pad_token_id=pad)
        if tp > 1:
            stream = tp_stream = TPSharedStream(stream, pad_token_id=pad)
        changes["train_data"] = stream
    task = dataclasses.replace(task, **changes)
    packed = ray.get(config["optimizer"]) if config.get("optimizer") is not None else None

    def objects(model: nn.Module, runtime: Runtime) -> Dict[str, Any]:
        if tp_stream is not None:  # the mesh exists now
            tp_stream.bind(runtime.groups.mesh.group("tp"))
        if packed is None:
            return {}
        optimizer, scheduler = unpack_optimizer(packed, model, runtime.expert_slices(model))
        return {"optimizer": optimizer, "scheduler": scheduler}

    run_task(task, _ray_runtime, make_objects=objects)


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------


@dataclass
class RayScaling:
    """Where and how a task runs on Ray Train."""

    num_workers: int
    use_gpu: bool = False
    resources_per_worker: Optional[Dict[str, float]] = None
    address: Optional[str] = None  #: a Ray cluster; None: a local one
    storage_path: Optional[str] = None  #: Ray Train storage; default output_dir/ray
    max_failures: int = 0
    name: Optional[str] = None
    run_config_callbacks: List[Any] = field(default_factory=list)


def _cpus_per_worker(num_workers: int, local: bool, requested: Optional[float]) -> float:
    if requested:
        return requested
    if not local:
        return 1.0
    # leave at least one logical CPU for Ray Data next to the workers
    return max(0.25, min(1.0, (local_cpu_count() - 1) / num_workers))


def fit_on_ray(task: TrainTask, scaling: RayScaling, optimizer: Optional[Dict[str, Any]] = None) -> Any:
    """Run ``task`` on ``scaling.num_workers`` Ray Train workers; returns Ray's Result, whose
    checkpoint is the final model. ``task.train_data`` may be a ``ray.data.Dataset``
    (streamed; needs ``max_steps``). ``optimizer``: :func:`pack_optimizer`'s output."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(scaling.address)
    local = scaling.address is None and not os.environ.get("RAY_ADDRESS")
    datasets = {}
    streaming = isinstance(task.train_data, ray.data.Dataset)
    if streaming:
        if task.training.max_steps is None:
            raise ConfigError("streaming (Ray Data) training needs max_steps")
        datasets["train"] = task.train_data
        task = dataclasses.replace(task, train_data=None)
    cpus = _cpus_per_worker(scaling.num_workers, local, (scaling.resources_per_worker or {}).get("CPU"))
    resources = {**(scaling.resources_per_worker or {}), "CPU": cpus}
    threads = max(1, (os.cpu_count() or 1) // scaling.num_workers) if local else max(1, int(cpus))
    config = {
        "driver_pid": os.getpid() if local else None,  # workers on this machine stop when the driver dies
        "task": ray.put(task),
        "use_gpu": scaling.use_gpu,
        "torch_threads": threads,
        "streaming": streaming,
        "optimizer": ray.put(optimizer) if optimizer is not None else None,
    }
    out = Path(task.training.output_dir)
    storage = Path(scaling.storage_path).expanduser().resolve() if scaling.storage_path else out / "ray"
    run_name = scaling.name or f"moe-lab-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
            callbacks=scaling.run_config_callbacks or None,
        ),
        datasets=datasets or None,
    )
    result = trainer.fit()
    if result.error is not None:
        raise DistributedError(f"distributed training failed: {result.error}") from result.error
    if result.checkpoint is None or not (result.metrics or {}).get("final"):
        raise DistributedError(f"distributed training ended without its final checkpoint (metrics: {result.metrics})")
    return result


def _final_result(result: Any, directory: Path) -> TrainingResult:
    res = TrainingResult(**json.loads((directory / RESULT_FILE).read_text()))
    if not (res.checkpoint_path and Path(res.checkpoint_path).is_dir()):  # rank 0 wrote it on another node
        res.checkpoint_path = str(result.checkpoint.path)
    return res


class DistributedMoETrainer(MoETrainer):
    """:class:`MoETrainer`'s API, run on Ray Train workers with expert, tensor and fully
    sharded data parallelism (:mod:`moe_lab.parallel`).

    The driver (this object) holds the model's weights before and after training; the
    loop runs in the workers (:func:`train_worker`). After :meth:`train`, ``evaluate`` and
    ``save_model`` act on the final weights, optimizer and schedule.

    Args:
        model: the model to train (its weights are the initial weights on every worker).
        world_size: number of Ray Train workers.
        expert_parallel_size: ranks the experts are sharded over (borrowed from the
            data-parallel ranks; divides them and num_experts).
        model_parallel_size: tensor-parallel ranks (DTensor TP + sequence parallelism, the
            loss from vocabulary-sharded logits); the TP ranks of a replica see the same batch.
        pipeline_parallel_size: pipeline stages (``torch.distributed.pipelining``, stages cut at
            decoder layers; with data and expert parallelism, not with ``model_parallel_size``
            or ``dp_shard`` > 1); the schedule is ``pp_schedule`` (``"1f1b"``, the default,
            needs ``gradient_accumulation_steps >= pipeline_parallel_size``;
            ``"interleaved_1f1b"``; ``"gpipe"``). The stages of a replica see the same batch.
        **kwargs: ``dp_shard`` (FSDP2 shards, 1: none; with ``model_parallel_size > 1`` FSDP
            shards the TP DTensors: a 2-D mesh), ``pp_schedule``,
            MoETrainer options (``optimizer`` and ``scheduler`` as instances, classes or
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
        #: the layout, resolved; data-parallel ranks: ``self.dims.dp``
        self.dims = validate_parallel_sizes(
            world_size, model.config.num_experts, expert_parallel_size, model_parallel_size, pipeline_parallel_size,
            dp_shard=kwargs.pop("dp_shard", 1), config=model.config, pp_schedule=kwargs.pop("pp_schedule", "1f1b"),
        )
        accum = kwargs.get("gradient_accumulation_steps", 1)
        if self.dims.pp > 1 and self.dims.pp_schedule == "1f1b" and accum < self.dims.pp:
            raise DistributedError(f"pp_schedule '1f1b' needs gradient_accumulation_steps ({accum}) >= "
                                   f"pipeline_parallel_size ({self.dims.pp}): the pipeline's micro-batches are the step's")
        self.world_size = world_size
        self.expert_parallel_size = expert_parallel_size
        self.scaling = RayScaling(
            num_workers=world_size,
            use_gpu=bool(kwargs.pop("use_gpu", False)),
            resources_per_worker=kwargs.pop("resources_per_worker", None),
            address=kwargs.pop("address", None),
            storage_path=kwargs.pop("storage_path", None),
            max_failures=int(kwargs.pop("max_failures", 0)),
            name=kwargs.pop("name", None),
            run_config_callbacks=list(kwargs.pop("run_config_callbacks", None) or []),
        )
        kwargs.setdefault("device", "cpu")  # the driver only holds the weights
        super().__init__(model, **kwargs)
        self.ray_result: Any = None

    def fit(self, train_dataset: Any, eval_dataset: Any = None, resume_from: Optional[str] = None) -> TrainingResult:
        """Train on the Ray workers with the settings in ``self.args`` (see :meth:`MoETrainer.train`).

        ``train_dataset`` may also be a ``ray.data.Dataset`` of packed blocks (streamed with
        Ray Data; needs ``max_steps``). ``resume_from`` (a checkpoint directory or "latest") may
        come from any layout: a full checkpoint (each worker cuts the full model and optimizer
        state to its own pieces) or a sharded one (each worker reads its own pieces with
        torch.distributed.checkpoint). Step checkpoints are reported to Ray Train as written
        (sharded ones by rank 0 as one directory: the workers share this machine's, or a
        shared, file system); the final one is the full model."""
        import ray.data

        args = self.args
        if args.batch_size % self.dims.dp:
            raise DistributedError(
                f"batch_size ({args.batch_size}) must be divisible by the number of data-parallel ranks ({self.dims.dp})"
            )
        out = Path(args.output_dir).expanduser().resolve()  # workers run in other directories
        out.mkdir(parents=True, exist_ok=True)
        if resume_from == "latest":
            resume_from = latest_checkpoint(out)
        streaming = isinstance(train_dataset, ray.data.Dataset)
        if streaming and self.dims.pp > 1:
            raise DistributedError(f"streaming (Ray Data) with pipeline_parallel_size ({self.dims.pp}) > 1 is not "
                                   "supported yet: Ray Data gives every worker its own batches")
        if streaming and self.dims.tp > 1 and args.batch_size % (self.dims.dp * self.dims.tp):
            raise DistributedError(
                f"streaming (Ray Data) with model_parallel_size ({self.dims.tp}): batch_size ({args.batch_size}) "
                f"must be divisible by the data-parallel ranks ({self.dims.dp}) × model_parallel_size ({self.dims.tp}) = "
                f"{self.dims.dp * self.dims.tp}; each TP rank reads its share of its replica's batch from the stream"
            )
        task = TrainTask(
            model_config=self.model.config.to_dict(),
            training=args.replace(output_dir=str(out)),
            train_data=train_dataset if streaming else self.as_token_dataset(train_dataset, "train_dataset"),
            eval_data=self.as_token_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None,
            tokenizer=self.tokenizer,
            init_state={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            resume_from=str(resume_from) if resume_from else None,
            expert_parallel_size=self.expert_parallel_size,
            dims=self.dims,
            max_length=self.max_length,
            callbacks=list(self.callbacks),
        )
        packed = None
        if self.optimizer_spec is not None or self.scheduler_spec is not None:
            packed = pack_optimizer(self.model, self.optimizer_spec, self.scheduler_spec)
        result = self.ray_result = fit_on_ray(task, self.scaling, packed)
        with result.checkpoint.as_directory() as d:  # the final model, as Ray stored it
            res = _final_result(result, Path(d))
            ckpt = Checkpoint.open(d)
            ckpt.load_into(self.model)
            self._load_final_training_state(ckpt, args.learning_rate, args.warmup_steps)
        self.global_step = res.global_step
        return res

    def _load_final_training_state(self, ckpt: Checkpoint, learning_rate: float, warmup_steps: int) -> None:
        """Give the driver the workers' final optimizer, schedule and data position, so that
        ``save_model(path, save_optimizer=True)`` writes them (a user's optimizer instance is
        updated in place)."""
        training = ckpt.training_state()
        state = training.trainer_state
        self.setup_optimizer(learning_rate, warmup_steps, int(state.get("total_steps") or state.get("global_step") or 1))
        training.apply(self.model, self.optimizer, self.scheduler)
        self.position = (int(state.get("epoch", 0)), int(state.get("micro_batch_in_epoch", 0)))


def run_job_ray(spec: JobSpec, output_dir: Optional[str] = None, resume: bool = False,
                address: Optional[str] = None) -> Dict[str, Any]:
    """``moe-lab train``: the job on Ray Train workers (a local embedded cluster by default)."""
    from ..runner import PreparedData, build_tokenizer, finalize, parameter_counts, prepare_data

    out = Path(output_dir or spec.training.output_dir).expanduser().resolve()
    sc = spec.scaling
    out.mkdir(parents=True, exist_ok=True)
    record_job(spec, out)
    t0 = time.perf_counter()
    # prepare the data before Ray starts here: tokenizing forks data.num_proc processes,
    # which is unsafe in a process that runs Ray (prepare_moe_dataset would fall back to one)
    if spec.data.streaming:
        from ..data import save_tokenizer
        from .data import held_out_documents, streaming_dataset

        held_out = held_out_documents(spec)  # eval documents: kept out of the stream and of the BPE sample
        tokenizer = build_tokenizer(spec, _bpe_sample(spec, held_out) if spec.data.tokenizer == "bpe" else None)
        _check_layout(spec, len(tokenizer))
        tok_dir = out / "tokenizer"
        save_tokenizer(tokenizer, tok_dir)
        data = PreparedData(None, _streaming_eval(spec, tokenizer, held_out), tokenizer,
                            {"train": "streamed with Ray Data"})
        init_ray(address or sc.address, num_gpus=None)
        train_data: Any = streaming_dataset(spec, str(tok_dir), num_actors=1, held_out=held_out)
    else:
        tokenizer = None
        if spec.data.tokenizer != "bpe":  # known before tokenizing: check the layout first
            tokenizer = build_tokenizer(spec)
            _check_layout(spec, len(tokenizer))
        data = prepare_data(spec, tokenizer)
        train_data = data.train
        _check_layout(spec, len(data.tokenizer))
        init_ray(address or sc.address, num_gpus=None)
    task = dataclasses.replace(job_task(spec, data, out, resume), train_data=train_data)
    scaling = RayScaling(
        num_workers=sc.num_workers,
        use_gpu=sc.use_gpu,
        resources_per_worker={"CPU": sc.cpus_per_worker} if sc.cpus_per_worker else None,
        address=address or sc.address,
        storage_path=sc.storage_path,
        max_failures=sc.max_failures,
        name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    result = fit_on_ray(task, scaling)
    with result.checkpoint.as_directory() as d:
        res = _final_result(result, Path(d))
    return finalize(spec, out, res.to_dict(), data, None, time.perf_counter() - t0,
                    extra={"scaling": sc.to_dict()}, parameters=parameter_counts(spec, len(data.tokenizer)))


def _check_layout(spec: JobSpec, vocab_size: int) -> None:
    """ConfigError naming the values when the job's model cannot be split by its ``scaling``
    layout, now that the vocabulary size is known (the rest was checked when the job loaded)."""
    problems = spec.parallel_problems(vocab_size)
    if problems:
        raise ConfigError("; ".join(problems))


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
