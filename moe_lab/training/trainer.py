"""MoETrainer: the training loop every launcher runs.

    trainer = MoETrainer(model, mixed_precision=True, gradient_accumulation_steps=2, seed=0)
    result = trainer.train(train_ds, eval_ds, num_epochs=1, batch_size=16, learning_rate=3e-4,
                           warmup_steps=50, output_dir="outputs/run", max_steps=200)
    result.eval_loss, result.history["loss"], result.checkpoint_path

What one optimiser step does (``_train_step``):
1. take ``gradient_accumulation_steps`` micro-batches of ``batch_size`` sequences (the global
   micro-batch; each data-parallel rank takes its slice);
2. count the label tokens and real tokens of all of them, summed over ranks;
3. per micro-batch: ``loss = CE_sum / labels_total + aux_loss * real_mb / real_total`` under
   autocast, backward. The sum over micro-batches and ranks is the loss of the whole step,
   so accumulation and data parallelism are exact for the LM loss and the z-loss. (The
   load-balancing loss uses each micro-batch's routing statistics, summed over ranks, as in
   Megatron-Core; with accumulation it is the token-weighted mean of the micro-batch values.)
4. sync gradients (a no-op in one process), clip, step the optimiser and the LR schedule.

Data order: a seeded permutation per epoch; step ``i`` sees the same global batch whatever
the number of ranks. Resume restores weights, optimiser, schedule, RNG and data position.

Outputs in ``output_dir``: ``metrics.jsonl`` (one line per logging step, with per-layer
routing health), TensorBoard events in ``tensorboard/``, checkpoints in
``checkpoints/step-N/`` and the final model in ``model/``.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    runtime_checkable,
)

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainingConfig
from ..constants import IGNORE_INDEX
from ..errors import ConfigError, DistributedError, InputError
from .checkpoint import (
    _scheduler_state_json,
    clean_stale_temporaries,
    latest_checkpoint,
    load_model_state,
    load_training_state,
    prune_checkpoints,
    write_checkpoint,
)
from .fast_paths import apply_fast_paths, lm_loss_sum
from .optim import (
    build_optimizer,
    build_scheduler,
    check_optimizer_spec,
    check_scheduler_spec,
    default_optimizer,  # noqa: F401  (re-exported: moe_lab.training.trainer.default_optimizer)
    warmup_cosine,  # noqa: F401
)
from .runtime import Runtime

logger = logging.getLogger(__name__)

#: the final checkpoint (``output_dir/model``) carries the TrainingResult as JSON
RESULT_FILE = "training_result.json"


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Evaluation loss and routing statistics over a dataset."""

    loss: float
    perplexity: float
    num_tokens: int
    expert_counts: List[List[int]] = field(default_factory=list)  # [L][E]
    load_imbalance: List[float] = field(default_factory=list)  # max/mean per layer
    load_cv: List[float] = field(default_factory=list)  # coefficient of variation per layer
    dropped_fraction: List[float] = field(default_factory=list)  # per layer

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingResult:
    """What :meth:`MoETrainer.train` returns."""

    global_step: int
    train_loss: float
    eval_loss: Optional[float]
    history: Dict[str, List[float]]
    checkpoint_path: Optional[str]
    tokens_per_second: float
    total_tokens: int = 0
    elapsed_seconds: float = 0.0
    output_dir: Optional[str] = None
    eval_perplexity: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def load_stats(counts_LE: torch.Tensor) -> Tuple[List[float], List[float]]:
    """Per-layer max/mean and coefficient of variation of expert counts [L, E]."""
    c = counts_LE.double()
    mean = c.mean(dim=-1).clamp(min=1e-9)
    imbalance = (c.max(dim=-1).values / mean).tolist()
    cv = (c.std(dim=-1, unbiased=False) / mean).tolist()
    return imbalance, cv


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def epoch_permutation(num_rows: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    if not shuffle:
        return list(range(num_rows))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=g).tolist()


def _fetch_rows(dataset: Any, indices: Sequence[int]) -> List[Dict[str, Any]]:
    if hasattr(dataset, "column_names") and hasattr(dataset, "select"):  # datasets.Dataset
        cols = dataset[list(indices)]
        keys = list(cols.keys())
        return [{k: cols[k][i] for k in keys} for i in range(len(indices))]
    return [dataset[i] for i in indices]


