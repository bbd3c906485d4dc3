"""MoETrainer: the training loop every launcher runs.

    trainer = MoETrainer(model, mixed_precision=True, gradient_accumulation_steps=2, seed=0)
    result = trainer.train(train_ds, eval_ds, num_epochs=1, batch_size=16, learning_rate=3e-4,
                           warmup_steps=50, output_dir="outputs/run", max_steps=200)
    result.eval_loss, result.history["loss"], result.checkpoint_path

    trainer = MoETrainer.from_config(model, TrainingConfig(...), runtime=runtime)   # launchers
    trainer.fit(train_ds, eval_ds, resume_from="latest")

:meth:`MoETrainer.fit` is a short loop over components: fetch micro-batches
(:mod:`.batches`) → :func:`~moe_lab.training.step.train_step` → maybe evaluate
(:mod:`.evaluate`) → maybe save (:mod:`moe_lab.checkpoint`) → log
(:mod:`.metrics` sinks). Every setting lives in one :class:`~moe_lab.config.TrainingConfig`
(``trainer.args``); ``train()``'s keyword arguments are its fields. The step's exact loss
accounting is written down in :mod:`.step`.

Data order: a seeded permutation per epoch; step ``i`` sees the same global batch whatever
the number of ranks. Resume restores weights, optimizer, schedule, RNG and data position.

Outputs in ``output_dir``: ``metrics.jsonl`` (one line per logging step, with per-layer
routing health), TensorBoard events in ``tensorboard/``, checkpoints in
``checkpoints/step-N/`` (full, or sharded with torch.distributed.checkpoint:
``training.checkpoint_format``) and the final model in ``model/`` (always full).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import TrainingConfig
from ..devices import resolve_device
from ..errors import ConfigError, DistributedError, InputError
from . import metrics as M
from .batches import BatchStream, GlobalBatches, MapSource, MicroBatchSource, StreamSource, as_token_dataset
from ..checkpoint import (
    Checkpoint,
    clean_stale_temporaries,
    latest_checkpoint,
    prune_checkpoints,
    scheduler_state_json,
    write_checkpoint,
    write_sharded_checkpoint,
)
from .activation_checkpointing import apply_activation_checkpointing
from .evaluate import evaluate_model
from .fast_paths import apply_fast_paths, chunked_head_loss, lm_loss_sum
from .optim import build_optimizer, build_scheduler, check_optimizer_spec, check_scheduler_spec
from .results import RESULT_FILE, EvalResult, TrainingResult
from .runtime import Runtime
from .state import restore_rng, trainer_state
from .step import StepSettings, train_step

logger = logging.getLogger(__name__)

#: ``train()`` keywords that are not TrainingConfig fields
TRAIN_OPTIONS = ("resume_from", "callbacks", "max_length")


class MoETrainer:
    """Train an :class:`~moe_lab.MoEModel` (or any model with the same forward contract).

    Args:
        model: the model; moved to ``device``.
        optimizer: an instance, a class or a factory ``factory(params)``; default AdamW (no
            decay on norms and embeddings). See :mod:`moe_lab.training.optim`.
        scheduler: an instance (on ``optimizer``) or a factory ``factory(optimizer)``; default
            linear warmup then cosine decay to ``min_lr_ratio``. With ``optimizer=None`` a
            scheduler instance brings its own optimizer.
        mixed_precision: bf16 autocast on CPU and CUDA; fp16 + grad scaler where bf16 is not
            supported.
        gradient_accumulation_steps: micro-batches per optimiser step.
        max_grad_norm: gradient clipping (None: off).
        **kwargs: any :class:`~moe_lab.config.TrainingConfig` field (``seed``, ``device``,
            ``logging_steps``, ``weight_decay``, ``tensorboard``, ``mlflow_tracking_uri``, ...),
            and ``tokenizer`` (for raw text, saved with checkpoints), ``max_length`` (512, for
            raw text), ``monitor`` (an object with ``get_current_stats()`` logged each logging
            step), ``callbacks`` (called with every record), ``sinks`` (more
            :class:`~moe_lab.training.metrics.MetricsSink`), ``runtime`` (the launcher's).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Any = None,
        mixed_precision: bool = True,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: Optional[float] = 1.0,
        **kwargs: Any,
    ) -> None:
        self.runtime: Runtime = kwargs.pop("runtime", None) or Runtime()
        self.tokenizer = kwargs.pop("tokenizer", None)
        self.monitor = kwargs.pop("monitor", None)
        self.max_length = int(kwargs.pop("max_length", 512))
        self.callbacks: List[Callable[[Dict[str, Any]], None]] = list(kwargs.pop("callbacks", None) or [])
        self.extra_sinks: List[M.MetricsSink] = list(kwargs.pop("sinks", None) or [])
        unknown = sorted(set(kwargs) - set(TrainingConfig.model_fields))
        if unknown:
            raise ConfigError(
                f"unknown MoETrainer option(s) {unknown}; expected some of {sorted(TrainingConfig.model_fields)}"
            )
        self.args = TrainingConfig(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps,
                                   max_grad_norm=max_grad_norm, **kwargs)
        if optimizer is None and isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            optimizer = scheduler.optimizer
        check_optimizer_spec(optimizer)
        check_scheduler_spec(scheduler, optimizer)
        if self.args.mlflow_tracking_uri and not M.mlflow_available():
            raise ConfigError(f"mlflow_tracking_uri ({self.args.mlflow_tracking_uri!r}) is set but mlflow is not "
                              "installed: pip install mlflow-skinny")
        self.device = resolve_device(self.args.device)
        self.model = model.to(self.device)
        #: what the user asked for (None, an instance, a class or a factory); built in fit()
        self.optimizer_spec: Any = optimizer
        self.scheduler_spec: Any = scheduler
        self.optimizer: Optional[torch.optim.Optimizer] = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        self.scheduler: Any = scheduler if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) else None
        self._apply_activation_checkpointing()
        amp_dtype, scaler = _mixed_precision(self.args.mixed_precision, self.device)
        self._check_cuda_graphs()
        loss_fn = (apply_fast_paths(self.model, self.device, cuda_graphs=self.args.cuda_graphs)
                   if self.args.fast_paths else lm_loss_sum)
        self.settings = StepSettings(self.device, amp_dtype, scaler, self.args.max_grad_norm, loss_fn,
                                     head_loss_fn=chunked_head_loss(self.args, self.device),
                                     cuda_graphs=self.args.cuda_graphs)
        self.global_step = 0
        self.total_steps: Optional[int] = None
        #: (epoch, micro-batch in epoch) after the last step: where a resume continues
        self.position: Tuple[int, int] = (0, 0)
        self.routing_totals: Optional[torch.Tensor] = None  # [L, E] cumulative expert counts

    def _check_cuda_graphs(self) -> None:
        """``cuda_graphs`` needs what TrainingConfig checks, plus a resolved CUDA device, a model
        whose parameters are plain tensors (not FSDP/TP shards: their hooks run between the
        graphs) and no pipeline schedule."""
        if not self.args.cuda_graphs:
            return
        from torch.distributed.tensor import DTensor

        if self.device.type != "cuda":
            raise ConfigError(f"cuda_graphs needs a CUDA device; device {self.args.device!r} resolved to "
                              f"{str(self.device)!r}")
        if getattr(self.runtime, "pipeline", None) is not None:
            raise ConfigError("cuda_graphs does not combine with pipeline parallelism (expected pp 1)")
        dims = getattr(self.runtime, "dims", None)
        if dims is not None and dims.ep > 1:
            raise ConfigError(f"cuda_graphs does not combine with expert parallelism (ep {dims.ep}; expected 1): "
                              "the all-to-all's split sizes are read on the host inside each layer")
        if any(isinstance(p, DTensor) for p in self.model.parameters()):
            raise ConfigError("cuda_graphs needs unsharded parameters (no FSDP or tensor parallelism): "
                              "use it in one process or with data parallelism")

    def _apply_activation_checkpointing(self) -> None:
        """Checkpoint the decoder layers as ``args.activation_checkpointing`` says; ``"none"``
        leaves the model as it is (a layout's ``parallelize`` may have set it)."""
        if self.args.activation_checkpointing != "none":
            apply_activation_checkpointing(self.model, self.args.activation_checkpointing,
                                           self.args.activation_checkpointing_every)

    @classmethod
    def from_config(cls, model: nn.Module, config: TrainingConfig, **objects: Any) -> "MoETrainer":
        """A trainer whose settings are ``config`` (``objects``: optimizer, scheduler, runtime,
        tokenizer, monitor, callbacks, sinks, max_length)."""
        fields = config.to_dict()
        top = {k: fields.pop(k) for k in ("mixed_precision", "gradient_accumulation_steps", "max_grad_norm")}
        return cls(model, objects.pop("optimizer", None), objects.pop("scheduler", None), **top, **fields, **objects)

    # ---- data -------------------------------------------------------------------------
    def _default_tokenizer(self) -> Any:
        if self.tokenizer is None:
            from ..data import ByteTokenizer

            self.tokenizer = ByteTokenizer()
        return self.tokenizer

    def as_token_dataset(self, dataset: Any, name: str = "dataset") -> Any:
        """Accept a tokenized HF dataset, a map-style dataset of dicts, or raw text."""
        return as_token_dataset(dataset, self._default_tokenizer, self.max_length, name)

    def _collate(self, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        from ..data import collate_moe_batch

        return collate_moe_batch(rows, pad_token_id=getattr(self.tokenizer, "pad_token_id", None) or 0)

    # ---- training ---------------------------------------------------------------------
    def setup_optimizer(self, lr: float, warmup_steps: int, total_steps: int) -> None:
        """Build the optimizer and schedule from their specs (instances are used as given)."""
        a = self.args
        self.optimizer = build_optimizer(
            self.optimizer_spec, self.model, lr, a.weight_decay, (a.adam_beta1, a.adam_beta2), a.adam_eps
        )
        self.scheduler = build_scheduler(self.scheduler_spec, self.optimizer, warmup_steps, total_steps, a.min_lr_ratio)
        self.total_steps = total_steps

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
        """Train and return a :class:`TrainingResult`.

        Keyword args: any TrainingConfig field (``max_steps``, ``logging_steps``, ``seed``,
        ``save_total_limit``, ``eval_samples``, ...), plus ``resume_from`` (a checkpoint
        directory, or "latest" for the newest under ``output_dir``), ``callbacks`` (called on
        every rank with each record: train records carry ``loss``, eval records
        ``eval_loss``) and ``max_length`` (raw text).
        """
        options = {k: kwargs.pop(k) for k in TRAIN_OPTIONS if k in kwargs}
        unknown = sorted(set(kwargs) - set(TrainingConfig.model_fields))
        if unknown:
            raise ConfigError(f"unknown train() option(s) {unknown}; expected TrainingConfig fields or {list(TRAIN_OPTIONS)}")
        if "max_length" in options:
            self.max_length = int(options["max_length"])
        self.callbacks += list(options.get("callbacks") or [])
        self.args = self.args.replace(
            num_epochs=num_epochs, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
            eval_steps=eval_steps, save_steps=save_steps, output_dir=str(output_dir), **kwargs,
        )
        return self.fit(train_dataset, eval_dataset, resume_from=options.get("resume_from"))

    def _source(self, train_dataset: Any) -> Tuple[MicroBatchSource, int]:
        args, rt = self.args, self.runtime
        if isinstance(train_dataset, BatchStream):
            if args.max_steps is None:
                raise ConfigError("streaming training data has no known length: set max_steps (training.max_steps)")
            return StreamSource(train_dataset), args.max_steps
        train_ds = self.as_token_dataset(train_dataset, "train_dataset")
        batches = GlobalBatches(train_ds, args.batch_size, args.seed, rt.dp_rank, rt.dp_size, shuffle=True)
        accum = args.gradient_accumulation_steps
        steps_per_epoch = batches.per_epoch // accum
        if steps_per_epoch == 0:
            raise InputError(
                f"one optimiser step needs batch_size*gradient_accumulation_steps = {args.batch_size * accum} rows; "
                f"the training set has {batches.num_rows}"
            )
        return MapSource(train_ds, batches, self._collate), args.max_steps or steps_per_epoch * args.num_epochs

    def fit(self, train_dataset: Any, eval_dataset: Any = None, resume_from: Optional[str] = None) -> TrainingResult:
        """Train with the settings in ``self.args``; see :meth:`train`."""
        args, rt = self.args, self.runtime
        if args.batch_size % rt.dp_size:
            raise DistributedError(
                f"batch_size ({args.batch_size}) must be divisible by the number of data-parallel ranks ({rt.dp_size})"
            )
        eval_ds = self.as_token_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        source, total_steps = self._source(train_dataset)
        out = Path(args.output_dir).expanduser().resolve()
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(out / "checkpoints")
            clean_stale_temporaries(out)
        torch.manual_seed(args.seed + rt.rank)
        self._apply_activation_checkpointing()  # train() may have changed it
        self.setup_optimizer(args.learning_rate, args.warmup_steps, total_steps)
        self.global_step, epoch, micro = 0, 0, 0
        resume = latest_checkpoint(out) if resume_from == "latest" else resume_from
        if resume is not None:
            epoch, micro = self._resume(Path(resume))
        first_step = self.global_step
        self.position = (epoch, micro)
        logger_ = M.MetricsLogger(self._sinks(out, total_steps))
        history = logger_.sinks[0].history  # the HistorySink
        window = M.MetricsWindow()
        start, tokens_seen = time.perf_counter(), 0
        last_train_loss, ev = float("nan"), None
        source.seek(epoch, micro)
        try:
            while self.global_step < total_steps:
                t_fetch = time.perf_counter()
                micro_batches, epoch, micro = source.take(args.gradient_accumulation_steps)
                t0 = time.perf_counter()
                stats = train_step(self.model, self.optimizer, micro_batches, rt, scheduler=self.scheduler,
                                   settings=self.settings)
                self.global_step += 1
                self.position = (epoch, micro)
                tokens_seen += int(stats.real_total)
                window.add(stats, time.perf_counter() - t0, data_seconds=t0 - t_fetch)
                self._accumulate_routing(stats.expert_counts_LE)
                last = self.global_step == total_steps
                if self.global_step % args.logging_steps == 0 or last:
                    record = self._train_record(window, epoch)
                    last_train_loss = record[M.LOSS]
                    logger_.write(record)
                    window = M.MetricsWindow()
                if eval_ds is not None and (self.global_step % args.eval_steps == 0 or last):
                    ev = self.evaluate(eval_ds, batch_size=args.batch_size, num_samples=args.eval_samples)
                    logger_.write(M.eval_record(self.global_step, ev))
                if self.global_step % args.save_steps == 0 and not last:
                    self.save_checkpoint(out / "checkpoints" / f"step-{self.global_step:06d}", epoch, micro)
                    if rt.is_main:
                        prune_checkpoints(out / "checkpoints", args.save_total_limit)
            elapsed = time.perf_counter() - start
            result = TrainingResult(
                global_step=self.global_step, train_loss=last_train_loss, eval_loss=ev.loss if ev else None,
                history=history, checkpoint_path=str(out / "model"), tokens_per_second=tokens_seen / max(elapsed, 1e-9),
                total_tokens=tokens_seen, elapsed_seconds=elapsed, output_dir=str(out),
                eval_perplexity=ev.perplexity if ev else None, steps_run=self.global_step - first_step,
            )
            self.save_checkpoint(out / "model", epoch, micro, metrics={"final": True},
                                 extra_files={RESULT_FILE: result.to_dict()}, sharded=False)
        finally:
            logger_.close()
        return result

    # ---- logging ----------------------------------------------------------------------
    def _sinks(self, out: Path, total_steps: int) -> List[M.MetricsSink]:
        """The history first, then the main rank's files, then callbacks and extra sinks."""
        sinks: List[M.MetricsSink] = [M.HistorySink()]
        if self.runtime.is_main:
            sinks.append(M.JsonlSink(out / "metrics.jsonl"))
            if self.args.tensorboard:
                sinks.append(M.TensorBoardSink(out / "tensorboard"))
            if self.args.progress_bar:
                sinks.append(M.ProgressSink(total_steps, self.global_step))
            if self.args.mlflow_tracking_uri:
                sinks.append(M.MLflowSink(self.args.mlflow_tracking_uri, self.args.mlflow_experiment,
                                          run_name=out.name, params=self.args.to_dict()))
        if self.callbacks:
            sinks.append(M.CallbackSink(self.callbacks))
        return sinks + self.extra_sinks

    def _train_record(self, window: M.MetricsWindow, epoch: int) -> Dict[str, Any]:
        record = window.record(self.global_step, epoch, float(self.optimizer.param_groups[0]["lr"]),
                               self.runtime.all_reduce_sum, getattr(self.model, "moe_layer_indices", []))
        for lay, moe in zip(record.get(M.MOE_LAYERS, []), getattr(self.model, "moe_layers", [])):
            bias = getattr(moe.router, "expert_bias", None)
            if bias is not None:  # aux-loss-free balancing: its bias over training
                lay[M.ROUTER_BIAS] = [round(float(b), 6) for b in bias.detach().cpu()]
        if self.monitor is not None:
            try:
                record[M.MONITOR] = self.monitor.get_current_stats().to_dict()
            except Exception as exc:  # a broken monitor never stops training
                logger.warning("expert monitor failed: %s", exc)
        return record

    def _accumulate_routing(self, counts_LE: Optional[torch.Tensor]) -> None:
        if counts_LE is None:
            return
        counts_LE = counts_LE.to(torch.float64)
        self.routing_totals = counts_LE if self.routing_totals is None else self.routing_totals + counts_LE

    # ---- evaluation -------------------------------------------------------------------
    def evaluate(self, eval_dataset: Any, batch_size: int = 16, num_samples: Optional[int] = None) -> EvalResult:
        """Token-weighted LM loss (no aux loss), perplexity and routing statistics
        (:func:`moe_lab.training.evaluate.evaluate_model`); the first ``num_samples`` rows."""
        ds = self.as_token_dataset(eval_dataset, "eval_dataset")
        return evaluate_model(self.model, ds, self._collate, self.settings, self.runtime, batch_size, num_samples)

    # ---- checkpoints ------------------------------------------------------------------
    def _routing_stats(self) -> Optional[Dict[str, Any]]:
        if self.routing_totals is None:
            return None
        return {
            "moe_layer_indices": list(getattr(self.model, "moe_layer_indices", [])),
            "expert_counts": [[float(x) for x in row] for row in self.routing_totals.tolist()],
            "global_step": self.global_step,
        }

    @property
    def checkpoint_sharded(self) -> bool:
        """Whether step checkpoints are written sharded (``args.checkpoint_format``; "auto":
        when the runtime's layout shards the parameters: dp_shard, tp or pp > 1)."""
        fmt = self.args.checkpoint_format
        if fmt == "auto":
            dims = getattr(self.runtime, "dims", None)
            return bool(dims is not None and dims.sharded)
        return fmt == "sharded"

    def _write(self, path: Path, with_training_state: bool, epoch: int = 0, micro: int = 0,
               extra_files: Optional[Dict[str, Any]] = None, sharded: bool = False) -> Path:
        """Write a checkpoint atomically (a collective). Full: gather the (possibly sharded)
        state on every rank, rank 0 writes it. Sharded: every rank writes its own pieces of
        the model and optimizer with torch.distributed.checkpoint, nothing is gathered."""
        rt = self.runtime
        if sharded:
            write_sharded_checkpoint(
                path, self.model, self.optimizer if with_training_state else None,
                scheduler_state_json(self.scheduler) if (with_training_state and self.scheduler is not None) else None,
                trainer_state(self.global_step, epoch, micro, self.total_steps, self.args) if with_training_state else None,
                self._routing_stats(), tokenizer=self.tokenizer, extra_files=extra_files,
            )
            return path
        model_state = rt.full_state_dict(self.model)
        opt_t = opt_m = None
        if with_training_state and self.optimizer is not None:
            opt_t, opt_m = rt.full_optimizer_state(self.model, self.optimizer)
        if rt.is_main:
            write_checkpoint(
                path, self.model.config, model_state, opt_t, opt_m,
                scheduler_state_json(self.scheduler) if (with_training_state and self.scheduler is not None) else None,
                trainer_state(self.global_step, epoch, micro, self.total_steps, self.args) if with_training_state else None,
                self._routing_stats(), tokenizer=self.tokenizer, extra_files=extra_files,
            )
        rt.barrier()
        return path

    def save_checkpoint(self, path: str | os.PathLike, epoch: int = 0, micro: int = 0,
                        metrics: Optional[Dict[str, Any]] = None, extra_files: Optional[Dict[str, Any]] = None,
                        sharded: Optional[bool] = None) -> Path:
        """Save model, optimiser, schedule and trainer state (a collective: all ranks call it).

        ``metrics`` travel with the checkpoint report to the launcher (Ray Train);
        ``extra_files`` are JSON files written into the checkpoint; ``sharded``: the format
        (None: :attr:`checkpoint_sharded`)."""
        sharded = self.checkpoint_sharded if sharded is None else sharded
        path = self._write(Path(path), True, epoch, micro, extra_files, sharded=sharded)
        self.runtime.report({"step": self.global_step, **(metrics or {})}, str(path))
        return path

    def save_model(self, path: str | os.PathLike, save_optimizer: bool = True) -> Path:
        """Save the model (and, by default, optimiser/scheduler/trainer state) to ``path``.

        With the training state, ``train(..., resume_from=path)`` continues where the last
        ``train`` stopped."""
        return self._write(Path(path), save_optimizer, *self.position)

    def _resume(self, path: Path) -> Tuple[int, int]:
        if not path.is_dir():
            raise InputError(f"resume_from: checkpoint directory not found: {path}")
        ckpt = Checkpoint.open(path)
        training = ckpt.training_state()
        if not training.trainer_state:
            raise InputError(f"resume_from: {path} has no trainer state; it is not a training checkpoint")
        if ckpt.is_sharded:  # DCP: each rank reads its own pieces of model and optimizer, at this layout
            ckpt.load_sharded(self.model, self.optimizer)
            training.apply(self.model, None, self.scheduler)
        else:
            slices = self.runtime.expert_slices(self.model)
            if slices is None:  # sharded experts were loaded, full, before sharding (runner.build_task_model)
                ckpt.load_into(self.model)
            training.apply(self.model, self.optimizer, self.scheduler, slices)
        state = training.trainer_state
        self.global_step = int(state["global_step"])
        restore_rng(state.get("rng", {}), self.runtime.rank, self.args.seed, self.global_step)
        routing = ckpt.routing_stats()
        if routing is not None:
            self.routing_totals = torch.tensor(routing["expert_counts"], dtype=torch.float64)
        return int(state["epoch"]), int(state["micro_batch_in_epoch"])


def _mixed_precision(enabled: bool, device: torch.device) -> Tuple[Optional[torch.dtype], Any]:
    if not enabled:
        return None, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16, torch.amp.GradScaler("cuda")
    return torch.bfloat16, None
