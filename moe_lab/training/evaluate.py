"""Evaluation: token-weighted LM loss (no aux loss), perplexity and routing statistics.

    ev = evaluate_model(model, dataset, collate, settings, runtime, batch_size=16, num_samples=256)

The model runs in eval mode (no token dropping, see :mod:`moe_lab.model.routers`); rows are
taken in order (the first ``num_samples``) and split over the data-parallel ranks. Every rank
runs every forward (expert parallelism needs all ranks in each all-to-all): a rank with no
row left runs one fully padded row, which counts for nothing.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..constants import IGNORE_INDEX
from ..errors import ConfigError, InputError
from .batches import fetch_rows
from .fast_paths import lm_loss_sum
from .metrics import load_stats
from .results import EvalResult
from .runtime import Runtime
from .step import StepSettings


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: Any,
    collate: Callable[[List[Dict[str, Any]]], Dict[str, Any]],
    settings: StepSettings,
    runtime: Optional[Runtime] = None,
    batch_size: int = 16,
    num_samples: Optional[int] = None,
) -> EvalResult:
    """See the module docstring. ``dataset`` holds token rows (``input_ids``)."""
    rt = runtime or Runtime()
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    if n == 0:
        raise InputError("eval_dataset is empty")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # ce_sum, labels
    counts_LE = dropped_L = None
    num_batches = 0
    per_rank = max(1, math.ceil(batch_size / rt.dp_size))
    step = per_rank * rt.dp_size
    dev = settings.device
    for start in range(0, n, step):
        rows = list(range(start, min(start + step, n)))
        mine = rows[rt.dp_rank * per_rank : (rt.dp_rank + 1) * per_rank]
        if mine:
            batch = collate(fetch_rows(dataset, mine))
        else:  # every rank must run the forward (all-to-all): a fully padded row
            batch = collate(fetch_rows(dataset, [rows[0]]))
            batch["attention_mask"].zero_()
            batch["labels"].fill_(IGNORE_INDEX)
        labels = batch["labels"].to(dev)
        pipeline = getattr(rt, "pipeline", None)
        if pipeline is not None:  # pipeline stages: one after another (moe_lab.parallel.pipeline)
            logits, info = pipeline.forward(model, batch["input_ids"].to(dev), batch["attention_mask"].to(dev), settings)
        else:
            with settings.autocast():
                logits, info = model(batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                                     return_routing_info=True)
        totals[0] += float(lm_loss_sum(logits, labels))
        totals[1] += float((labels[:, 1:] != IGNORE_INDEX).sum())
        c = info["expert_counts"].detach().cpu().to(torch.float64)
        d = info["dropped_fraction"].detach().cpu().to(torch.float64)
        counts_LE = c if counts_LE is None else counts_LE + c
        dropped_L = d if dropped_L is None else dropped_L + d
        num_batches += 1
    totals = rt.all_reduce_sum(totals)
    if counts_LE is not None:
        counts_LE = rt.all_reduce_sum(counts_LE)
        dropped_L = rt.all_reduce_sum(dropped_L) / (num_batches * rt.dp_size)  # summed over the data-parallel ranks
    model.train(was_training)
    loss = float(totals[0] / max(float(totals[1]), 1.0))
    imbalance, cv = load_stats(counts_LE) if counts_LE is not None and counts_LE.numel() else ([], [])
    return EvalResult(
        loss=loss,
        perplexity=float(math.exp(min(loss, 50.0))),
        num_tokens=int(totals[1]),
        expert_counts=[[int(x) for x in row] for row in counts_LE.tolist()] if counts_LE is not None else [],
        load_imbalance=imbalance,
        load_cv=cv,
        dropped_fraction=dropped_L.tolist() if dropped_L is not None else [],
    )