class _Batches:
    """Deterministic global micro-batches; this rank's slice of each."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, dp_rank: int, dp_size: int, shuffle: bool) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.dp_rank, self.dp_size, self.shuffle = dp_rank, dp_size, shuffle
        self.num_rows = len(dataset)
        self.per_epoch = self.num_rows // batch_size
        if self.per_epoch == 0:
            raise InputError(
                f"the training set has {self.num_rows} rows, fewer than one batch (batch_size={batch_size})"
            )
        self._order_epoch: Optional[int] = None
        self._order: List[int] = []

    def indices(self, epoch: int, micro: int) -> List[int]:
        if self._order_epoch != epoch:
            self._order = epoch_permutation(self.num_rows, self.seed, epoch, self.shuffle)
            self._order_epoch = epoch
        rows = self._order[micro * self.batch_size : (micro + 1) * self.batch_size]
        per_rank = self.batch_size // self.dp_size
        return rows[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]


@runtime_checkable
class BatchStream(Protocol):
    """A streaming source of this rank's collated micro-batches (for example Ray Data).

    ``iter_epoch(epoch)`` yields dicts with ``input_ids``, ``attention_mask`` and ``labels``
    ([local_batch, seq] tensors). Every rank must yield the same number of batches.
    """

    def iter_epoch(self, epoch: int) -> Iterator[Dict[str, torch.Tensor]]: ...


class _MicroBatchSource(abc.ABC):
    @abc.abstractmethod
    def seek(self, epoch: int, micro: int) -> None:
        """Position the source at micro-batch ``micro`` of ``epoch``."""

    @abc.abstractmethod
    def next(self) -> Tuple[Dict[str, Any], int, int]:
        """The next micro-batch and the (epoch, micro) position *after* it."""


class _MapSource(_MicroBatchSource):
    def __init__(self, dataset: Any, batches: "_Batches", collate: Callable) -> None:
        self.dataset, self.batches, self.collate = dataset, batches, collate
        self.epoch = self.micro = 0

    def seek(self, epoch: int, micro: int) -> None:
        self.epoch, self.micro = epoch, micro

    def next(self) -> Tuple[Dict[str, Any], int, int]:
        if self.micro >= self.batches.per_epoch:
            self.epoch, self.micro = self.epoch + 1, 0
        rows = _fetch_rows(self.dataset, self.batches.indices(self.epoch, self.micro))
        self.micro += 1
        return self.collate(rows), self.epoch, self.micro


class _StreamSource(_MicroBatchSource):
    """Epochs of a BatchStream; resuming mid-epoch skips the micro-batches already used."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream
        self.epoch = self.micro = 0
        self._it: Optional[Iterator[Dict[str, torch.Tensor]]] = None

    def seek(self, epoch: int, micro: int) -> None:
        self.epoch, self.micro = epoch, 0
        self._it = iter(self.stream.iter_epoch(epoch))
        for _ in range(micro):
            self._advance()

    def _advance(self) -> Dict[str, torch.Tensor]:
        for _attempt in range(2):
            if self._it is None:
                self._it = iter(self.stream.iter_epoch(self.epoch))
            try:
                batch = next(self._it)
                self.micro += 1
                return batch
            except StopIteration:
                if self.micro == 0:
                    raise InputError("the training data stream yielded no batches") from None
                self.epoch, self.micro, self._it = self.epoch + 1, 0, None
        raise InputError("the training data stream yielded no batches")

    def next(self) -> Tuple[Dict[str, Any], int, int]:
        batch = self._advance()
        return batch, self.epoch, self.micro


# ---------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------

