"""Metrics: names defined once, routing-load statistics, the records, and where they go.

The trainer writes records with these keys (``metrics.jsonl``, TensorBoard, callbacks); Ray
Tune trials report them; analytics and the sweep tables read them. Rename one here and every
reader follows; a string literal elsewhere is a bug.

    from moe_lab.training import metrics as M
    record[M.EVAL_LOSS], record[M.MOE_LAYERS][0][M.LOAD_IMBALANCE]
    imbalance_L, cv_L = load_stats(expert_counts_LE)        # per MoE layer

Sinks share one protocol (:class:`MetricsSink`: ``write(record)``, ``close()``): the run's
history, ``metrics.jsonl``, TensorBoard, a progress bar, user callbacks, and MLflow when it is
installed and ``training.mlflow_tracking_uri`` is set (a local ``file:`` store needs no server).

Shape letters: L MoE layers, E experts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

logger = logging.getLogger(__name__)

# ---- a train record (one line of metrics.jsonl per logging step) -------------------------
STEP = "step"  #: optimizer steps done
EPOCH = "epoch"
LOSS = "loss"  #: LM loss + weighted aux losses, token-weighted over the logging window
LM_LOSS = "lm_loss"  #: next-token cross-entropy (nats/token)
AUX_LOSS = "aux_loss"  #: LOSS - LM_LOSS
LR = "lr"
GRAD_NORM = "grad_norm"  #: before clipping
TOKENS_PER_S = "tokens_per_s"  #: real (non-padding) tokens per second, data wait included
DATA_WAIT_FRACTION = "data_wait_fraction"  #: share of the window spent waiting for batches
TOKENS = "tokens"  #: real tokens in the window
TIME = "time"  #: unix time of the record
MOE_LAYERS = "moe_layers"  #: list of per-layer dicts (keys below)
MONITOR = "monitor"  #: ExpertMonitor stats, when a monitor is attached

# ---- per MoE layer, inside MOE_LAYERS ----------------------------------------------------
LAYER = "layer"  #: transformer layer index
LOAD_BALANCING_LOSS = "load_balancing_loss"
ROUTER_Z_LOSS = "router_z_loss"
DROPPED_FRACTION = "dropped_fraction"
LOAD_IMBALANCE = "load_imbalance_max_mean"  #: max / mean of the expert counts
LOAD_CV = "load_cv"  #: std / mean of the expert counts
EXPERT_COUNTS = "expert_counts"
ROUTER_BIAS = "router_bias"  #: the aux-loss-free balancing bias per expert, when the router has one

# ---- an eval record ------------------------------------------------------------------------
EVAL_LOSS = "eval_loss"
EVAL_PERPLEXITY = "eval_perplexity"
EVAL_LOAD_IMBALANCE = "eval_load_imbalance"  #: per MoE layer
EVAL_DROPPED_FRACTION = "eval_dropped_fraction"  #: per MoE layer
EVAL_DEAD_EXPERTS = "eval_dead_experts"  #: per MoE layer: experts that got no eval token
EVAL_DEAD_EXPERT_FRACTION = "eval_dead_expert_fraction"  #: max over layers of dead / E

# ---- the history a TrainingResult carries (one value per logged step) --------------------
EVAL_STEP = "eval_step"  #: the step of each eval value
#: history keys of the routing health, averaged over MoE layers
HISTORY_LOAD_IMBALANCE = "load_imbalance"
HISTORY_DROPPED_FRACTION = "dropped_fraction"
#: train-record keys copied into the history at each logging step
HISTORY_TRAIN_KEYS = (STEP, LOSS, LM_LOSS, AUX_LOSS, LR, GRAD_NORM, TOKENS_PER_S)
#: scalar train-record keys written to TensorBoard as ``train/<key>``
SCALAR_TRAIN_KEYS = (LOSS, LM_LOSS, AUX_LOSS, LR, GRAD_NORM, TOKENS_PER_S)
#: per-layer keys written to TensorBoard as ``moe/layer<i>/<key>``
SCALAR_LAYER_KEYS = (LOAD_BALANCING_LOSS, ROUTER_Z_LOSS, DROPPED_FRACTION, LOAD_IMBALANCE, LOAD_CV)


def load_stats(counts_LE: torch.Tensor) -> Tuple[List[float], List[float]]:
    """Per-layer ``max / mean`` and coefficient of variation (population std / mean) of
    expert counts ``[L, E]`` (or ``[E]`` for one layer). 0 for a layer with no tokens."""
    c = torch.as_tensor(counts_LE, dtype=torch.float64)
    if c.dim() == 1:
        c = c.unsqueeze(0)
    mean = c.mean(dim=-1)
    safe = mean.clamp(min=1e-12)
    imbalance = torch.where(mean > 0, c.max(dim=-1).values / safe, torch.zeros_like(mean))
    cv = torch.where(mean > 0, c.std(dim=-1, unbiased=False) / safe, torch.zeros_like(mean))
    return imbalance.tolist(), cv.tolist()


def dead_experts(counts_E: Sequence[float]) -> List[int]:
    """Experts that got no token."""
    return [e for e, c in enumerate(counts_E) if c == 0]


# ---------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------


class MetricsWindow:
    """Sums of :class:`~moe_lab.training.step.StepStats` over the steps since the last log line."""

    def __init__(self) -> None:
        self.steps = 0
        self.loss_share = self.ce_sum = self.labels = self.real = self.grad_norm = 0.0
        self.seconds = self.data_seconds = 0.0
        self.layer_stats_3L: Optional[torch.Tensor] = None
        self.counts_LE: Optional[torch.Tensor] = None

    def add(self, stats: Any, seconds: float, data_seconds: float = 0.0) -> None:
        self.steps += 1
        self.seconds += seconds
        self.data_seconds += data_seconds
        self.loss_share += stats.loss_share
        self.ce_sum += stats.ce_sum
        self.labels += stats.labels_total
        self.real += stats.real_total
        self.grad_norm += stats.grad_norm
        if stats.layer_stats_3L is not None:
            ls, c = stats.layer_stats_3L, stats.expert_counts_LE.to(torch.float64)
            self.layer_stats_3L = ls if self.layer_stats_3L is None else self.layer_stats_3L + ls
            self.counts_LE = c if self.counts_LE is None else self.counts_LE + c

    def record(
        self,
        step: int,
        epoch: int,
        lr: float,
        all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
        moe_layer_indices: Sequence[int],
    ) -> Dict[str, Any]:
        """The train record of this window (a collective under data parallelism: every rank calls it)."""
        # loss shares sum over ranks to the global loss; label/token counts are already global
        vec = all_reduce_sum(torch.tensor([self.loss_share, self.ce_sum], dtype=torch.float64))
        n = max(self.steps, 1)
        busy = max(self.seconds + self.data_seconds, 1e-9)
        record: Dict[str, Any] = {
            STEP: step,
            EPOCH: epoch,
            LOSS: float(vec[0]) / n,
            LM_LOSS: float(vec[1]) / max(self.labels, 1.0),
            LR: lr,
            GRAD_NORM: self.grad_norm / n,
            TOKENS_PER_S: self.real / busy,
            DATA_WAIT_FRACTION: self.data_seconds / busy,
            TOKENS: self.real,
            TIME: time.time(),
        }
        record[AUX_LOSS] = record[LOSS] - record[LM_LOSS]
        if self.counts_LE is not None:
            counts = all_reduce_sum(self.counts_LE.to(torch.float64))  # [L, E]
            layer = all_reduce_sum(self.layer_stats_3L.to(torch.float64)) / n  # [3, L]: lb, z, dropped
            imbalance, cv = load_stats(counts)
            record[MOE_LAYERS] = [
                {
                    LAYER: li,
                    LOAD_BALANCING_LOSS: float(layer[0, i]),
                    ROUTER_Z_LOSS: float(layer[1, i]),
                    DROPPED_FRACTION: float(layer[2, i]),
                    LOAD_IMBALANCE: imbalance[i],
                    LOAD_CV: cv[i],
                    EXPERT_COUNTS: [int(x) for x in counts[i].tolist()],
                }
                for i, li in enumerate(list(moe_layer_indices) or range(counts.shape[0]))
            ]
        return record


def eval_record(step: int, ev: Any) -> Dict[str, Any]:
    """The eval record of an :class:`~moe_lab.training.results.EvalResult` at ``step``."""
    dead = [len(dead_experts(row)) for row in ev.expert_counts]
    return {
        STEP: step,
        EVAL_LOSS: ev.loss,
        EVAL_PERPLEXITY: ev.perplexity,
        EVAL_LOAD_IMBALANCE: ev.load_imbalance,
        EVAL_DROPPED_FRACTION: ev.dropped_fraction,
        EVAL_DEAD_EXPERTS: dead,
        EVAL_DEAD_EXPERT_FRACTION: max(dead) / len(ev.expert_counts[0]) if dead else 0.0,
    }


def is_eval_record(record: Dict[str, Any]) -> bool:
    return EVAL_LOSS in record


# ---------------------------------------------------------------------------------------
# sinks
# ---------------------------------------------------------------------------------------


@runtime_checkable
class MetricsSink(Protocol):
    """Where records go. ``write`` gets every train and eval record (eval records have
    :data:`EVAL_LOSS`); ``close`` is called once at the end of training."""

    def write(self, record: Dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class HistorySink:
    """The ``history`` of a TrainingResult: one value per logged step (and per eval)."""

    def __init__(self) -> None:
        self.history: Dict[str, List[float]] = {}

    def write(self, record: Dict[str, Any]) -> None:
        h = self.history
        if is_eval_record(record):
            h.setdefault(EVAL_STEP, []).append(record[STEP])
            h.setdefault(EVAL_LOSS, []).append(record[EVAL_LOSS])
            h.setdefault(EVAL_PERPLEXITY, []).append(record[EVAL_PERPLEXITY])
            return
        for k in HISTORY_TRAIN_KEYS:
            h.setdefault(k, []).append(record[k])
        layers = record.get(MOE_LAYERS)
        if layers:
            h.setdefault(HISTORY_LOAD_IMBALANCE, []).append(sum(lay[LOAD_IMBALANCE] for lay in layers) / len(layers))
            h.setdefault(HISTORY_DROPPED_FRACTION, []).append(sum(lay[DROPPED_FRACTION] for lay in layers) / len(layers))

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON line per record (``metrics.jsonl``), appended, flushed per line."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard scalars: ``train/<key>``, ``moe/layer<i>/<key>``, ``eval/...``, ``monitor/...``."""

    def __init__(self, log_dir: Union[str, os.PathLike]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: Dict[str, Any]) -> None:
        w, step = self.writer, record[STEP]
        if is_eval_record(record):
            w.add_scalar("eval/loss", record[EVAL_LOSS], step)
            w.add_scalar("eval/perplexity", record[EVAL_PERPLEXITY], step)
            return
        for k in SCALAR_TRAIN_KEYS:
            w.add_scalar(f"train/{k}", record[k], step)
        for lay in record.get(MOE_LAYERS, []):
            for k in SCALAR_LAYER_KEYS:
                w.add_scalar(f"moe/layer{lay[LAYER]}/{k}", lay[k], step)
        mon = record.get(MONITOR)
        if mon:  # ExpertMonitor stats (keys: moe_lab.analytics.monitor)
            for k in ("mean_load_imbalance", "max_load_imbalance", "num_dead_experts", "num_tokens"):
                if isinstance(mon.get(k), (int, float)):
                    w.add_scalar(f"monitor/{k}", mon[k], step)
            for lay in mon.get("layers", []):
                w.add_scalar(f"monitor/layer{lay['layer']}/dead_experts", len(lay.get("dead_experts", [])), step)
                for k in ("load_imbalance", "load_cv", "dropped_fraction"):
                    if isinstance(lay.get(k), (int, float)):
                        w.add_scalar(f"monitor/layer{lay['layer']}/{k}", lay[k], step)

    def close(self) -> None:
        self.writer.close()


