"""Turn the many accepted input forms of the analytics into padded token batches.

Internal. Accepted inputs (``TokenSource`` below):
- a [B, S] integer tensor (+ optional ``attention_mask``): one batch, as given;
- a dict batch ``{"input_ids": [B, S] tensor or list of lists, "attention_mask": ...}``;
- a str or a list of str: each text is tokenized (no special tokens) and cut into chunks of
  ``max_length`` tokens (no text is dropped, no two texts share a sequence);
- a list of row dicts with ``input_ids`` (and a label key);
- a ``datasets.Dataset`` with ``input_ids`` (one sequence per row, cut into chunks of
  ``max_length``) or with a text column (tokenized as above);
- a dict of columns ``{"text": [...], "domain": [...]}``.

``num_samples`` keeps at most that many sequences, evenly spaced over the source (so a
sorted dataset still contributes every part): first that many rows are picked, then, when
long rows were cut into several sequences, that many of the sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Sequence

import torch

from ..errors import InputError


@dataclass
class TokenBatch:
    """One padded batch. ``labels`` has one entry per row when labels were asked for."""

    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: Optional[torch.Tensor]  # [B, S] 0/1, None = all real
    labels: Optional[List[Any]]  # [B]


@dataclass
class _Rows:
    """Token rows (lists of ids) with one label per row (or None)."""

    ids: List[List[int]]
    labels: Optional[List[Any]]


def evenly_spaced(num_rows: int, num_samples: Optional[int]) -> List[int]:
    """``num_samples`` row indices spread evenly over ``range(num_rows)`` (all when None/larger)."""
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise InputError(f"num_samples must be a positive int or None, got {num_samples!r}")
    if num_samples is None or num_samples >= num_rows:
        return list(range(num_rows))
    return [int(i * num_rows / num_samples) for i in range(num_samples)]


def _chunks(ids: Sequence[int], max_length: int) -> List[List[int]]:
    ids = [int(t) for t in ids]
    return [ids[i : i + max_length] for i in range(0, len(ids), max_length)]


def _tokenize(texts: List[Any], tokenizer: Any) -> List[List[int]]:
    bad = [i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)]
    if bad:
        raise InputError(f"text rows must be strings; row {bad[0]} is {type(texts[bad[0]]).__name__}")
    keep = [i for i, t in enumerate(texts) if t is not None and t.strip()]
    out: List[List[int]] = [[] for _ in texts]
    if keep:
        encoded = tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"]
        for i, ids in zip(keep, encoded):
            out[i] = list(ids)
    return out


def _columns_rows(
    columns: Mapping[str, Sequence[Any]],
    num_rows: int,
    tokenizer: Any,
    max_length: int,
    label_column: Optional[str],
    text_column: str,
    num_samples: Optional[int],
    source: str,
) -> _Rows:
    names = list(columns.keys()) if not hasattr(columns, "column_names") else list(columns.column_names)
    if num_rows == 0:
        raise InputError(f"{source} is empty (0 rows)")
    if label_column is not None and label_column not in names:
        raise InputError(
            f"{source} has no label column {label_column!r}; its columns are {names}. "
            "Pass label_column=<one of them>"
        )
    if "input_ids" in names:
        kind = "input_ids"
    elif text_column in names:
        kind = text_column
    else:
        raise InputError(f"{source} has neither an 'input_ids' nor a {text_column!r} column; its columns are {names}")
    index = evenly_spaced(num_rows, num_samples)
    if hasattr(columns, "select") and hasattr(columns, "column_names"):  # datasets.Dataset
        sub = columns.select(index)
        values = sub[kind]
        labels = sub[label_column] if label_column is not None else None
    else:
        values = [columns[kind][i] for i in index]
        labels = [columns[label_column][i] for i in index] if label_column is not None else None
    if kind != "input_ids":
        docs = _tokenize(list(values), tokenizer)
    elif "attention_mask" in names:  # padded rows: keep the real tokens only
        masks = sub["attention_mask"] if hasattr(columns, "select") else [columns["attention_mask"][i] for i in index]
        docs = [[int(t) for t, m in zip(v, mk) if m] for v, mk in zip(values, masks)]
    else:
        docs = [list(v) for v in values]
    ids: List[List[int]] = []
    out_labels: Optional[List[Any]] = [] if labels is not None else None
    for j, doc in enumerate(docs):
        for chunk in _chunks(doc, max_length):
            ids.append(chunk)
            if out_labels is not None:
                out_labels.append(labels[j])
    if not ids:
        raise InputError(f"{source} has no tokens: all {len(index)} selected rows are empty")
    if num_samples is not None and len(ids) > num_samples:  # long rows gave several sequences
        keep = evenly_spaced(len(ids), num_samples)
        ids = [ids[i] for i in keep]
        out_labels = [out_labels[i] for i in keep] if out_labels is not None else None
    return _Rows(ids, out_labels)


def token_rows(
    inputs: Any,
    tokenizer: Any,
    max_length: int,
    label_column: Optional[str] = None,
    text_column: str = "text",
    labels: Optional[Sequence[Any]] = None,
    num_samples: Optional[int] = None,
) -> _Rows:
    """Rows of token ids (and labels) from any row-like source (see the module docstring)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if hasattr(inputs, "column_names") and hasattr(inputs, "select"):  # datasets.Dataset
        return _columns_rows(inputs, len(inputs), tokenizer, max_length, label_column, text_column, num_samples,
                             "dataset")
    if isinstance(inputs, Mapping):
        if inputs and all(hasattr(v, "column_names") for v in inputs.values()):
            raise InputError(
                f"expected one split of a dataset, got a {type(inputs).__name__} with splits {list(inputs)}; "
                "pass one split, e.g. dataset['validation']"
            )
        if not inputs:
            raise InputError("inputs is an empty dict")
        lengths = {k: len(v) for k, v in inputs.items()}
        if len(set(lengths.values())) > 1:
            raise InputError(f"the columns have different lengths: {lengths}")
        n = next(iter(lengths.values()))
        return _columns_rows(inputs, n, tokenizer, max_length, label_column, text_column, num_samples, "dataset")
    if isinstance(inputs, (list, tuple)):
        if len(inputs) == 0:
            raise InputError("inputs is an empty list")
        if all(isinstance(t, str) for t in inputs):
            if labels is not None and len(labels) != len(inputs):
                raise InputError(f"labels has {len(labels)} entries but there are {len(inputs)} texts")
            if label_column is not None and labels is None:
                raise InputError(
                    f"a list of texts has no {label_column!r} labels; pass labels=[one label per text] or a dataset "
                    f"with a {label_column!r} column"
                )
            cols = {text_column: list(inputs)}
            if labels is not None:
                cols["__label__"] = list(labels)
            return _columns_rows(cols, len(inputs), tokenizer, max_length, "__label__" if labels is not None else None,
                                 text_column, num_samples, "texts")
        if all(isinstance(r, Mapping) for r in inputs):
            keys = set(inputs[0])
            if "input_ids" not in keys and text_column not in keys:
                raise InputError(f"rows must have 'input_ids' or {text_column!r}; row 0 has keys {sorted(keys)}")
            cols = {k: [r.get(k) for r in inputs] for k in keys}
            return _columns_rows(cols, len(inputs), tokenizer, max_length, label_column, text_column, num_samples,
                                 "rows")
        if all(isinstance(r, (list, tuple)) for r in inputs):
            return _columns_rows({"input_ids": list(inputs)}, len(inputs), tokenizer, max_length, None, text_column,
                                 num_samples, "rows")
    raise InputError(
        "inputs must be a [batch, seq] tensor, a dict batch with input_ids, a str or list of str, a list of row "
        f"dicts, or a datasets.Dataset; got {type(inputs).__name__}"
    )