_TRAIN_KWARGS = {
    "max_steps",
    "resume_from",
    "logging_steps",
    "save_total_limit",
    "eval_samples",
    "max_length",
    "callbacks",
    "seed",
}


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
        **kwargs: ``seed`` (42), ``device`` ("auto"), ``logging_steps`` (10), ``weight_decay``
            (0.01), ``adam_beta1``/``adam_beta2``/``adam_eps``, ``min_lr_ratio`` (0.1),
            ``tokenizer`` (for raw text and saved with checkpoints), ``max_length`` (512, for raw
            text), ``progress_bar`` (True), ``tensorboard`` (True), ``monitor`` (an object with
            ``get_current_stats()`` logged each logging step), ``runtime`` (internal).
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
        self.tensorboard = bool(kwargs.pop("tensorboard", True))
        self.max_length = int(kwargs.pop("max_length", 512))
        self.step_callbacks: List[Callable[[Dict[str, Any]], None]] = list(kwargs.pop("callbacks", []) or [])
        fields = set(TrainingConfig.model_fields)
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise ConfigError(f"unknown MoETrainer option(s) {unknown}; expected some of {sorted(fields)}")
        self.args = TrainingConfig(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )
        if optimizer is None and isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            optimizer = scheduler.optimizer
        check_optimizer_spec(optimizer)
        check_scheduler_spec(scheduler, optimizer)
        self.device = self._resolve_device(self.args.device)
        self.model = model.to(self.device)
        #: what the user asked for (None, an instance, a class or a factory); built in train()
        self.optimizer_spec: Any = optimizer
        self.scheduler_spec: Any = scheduler
        self.optimizer: Optional[torch.optim.Optimizer] = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        self.scheduler: Any = scheduler if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) else None
        self.total_steps: Optional[int] = None
        #: (epoch, micro-batch in epoch) after the last step: where a resume continues
        self.position: Tuple[int, int] = (0, 0)
        self.amp_dtype, self.scaler = self._mixed_precision_setup(self.args.mixed_precision)
        self.loss_sum_fn = apply_fast_paths(self.model, self.device) if self.args.fast_paths else lm_loss_sum
        self.global_step = 0
        self.routing_totals: Optional[torch.Tensor] = None  # [L, E] cumulative expert counts

    # ---- setup ------------------------------------------------------------------------
    @staticmethod
    def _resolve_device(device: str) -> torch.device:
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"device {device!r} is not a valid torch device") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        return dev

    def _mixed_precision_setup(self, enabled: bool) -> Tuple[Optional[torch.dtype], Any]:
        if not enabled:
            return None, None
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16, torch.amp.GradScaler("cuda")
        return torch.bfloat16, None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None)

    # ---- data -------------------------------------------------------------------------
    def _default_tokenizer(self):
        if self.tokenizer is None:
            from ..data import ByteTokenizer

            self.tokenizer = ByteTokenizer()
        return self.tokenizer

    def as_token_dataset(self, dataset: Any, name: str = "dataset") -> Any:
        """Accept a tokenized HF dataset, a map-style dataset of dicts, or raw text."""
        if dataset is None:
            raise InputError(f"{name} is None")
        if isinstance(dataset, str):
            dataset = [dataset]
        if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(t, str) for t in dataset):
            from ..data import prepare_moe_dataset

            return prepare_moe_dataset(list(dataset), self._default_tokenizer(), max_length=self.max_length)
        if hasattr(dataset, "column_names") and hasattr(dataset, "select"):
            cols = list(dataset.column_names)
            if "input_ids" in cols:
                return dataset
            if "text" in cols:
                from ..data import prepare_moe_dataset

                return prepare_moe_dataset(dataset, self._default_tokenizer(), max_length=self.max_length)
            raise InputError(f"{name} has neither an 'input_ids' nor a 'text' column; it has {cols}")
        if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            if len(dataset) == 0:
                raise InputError(f"{name} is empty")
            first = dataset[0]
            if not isinstance(first, dict) or "input_ids" not in first:
                raise InputError(
                    f"{name}[0] must be a dict with 'input_ids'; got {type(first).__name__}"
                    + (f" with keys {sorted(first)}" if isinstance(first, dict) else "")
                )
            return dataset
        raise InputError(
            f"{name} must be a datasets.Dataset, a map-style dataset of dicts, or text; got {type(dataset).__name__}"
        )

    def _collate(self, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        from ..data import collate_moe_batch

        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        return collate_moe_batch(rows, pad_token_id=pad)

    # ---- loss -------------------------------------------------------------------------
    @staticmethod
    def _counts(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"][:, 1:]
        return torch.tensor(
            [float((labels != IGNORE_INDEX).sum()), float(batch["attention_mask"].sum())], dtype=torch.float64
        )

    def _forward_loss(
        self, batch: Dict[str, torch.Tensor], labels_total: float, aux_weight: float
    ) -> Tuple[torch.Tensor, Dict[str, Any], torch.Tensor]:
        """This rank's share of the step loss for one micro-batch: ``(loss, routing_info, ce_sum)``.

        ``aux_weight``: the micro-batch's share of the step's real tokens (over all ranks). The
        model's aux loss is already this rank's share of the micro-batch's global aux loss.
        """
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with self._autocast():
            logits, info = self.model(ids, attention_mask=mask, return_routing_info=True)
        ce_sum = self.loss_sum_fn(logits, labels)
        loss = ce_sum / max(labels_total, 1.0) + info["aux_loss"] * aux_weight
        return loss, info, ce_sum.detach()

    # ---- one optimiser step -----------------------------------------------------------
    def _train_step(self, micro_batches: List[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
        """Forward/backward over the micro-batches, sync, clip, step. Returns step statistics.

        Statistics stay on the device during the step and come back to the host once, at the
        end, so the GPU is never waiting for Python between micro-batches.
        """
        counts = torch.stack([self._counts(b) for b in micro_batches])  # [A, 2]: labels, real tokens
        global_counts = self.runtime.all_reduce_sum(counts)  # [A, 2] summed over ranks
        labels_total = float(global_counts[:, 0].sum())
        real_total = float(global_counts[:, 1].sum())
        losses, ce_sums, layer_stats, expert_counts = [], [], [], []
        self.model.train()
        for mb_idx, batch in enumerate(micro_batches):
            w_mb = float(global_counts[mb_idx, 1]) / max(real_total, 1.0)
            loss, info, ce_sum = self._forward_loss(batch, labels_total, w_mb)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            losses.append(loss.detach().float())
            ce_sums.append(ce_sum.float())
            # per-layer health as this rank's share of the step value (summing over ranks gives it):
            # lb/z are already global shares of their micro-batch; dropped is a local fraction
            w_local = float(counts[mb_idx, 1]) / max(real_total, 1.0)
            layer_stats.append(torch.stack([
                info["load_balancing_loss"].detach().float() * w_mb,
                info["router_z_loss"].detach().float() * w_mb,
                info["dropped_fraction"].detach().float() * w_local,
            ]))  # [3, L]
            expert_counts.append(info["expert_counts"].detach())  # [L, E]
        self.runtime.sync_gradients(self.model)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.runtime.clip_grad_norm(self.model, self.args.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # one device-to-host copy for all the step's statistics
        scalars = torch.stack([torch.stack(losses).sum(), torch.stack(ce_sums).sum(), grad_norm.float().to(losses[0].device)])
        scalars = scalars.double().cpu()
        stats = None
        if expert_counts and expert_counts[0].numel():
            stats = (torch.stack(layer_stats).sum(0).cpu(), torch.stack(expert_counts).sum(0).cpu())
        return {
            "loss_share": float(scalars[0]),
            "ce_sum": float(scalars[1]),
            "labels_total": labels_total,
            "real_total": real_total,
            "grad_norm": float(scalars[2]),
            "layer_stats": stats,
        }

    # ---- training ---------------------------------------------------------------------
    def _build_optim(self, lr: float, warmup_steps: int, total_steps: int) -> None:
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

        Keyword args: ``max_steps`` (stop early), ``resume_from`` (a checkpoint directory, or
        "latest" for the newest under ``output_dir``), ``logging_steps``, ``save_total_limit``,
        ``eval_samples``, ``max_length`` (raw text), ``callbacks`` (called on every rank with
        each logged record: train records carry ``loss``, eval records ``eval_loss``), ``seed``.
        """
        unknown = sorted(set(kwargs) - _TRAIN_KWARGS)
        if unknown:
            raise ConfigError(f"unknown train() option(s) {unknown}; expected some of {sorted(_TRAIN_KWARGS)}")
        if "max_length" in kwargs:
            self.max_length = int(kwargs["max_length"])
        self.step_callbacks += list(kwargs.get("callbacks") or [])
        args = self.args.replace(
            num_epochs=num_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            eval_steps=eval_steps,
            save_steps=save_steps,
            output_dir=str(output_dir),
            **{k: kwargs[k] for k in ("max_steps", "logging_steps", "save_total_limit", "eval_samples", "seed") if k in kwargs},
        )
        self.args = args
        rt = self.runtime
        if args.batch_size % rt.dp_size:
            raise DistributedError(
                f"batch_size ({args.batch_size}) must be divisible by the number of data-parallel ranks ({rt.dp_size})"
            )
        eval_ds = self.as_token_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        accum = args.gradient_accumulation_steps
        if isinstance(train_dataset, BatchStream):
            if args.max_steps is None:
                raise ConfigError("streaming training data has no known length: set max_steps (training.max_steps)")
            source: "_MicroBatchSource" = _StreamSource(train_dataset)
            total_steps = args.max_steps
        else:
            train_ds = self.as_token_dataset(train_dataset, "train_dataset")
            batches = _Batches(train_ds, args.batch_size, args.seed, rt.dp_rank, rt.dp_size, shuffle=True)
            steps_per_epoch = batches.per_epoch // accum
            if steps_per_epoch == 0:
                raise InputError(
                    f"one optimiser step needs batch_size*gradient_accumulation_steps = {args.batch_size * accum} rows; "
                    f"the training set has {batches.num_rows}"
                )
            source = _MapSource(train_ds, batches, self._collate)
            total_steps = args.max_steps or steps_per_epoch * args.num_epochs
        out = Path(args.output_dir).expanduser().resolve()
        ckpt_dir = out / "checkpoints"
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(ckpt_dir)
            clean_stale_temporaries(out)
        torch.manual_seed(args.seed + rt.rank)
        self._build_optim(args.learning_rate, args.warmup_steps, total_steps)

        # ---- resume -------------------------------------------------------------------
        epoch, micro = 0, 0
        self.global_step = 0
        resume = kwargs.get("resume_from")
        if resume == "latest":
            resume = latest_checkpoint(out)
        if resume is not None:
            epoch, micro = self._resume(Path(resume))
            self.position = (epoch, micro)

        writer = self._tensorboard(out) if rt.is_main else None
        metrics_path = out / "metrics.jsonl"
        history: Dict[str, List[float]] = {}
        bar = self._progress(total_steps) if rt.is_main else None
        window = _Window()
        start = time.perf_counter()
        tokens_seen = 0
        eval_loss: Optional[float] = None
        eval_ppl: Optional[float] = None
        last_train_loss = float("nan")
        source.seek(epoch, micro)
        try:
            while self.global_step < total_steps:
                t_fetch = time.perf_counter()
                micro_batches = []
                for _ in range(accum):
                    batch, epoch, micro = source.next()
                    micro_batches.append(batch)
                t0 = time.perf_counter()
                stats = self._train_step(micro_batches)
                self.global_step += 1
                self.position = (epoch, micro)
                tokens_seen += int(stats["real_total"])
                window.add(stats, time.perf_counter() - t0, data_seconds=t0 - t_fetch)
                self._accumulate_routing(stats["layer_stats"][1] if stats["layer_stats"] else None)
                if self.global_step % args.logging_steps == 0 or self.global_step == total_steps:
                    record = self._log(window, epoch, metrics_path, writer, history)
                    last_train_loss = record["loss"]
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                        tok_s=f"{record['tokens_per_s']:,.0f}")
                    elif args.progress_bar and rt.is_main:
                        sys.stdout.write(f"step {self.global_step}/{total_steps}  loss {record['loss']:.4f}  "
                                         f"lr {record['lr']:.2e}  tokens/s {record['tokens_per_s']:,.0f}\n")
                        sys.stdout.flush()
                    window = _Window()
                if bar is not None:
                    bar.update(1)
                if eval_ds is not None and (self.global_step % args.eval_steps == 0 or self.global_step == total_steps):
                    ev = self.evaluate(eval_ds, batch_size=args.batch_size, num_samples=args.eval_samples)
                    eval_loss, eval_ppl = ev.loss, ev.perplexity
                    self._log_eval(ev, metrics_path, writer, history)
                if self.global_step % args.save_steps == 0 and self.global_step < total_steps:
                    self.save_checkpoint(ckpt_dir / f"step-{self.global_step:06d}", epoch, micro)
                    if rt.is_main:
                        prune_checkpoints(ckpt_dir, args.save_total_limit)
            elapsed = time.perf_counter() - start
            result = TrainingResult(
                global_step=self.global_step,
                train_loss=last_train_loss,
                eval_loss=eval_loss,
                history=history,
                checkpoint_path=str(out / "model"),
                tokens_per_second=tokens_seen / max(elapsed, 1e-9),
                total_tokens=tokens_seen,
                elapsed_seconds=elapsed,
                output_dir=str(out),
                eval_perplexity=eval_ppl,
            )
            self.save_checkpoint(out / "model", epoch, micro, metrics={"final": True},
                                 extra_files={RESULT_FILE: result.to_dict()})
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return result

    # ---- logging ----------------------------------------------------------------------
    def _tensorboard(self, out: Path):
        if not self.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            logger.warning("tensorboard is not installed; skipping event files")
            return None
        return SummaryWriter(log_dir=str(out / "tensorboard"))

    def _progress(self, total: int):
        if not self.args.progress_bar or not sys.stderr.isatty():
            return None  # not a terminal (Ray workers, CI logs): one line per logging step instead
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.global_step, desc="train", dynamic_ncols=True, leave=True)

    def _accumulate_routing(self, counts_LE: Optional[torch.Tensor]) -> None:
        if counts_LE is None:
            return
        counts_LE = counts_LE.to(torch.float64)
        self.routing_totals = counts_LE if self.routing_totals is None else self.routing_totals + counts_LE

    def _log(self, window: "_Window", epoch: int, path: Path, writer: Any, history: Dict[str, List[float]]) -> Dict[str, Any]:
        rt = self.runtime
        # loss shares sum over ranks to the global loss; label/token counts are already global
        vec = rt.all_reduce_sum(torch.tensor([window.loss_share, window.ce_sum], dtype=torch.float64))
        layer, counts = window.layer_stats, window.counts
        n = max(window.steps, 1)
        if counts is not None:
            counts = rt.all_reduce_sum(counts.to(torch.float64))  # [L, E]
            layer = rt.all_reduce_sum(layer.to(torch.float64)) / n  # [3, L]: lb, z, dropped
        record: Dict[str, Any] = {
            "step": self.global_step,
            "epoch": epoch,
            "loss": float(vec[0]) / n,
            "lm_loss": float(vec[1]) / max(window.labels, 1.0),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "grad_norm": window.grad_norm / n,
            "tokens_per_s": window.real / max(window.seconds + window.data_seconds, 1e-9),
            "data_wait_fraction": window.data_seconds / max(window.seconds + window.data_seconds, 1e-9),
            "tokens": window.real,
            "time": time.time(),
        }
        record["aux_loss"] = record["loss"] - record["lm_loss"]
        if counts is not None:
            imb, cv = load_stats(counts)
            record["moe_layers"] = [
                {
                    "layer": li,
                    "load_balancing_loss": float(layer[0, i]),
                    "router_z_loss": float(layer[1, i]),
                    "dropped_fraction": float(layer[2, i]),
                    "load_imbalance_max_mean": imb[i],
                    "load_cv": cv[i],
                    "expert_counts": [int(x) for x in counts[i].tolist()],
                }
                for i, li in enumerate(getattr(self.model, "moe_layer_indices", range(counts.shape[0])))
            ]
        if self.monitor is not None:
            try:
                record["monitor"] = self.monitor.get_current_stats().to_dict()
            except Exception as exc:  # a broken monitor never stops training
                logger.warning("expert monitor failed: %s", exc)
        if rt.is_main:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for k in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
                    writer.add_scalar(f"train/{k}", record[k], self.global_step)
                for lay in record.get("moe_layers", []):
                    for k in ("load_balancing_loss", "router_z_loss", "dropped_fraction", "load_imbalance_max_mean", "load_cv"):
                        writer.add_scalar(f"moe/layer{lay['layer']}/{k}", lay[k], self.global_step)
                mon = record.get("monitor")
                if mon:  # ExpertMonitor stats (keys: moe_lab.analytics.monitor)
                    for k in ("mean_load_imbalance", "max_load_imbalance", "num_dead_experts", "num_tokens"):
                        if isinstance(mon.get(k), (int, float)):
                            writer.add_scalar(f"monitor/{k}", mon[k], self.global_step)
                    for lay in mon.get("layers", []):
                        writer.add_scalar(f"monitor/layer{lay['layer']}/dead_experts", len(lay.get("dead_experts", [])), self.global_step)
                        for k in ("load_imbalance", "load_cv", "dropped_fraction"):
                            if isinstance(lay.get(k), (int, float)):
                                writer.add_scalar(f"monitor/layer{lay['layer']}/{k}", lay[k], self.global_step)
        for k in ("step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
            history.setdefault(k, []).append(record[k])
        if "moe_layers" in record:
            history.setdefault("load_imbalance", []).append(float(np.mean([l["load_imbalance_max_mean"] for l in record["moe_layers"]])))
            history.setdefault("dropped_fraction", []).append(float(np.mean([l["dropped_fraction"] for l in record["moe_layers"]])))
        for cb in self.step_callbacks:
            cb(dict(record))
        return record

    def _log_eval(self, ev: EvalResult, path: Path, writer: Any, history: Dict[str, List[float]]) -> None:
        history.setdefault("eval_step", []).append(self.global_step)
        history.setdefault("eval_loss", []).append(ev.loss)
        history.setdefault("eval_perplexity", []).append(ev.perplexity)
        dead = [sum(1 for c in row if c == 0) for row in ev.expert_counts]
        record = {
            "step": self.global_step,
            "eval_loss": ev.loss,
            "eval_perplexity": ev.perplexity,
            "eval_load_imbalance": ev.load_imbalance,
            "eval_dropped_fraction": ev.dropped_fraction,
            "eval_dead_experts": dead,  # per MoE layer: experts that got no eval token
            "eval_dead_expert_fraction": max(dead) / len(ev.expert_counts[0]) if dead else 0.0,
        }
        for cb in self.step_callbacks:  # callbacks see eval records too (they have "eval_loss")
            cb(dict(record))
        if self.runtime.is_main:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                writer.add_scalar("eval/loss", ev.loss, self.global_step)
                writer.add_scalar("eval/perplexity", ev.perplexity, self.global_step)

    # ---- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_dataset: Any, batch_size: int = 16, num_samples: Optional[int] = None) -> EvalResult:
        """Token-weighted LM loss (no aux loss), perplexity and routing statistics.

        The model runs in eval mode; the rows are taken in order (the first ``num_samples``).
        """
        ds = self.as_token_dataset(eval_dataset, "eval_dataset")
        rt = self.runtime
        n = len(ds) if num_samples is None else min(num_samples, len(ds))
        if n == 0:
            raise InputError("eval_dataset is empty")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64)  # ce_sum, labels
        counts = None
        dropped = None
        num_batches = 0
        per_rank = max(1, math.ceil(batch_size / rt.dp_size))
        step = per_rank * rt.dp_size
        for start in range(0, n, step):
            rows = list(range(start, min(start + step, n)))
            mine = rows[rt.dp_rank * per_rank : (rt.dp_rank + 1) * per_rank]
            fetched = _fetch_rows(ds, mine) if mine else []
            if not fetched:  # every rank must run the forward (all-to-all): a fully padded row
                fetched = [_fetch_rows(ds, [rows[0]])[0]]
                batch = self._collate(fetched)
                batch["attention_mask"].zero_()
                batch["labels"].fill_(IGNORE_INDEX)
            else:
                batch = self._collate(fetched)
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            labels = batch["labels"].to(self.device)
            with self._autocast():
                logits, info = self.model(ids, attention_mask=mask, return_routing_info=True)
            totals[0] += float(F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ))
            totals[1] += float((labels[:, 1:] != IGNORE_INDEX).sum())
            c = info["expert_counts"].detach().cpu().to(torch.float64)
            d = info["dropped_fraction"].detach().cpu().to(torch.float64)
            counts = c if counts is None else counts + c
            dropped = d if dropped is None else dropped + d
            num_batches += 1
        totals = rt.all_reduce_sum(totals)
        if counts is not None:
            counts = rt.all_reduce_sum(counts)
            dropped = rt.all_reduce_sum(dropped) / (num_batches * rt.world_size)
        self.model.train(was_training)
        loss = float(totals[0] / max(float(totals[1]), 1.0))
        imb, cv = load_stats(counts) if counts is not None and counts.numel() else ([], [])
        return EvalResult(
            loss=loss,
            perplexity=float(math.exp(min(loss, 50.0))),
            num_tokens=int(totals[1]),
            expert_counts=[[int(x) for x in row] for row in counts.tolist()] if counts is not None else [],
            load_imbalance=imb,
            load_cv=cv,
            dropped_fraction=dropped.tolist() if dropped is not None else [],
        )

    # ---- checkpoints ------------------------------------------------------------------
    def _trainer_state(self, epoch: int, micro: int) -> Dict[str, Any]:
        state = {
            "global_step": self.global_step,
            "epoch": epoch,
            "micro_batch_in_epoch": micro,
            "seed": self.args.seed,
            "batch_size": self.args.batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "total_steps": self.total_steps,
            "training_args": self.args.to_dict(),
            "rng": {
                "torch": torch.get_rng_state().tolist(),
                "python": _py_rng_state(),
                "numpy": _np_rng_state(),
            },
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        return state

    def _routing_stats(self) -> Optional[Dict[str, Any]]:
        if self.routing_totals is None:
            return None
        return {
            "moe_layer_indices": list(getattr(self.model, "moe_layer_indices", [])),
            "expert_counts": [[float(x) for x in row] for row in self.routing_totals.tolist()],
            "global_step": self.global_step,
        }

    def _write(
        self, path: Path, with_training_state: bool, epoch: int = 0, micro: int = 0,
        extra_files: Optional[Dict[str, Any]] = None,
    ) -> Path:
        """Gather the (possibly sharded) state on every rank; rank 0 writes it atomically."""
        rt = self.runtime
        model_state = rt.full_state_dict(self.model)
        opt_t = opt_m = None
        if with_training_state and self.optimizer is not None:
            opt_t, opt_m = rt.full_optimizer_state(self.model, self.optimizer)
        if rt.is_main:
            write_checkpoint(
                path,
                self.model.config,
                model_state,
                opt_t,
                opt_m,
                _scheduler_state_json(self.scheduler) if (with_training_state and self.scheduler is not None) else None,
                self._trainer_state(epoch, micro) if with_training_state else None,
                self._routing_stats(),
                tokenizer=self.tokenizer,
                extra_files=extra_files,
            )
        rt.barrier()
        return path

    def save_checkpoint(
        self,
        path: str | os.PathLike,
        epoch: int = 0,
        micro: int = 0,
        metrics: Optional[Dict[str, Any]] = None,
        extra_files: Optional[Dict[str, Any]] = None,
    ) -> Path:
        """Save model, optimiser, schedule and trainer state (a collective: all ranks call it).

        ``metrics`` travel with the checkpoint report to the launcher (Ray Train);
        ``extra_files`` are JSON files written into the checkpoint."""
        path = self._write(Path(path), True, epoch, micro, extra_files)
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
        if self.runtime.expert_slices(self.model) is None:
            load_model_state(self.model, path)
        state = load_training_state(path, self.model, self.optimizer, self.scheduler, self.runtime.expert_slices(self.model))
        if not state:
            raise InputError(f"resume_from: {path} has no trainer_state.json; it is not a training checkpoint")
        self.global_step = int(state["global_step"])
        rng = state.get("rng", {})
        if self.runtime.rank == 0 and "torch" in rng:
            torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
            _set_py_rng_state(rng.get("python"))
            _set_np_rng_state(rng.get("numpy"))
        else:
            torch.manual_seed(self.args.seed + self.runtime.rank + 7919 * self.global_step)
        routing = path / "routing_stats.json"
        if routing.exists():
            with open(routing) as f:
                self.routing_totals = torch.tensor(json.load(f)["expert_counts"], dtype=torch.float64)
        return int(state["epoch"]), int(state["micro_batch_in_epoch"])


class _Window:
    """Sums over the steps since the last log line."""

    def __init__(self) -> None:
        self.steps = 0
        self.loss_share = 0.0
        self.ce_sum = 0.0
        self.labels = 0.0
        self.real = 0.0
        self.grad_norm = 0.0
        self.seconds = 0.0
        self.data_seconds = 0.0
        self.layer_stats: Optional[torch.Tensor] = None
        self.counts: Optional[torch.Tensor] = None

    def add(self, stats: Dict[str, Any], seconds: float, data_seconds: float = 0.0) -> None:
        self.steps += 1
        self.data_seconds += data_seconds
        self.loss_share += float(stats["loss_share"])
        self.ce_sum += float(stats["ce_sum"])
        self.labels += stats["labels_total"]
        self.real += stats["real_total"]
        self.grad_norm += stats["grad_norm"]
        self.seconds += seconds
        if stats["layer_stats"] is not None:
            ls, c = stats["layer_stats"]
            self.layer_stats = ls if self.layer_stats is None else self.layer_stats + ls
            self.counts = c.to(torch.float64) if self.counts is None else self.counts + c


def _py_rng_state() -> List[Any]:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _set_py_rng_state(s: Optional[List[Any]]) -> None:
    if s:
        random.setstate((s[0], tuple(s[1]), s[2]))


def _np_rng_state() -> List[Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _set_np_rng_state(s: Optional[List[Any]]) -> None:
    if s:
        np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