class ProgressSink:
    """A tqdm bar on a terminal; otherwise (Ray workers, CI logs) one line per logging step."""

    def __init__(self, total_steps: int, initial_step: int = 0) -> None:
        self.total = total_steps
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True, leave=True)

    def write(self, record: Dict[str, Any]) -> None:
        if is_eval_record(record):
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record[LOSS]:.4f}", lr=f"{record[LR]:.2e}", tok_s=f"{record[TOKENS_PER_S]:,.0f}")
            self.bar.update(record[STEP] - self.bar.n)
            return
        sys.stdout.write(f"step {record[STEP]}/{self.total}  loss {record[LOSS]:.4f}  lr {record[LR]:.2e}  "
                         f"tokens/s {record[TOKENS_PER_S]:,.0f}\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CallbackSink:
    """Calls each ``callback(record)`` with a copy of every record (on every rank)."""

    def __init__(self, callbacks: Sequence[Callable[[Dict[str, Any]], None]]) -> None:
        self.callbacks = list(callbacks)

    def write(self, record: Dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(dict(record))

    def close(self) -> None:
        pass


class MLflowSink:
    """MLflow metrics and parameters (needs ``pip install mlflow-skinny`` or ``mlflow``).

    ``tracking_uri``: a server (``http://...``), a database, or a local directory
    (``file:./mlruns``, no server; MLflow keeps that store in maintenance mode, so this sink
    sets ``MLFLOW_ALLOW_FILE_STORE=true`` for ``file:`` URIs). One run per training call.
    """

    def __init__(self, tracking_uri: str, experiment: str = "moe-lab", run_name: Optional[str] = None,
                 params: Optional[Dict[str, Any]] = None) -> None:
        if tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        for k, v in sorted((params or {}).items()):
            self.client.log_param(self.run_id, k, v)

    def write(self, record: Dict[str, Any]) -> None:
        step = int(record[STEP])
        if is_eval_record(record):
            values = {EVAL_LOSS: record[EVAL_LOSS], EVAL_PERPLEXITY: record[EVAL_PERPLEXITY],
                      EVAL_DEAD_EXPERT_FRACTION: record[EVAL_DEAD_EXPERT_FRACTION]}
        else:
            values = {k: record[k] for k in SCALAR_TRAIN_KEYS}
            for lay in record.get(MOE_LAYERS, []):
                values.update({f"layer{lay[LAYER]}.{k}": lay[k] for k in SCALAR_LAYER_KEYS})
        ts = int(time.time() * 1000)
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


class MetricsLogger:
    """Fans each record out to its sinks, in order."""

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self.sinks = list(sinks)

    def write(self, record: Dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # closing never hides the training result
                logger.warning("metrics sink %s failed to close: %s", type(sink).__name__, exc)