def iter_batches(rows: _Rows, batch_size: int, pad_token_id: int) -> Iterator[TokenBatch]:
    """Right-padded batches of ``batch_size`` rows (rows sorted by length to limit padding)."""
    order = sorted(range(len(rows.ids)), key=lambda i: len(rows.ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seq = max(len(rows.ids[i]) for i in idx)
        ids = torch.full((len(idx), seq), pad_token_id, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(idx), seq), dtype=torch.long)  # [B, S]
        for b, i in enumerate(idx):
            n = len(rows.ids[i])
            ids[b, :n] = torch.tensor(rows.ids[i], dtype=torch.long)
            mask[b, :n] = 1
        labels = [rows.labels[i] for i in idx] if rows.labels is not None else None
        yield TokenBatch(ids, None if bool(mask.all()) else mask, labels)


def tensor_batch(inputs: Any, attention_mask: Optional[torch.Tensor]) -> Optional[TokenBatch]:
    """A single batch when ``inputs`` is a tensor or a dict batch of tensors; else None."""
    if isinstance(inputs, torch.Tensor):
        ids, mask = inputs, attention_mask
    elif isinstance(inputs, Mapping) and isinstance(inputs.get("input_ids"), torch.Tensor):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", attention_mask)
    else:
        return None
    if ids.dim() == 1:
        raise InputError(f"input_ids must have shape [batch, seq], got {tuple(ids.shape)} (use ids.unsqueeze(0))")
    if ids.dim() != 2:
        raise InputError(f"input_ids must have shape [batch, seq], got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise InputError(f"input_ids is empty (shape {tuple(ids.shape)})")
    if mask is not None and not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    return TokenBatch(ids, mask, None)
