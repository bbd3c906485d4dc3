"""Collate packed rows into a padded language-model batch (pure function, no datasets).

Usage::

    from torch.utils.data import DataLoader
    from moe_lab.data import collate_moe_batch

    loader = DataLoader(packed, batch_size=8, collate_fn=collate_moe_batch)
    batch = next(iter(loader))
    batch["input_ids"]       # [batch, seq] int64, right-padded with pad_token_id
    batch["attention_mask"]  # [batch, seq] int64, 1 on real tokens
    batch["labels"]          # [batch, seq] int64, IGNORE_INDEX (-100) on padding
    batch["domain"]          # list of labels, passed through as is

Labels are not shifted: the model shifts them, as in transformers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..constants import IGNORE_INDEX
from ..errors import ConfigError, InputError

_COMPUTED_KEYS = ("input_ids", "attention_mask", "labels")


def _row_ids(row: Any, index: int) -> torch.Tensor:
    if not isinstance(row, dict) or "input_ids" not in row:
        got = f"keys {list(row)}" if isinstance(row, dict) else type(row).__name__
        raise InputError(f"batch row {index} must be a dict with 'input_ids', got {got}")
    ids = row["input_ids"]
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"batch row {index}: input_ids is not a sequence of ints ({error})") from error
    if ids.dim() != 1 or ids.numel() == 0:
        raise InputError(
            f"batch row {index}: input_ids must be a non-empty 1-D sequence, got shape "
            f"{tuple(ids.shape)}"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(f"batch row {index}: input_ids must hold ints, got dtype {ids.dtype}")
    return ids.long()


def collate_moe_batch(
    batch: Sequence[Dict[str, Any]],
    pad_token_id: int = 0,
    max_length: Optional[int] = None,
) -> Dict[str, Any]:
    """Right-pad rows of token ids to the longest row of the batch.

    Args:
        batch: rows ``{"input_ids": list[int] | 1-D tensor, <label>: ..., ...}``.
        pad_token_id: id written on padding positions of ``input_ids``.
        max_length: rows longer than this are truncated to it.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each [batch, seq] int64, plus
        every other key of the rows as a list (e.g. ``domain``).
    """
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ConfigError(f"max_length must be a positive int or None, got {max_length!r}")
    if isinstance(batch, dict) or not isinstance(batch, Sequence) or len(batch) == 0:
        raise InputError(
            f"batch must be a non-empty list of row dicts, got {type(batch).__name__}"
            + (" of length 0" if isinstance(batch, Sequence) and len(batch) == 0 else "")
        )

    rows = [_row_ids(row, i) for i, row in enumerate(batch)]
    if max_length is not None:
        rows = [ids[:max_length] for ids in rows]
    seq_len = max(len(ids) for ids in rows)

    input_ids = torch.full((len(rows), seq_len), pad_token_id, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)  # [batch, seq]
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # [batch, seq]

    out: Dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }
    extra_keys: List[str] = [key for key in batch[0] if key not in _COMPUTED_KEYS]
    for key in extra_keys:
        out[key] = [row.get(key) for row in batch]
    return out
