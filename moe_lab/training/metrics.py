"""Metric names and routing-load statistics, defined once.

The trainer writes records with these keys (``metrics.jsonl``, TensorBoard, callbacks); Ray
Tune trials report them; analytics and the sweep tables read them. Rename one here and every
reader follows; a string literal elsewhere is a bug.

    from moe_lab.training import metrics as M
    record[M.EVAL_LOSS], record[M.MOE_LAYERS][0][M.LOAD_IMBALANCE]
    imbalance_L, cv_L = load_stats(expert_counts_LE)        # per MoE layer

Shape letters: L MoE layers, E experts.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

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
