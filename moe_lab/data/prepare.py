"""Load local text data, tokenize it and pack it into fixed-length blocks for training.

Usage::

    from moe_lab.data import build_corpus, load_text_dataset, prepare_moe_dataset

    raw = build_corpus()                             # or load_text_dataset("data/*.jsonl")
    packed, stats = prepare_moe_dataset(raw, max_length=256, return_stats=True)
    packed[0]["input_ids"]                            # 256 token ids
    packed[0]["domain"]                               # every block has a single domain

Packing follows :mod:`moe_lab.data.pack` (the same functions pack the Ray Data stream):
rows without usable text are dropped; each document is tokenized (no special tokens) and
followed by ``<eos>``; the documents of one label (``domain``) inside a group of
``PACK_GROUP_ROWS`` consecutive documents are concatenated and cut into blocks of
``max_length`` tokens, and the leftover at the end becomes one shorter block if it has at
least 2 tokens. A tokenizer without an EOS token cannot separate documents: then each
document becomes one block of its first ``max_length`` tokens (logged once per call).
Tokenizing runs in ``num_proc`` processes (capped at the CPU count and the number of rows;
one process where Ray runs, since forking a Ray process can hang it); packing always runs in
one process, so the result does not depend on ``num_proc``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import datasets
import pyarrow.compute as pc

from ..errors import ConfigError, InputError
from .collate import collate_moe_batch
from .pack import PACK_GROUP_ROWS, as_text, check_max_length, pack_documents, tokenize_documents
from .tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = ["PACK_GROUP_ROWS", "PrepareStats", "collate_moe_batch", "load_text_dataset", "prepare_moe_dataset"]

#: file extension -> datasets builder
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_IDS = "_moe_lab_ids"
_NUM_TOKENS = "_moe_lab_num_tokens"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class PrepareStats:
    """What :func:`prepare_moe_dataset` did."""

    num_documents: int  # rows tokenized and packed
    num_skipped: int  # empty, whitespace-only, None or non-text rows
    num_blocks: int  # rows of the packed dataset
    num_tokens: int  # tokens in all blocks (eos tokens included)


# ---------------------------------------------------------------------------------------
# Loading local files
# ---------------------------------------------------------------------------------------


def _collect_files(path_or_paths: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        paths = [path_or_paths]
    elif isinstance(path_or_paths, Sequence) and path_or_paths:
        paths = list(path_or_paths)
    else:
        raise InputError(f"expected a path or a non-empty list of paths, got {path_or_paths!r}")

    files: List[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise InputError(f"data path {str(path)!r} does not exist")
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in BUILDERS)
            if not found:
                raise InputError(
                    f"data directory {str(path)!r} holds no file with a supported extension "
                    f"{sorted(BUILDERS)}"
                )
            files += found
        elif path.suffix.lower() not in BUILDERS:
            raise InputError(
                f"unsupported data file {str(path)!r}: the extension must be one of "
                f"{sorted(BUILDERS)}"
            )
        else:
            files.append(path)
    return files


def load_text_dataset(
    path_or_paths: Union[PathLike, Sequence[PathLike]],
    text_column: str = "text",
    split: str = "train",
    cache_dir: Optional[PathLike] = None,
) -> datasets.Dataset:
    """Load local text files as one ``datasets.Dataset`` (no network access).

    Args:
        path_or_paths: a file, a directory (its supported files, sorted by name) or a list
            of those. ``.txt``/``.text`` give one row per line in column ``text``;
            ``.jsonl``/``.json``, ``.parquet`` and ``.csv`` keep their columns.
        text_column: the column that must hold the text.
        split: name of the split to build.
        cache_dir: Arrow cache of ``datasets`` (default: its own, ``~/.cache/huggingface``).

    Returns:
        The dataset. Files of different formats are concatenated on the columns they share.
    """
    files = _collect_files(path_or_paths)
    by_builder: Dict[str, List[str]] = {}
    for f in files:
        by_builder.setdefault(BUILDERS[f.suffix.lower()], []).append(str(f))

    parts = []
    for builder, builder_files in by_builder.items():
        try:
            part = datasets.load_dataset(
                builder,
                data_files={split: builder_files},
                split=split,
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
        except Exception as error:  # malformed files surface as many exception types
            raise InputError(
                f"cannot load {builder} files {builder_files}: {type(error).__name__}: {error}"
            ) from error
        if text_column not in part.column_names:
            raise InputError(
                f"text_column {text_column!r} is not in {builder_files}; its columns are "
                f"{part.column_names}"
            )
        parts.append(part)

    if len(parts) == 1:
        return parts[0]
    common = [
        name for name in parts[0].column_names
        if all(name in p.features and p.features[name] == parts[0].features[name] for p in parts)
    ]
    if text_column not in common:
        raise InputError(f"text_column {text_column!r} has different types across the files {files}")
    return datasets.concatenate_datasets([p.select_columns(common) for p in parts])


# ---------------------------------------------------------------------------------------
# Tokenize and pack
# ---------------------------------------------------------------------------------------


def _tokenize_batch(
    batch: Dict[str, List[Any]], tokenizer: Any, text_column: str, label_column: Optional[str]
) -> Dict[str, list]:
    """Rows with usable text -> their token ids (and label); other rows are dropped here."""
    texts = [as_text(value) for value in batch[text_column]]
    keep = [i for i, text in enumerate(texts) if text is not None]
    ids_DT = tokenize_documents([texts[i] for i in keep], tokenizer)
    out: Dict[str, list] = {_IDS: ids_DT, _NUM_TOKENS: [len(ids_T) for ids_T in ids_DT]}
    if label_column:
        out[label_column] = [batch[label_column][i] for i in keep]
    return out


def _pack_batch(
    batch: Dict[str, List[Any]], max_length: int, eos_token_id: Optional[int], label_column: Optional[str]
) -> Dict[str, list]:
    """One packing group (``PACK_GROUP_ROWS`` documents) -> its blocks."""
    ids_BL, labels_B = pack_documents(
        batch[_IDS], max_length, eos_token_id, batch[label_column] if label_column else None
    )
    out: Dict[str, list] = {"input_ids": ids_BL}
    if label_column:
        out[label_column] = labels_B
    return out


def _to_dataset(dataset: Any, text_column: str) -> datasets.Dataset:
    """A ``datasets.Dataset`` from a Dataset, a list of strings or a dict of columns."""
    if isinstance(dataset, datasets.Dataset):
        return dataset
    if isinstance(dataset, datasets.DatasetDict):
        raise InputError(
            f"expected a datasets.Dataset, got a DatasetDict with splits {list(dataset)}; "
            "pass one split, e.g. dataset['train']"
        )
    if isinstance(dataset, dict):
        if text_column not in dataset:
            raise InputError(
                f"text_column {text_column!r} is not in the dataset; its columns are {list(dataset)}"
            )
        columns = dict(dataset)
        columns[text_column] = [as_text(value) for value in columns[text_column]]
    elif isinstance(dataset, (list, tuple)):
        columns = {text_column: [as_text(value) for value in dataset]}
    else:
        raise InputError(
            "dataset must be a datasets.Dataset, a list of strings or a dict of columns, "
            f"got {type(dataset).__name__}"
        )
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as error:  # ragged or mixed-type columns
        raise InputError(f"cannot build a dataset from the given columns: {error}") from error


def _ray_runs_in_this_process() -> bool:
    """True in a Ray driver or worker (checked without importing Ray: only if it is loaded)."""
    ray = sys.modules.get("ray")
    is_initialized = getattr(ray, "is_initialized", None)
    return bool(callable(is_initialized) and is_initialized())


def _resolve_num_proc(num_proc: Optional[int], num_rows: int) -> Optional[int]:
    """``num_proc`` capped at the CPU count and the number of rows; None means one process.

    ``datasets`` forks its worker processes; forking a process that runs Ray (a driver, a
    Ray Train worker, a Tune trial) can hang Ray, so there tokenizing stays in this process
    (with a warning).
    """
    valid = num_proc is None or (
        isinstance(num_proc, int) and not isinstance(num_proc, bool) and num_proc >= 1
    )
    if not valid:
        raise ConfigError(f"num_proc must be a positive int or None, got {num_proc!r}")
    if num_proc is None:
        return None
    resolved = min(num_proc, os.cpu_count() or 1, max(num_rows, 1))
    if resolved > 1 and _ray_runs_in_this_process():
        logger.warning(
            "prepare_moe_dataset: tokenizing in this process instead of num_proc=%d: this process "
            "runs Ray, and forking it for worker processes can hang Ray", num_proc,
        )
        return None
    return resolved if resolved > 1 else None


def prepare_moe_dataset(
    dataset: Any,
    tokenizer: Any = None,
    max_length: int = 512,
    num_proc: Optional[int] = 4,
    text_column: str = "text",
    label_column: Optional[str] = "domain",
    return_stats: bool = False,
) -> Union[datasets.Dataset, Tuple[datasets.Dataset, PrepareStats]]:
    """Tokenize documents and pack them into blocks of ``max_length`` tokens.

    Args:
        dataset: a ``datasets.Dataset``, a list of strings, or a dict of columns.
        tokenizer: ours or any ``transformers`` tokenizer (default :class:`ByteTokenizer`).
            With an ``eos_token_id`` documents are packed; without one each document
            becomes one block of its first ``max_length`` tokens (a warning says so).
        max_length: tokens per block (the last block of a label in a packing group, and a
            truncated document, may be shorter, but never below 2 tokens).
        num_proc: processes for tokenizing, as given but capped at ``os.cpu_count()`` and
            the number of rows (``None`` or 1: this process). The blocks do not depend on it.
            In a process that runs Ray, tokenizing stays in this process (forking can hang
            Ray; a warning says so).
        text_column: column with the documents.
        label_column: column with a per-document label (e.g. ``domain``). Documents are
            packed per label, so every block has one label, kept in this column. Absent or
            None: the output has no label column.
        return_stats: also return a :class:`PrepareStats`.

    Returns:
        A dataset with ``input_ids`` (list of int32) and the label column, and with
        ``return_stats`` the pair ``(dataset, stats)``. Rows with no usable text (empty,
        whitespace, None, bytes that are not UTF-8, non-strings) are skipped and counted.
    """
    check_max_length(max_length)
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    eos_token_id = getattr(tokenizer, "eos_token_id", None)

    ds = _to_dataset(dataset, text_column)
    if text_column not in ds.column_names:
        raise InputError(
            f"text_column {text_column!r} is not in the dataset; its columns are {ds.column_names}"
        )
    if label_column is not None and label_column not in ds.column_names:
        label_column = None
    keep_columns = [text_column] + ([label_column] if label_column else [])
    ds = ds.select_columns(keep_columns)

    # 1. tokenize: one row per document (rows without usable text are dropped, so they never
    #    shift the packing groups); parallel is safe here, the row order is kept
    tokenized_features = datasets.Features(
        {_IDS: datasets.List(datasets.Value("int32")), _NUM_TOKENS: datasets.Value("int64")}
    )
    if label_column:
        tokenized_features[label_column] = ds.features[label_column]
    tokenized = ds.map(
        _tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "label_column": label_column},
        batched=True,
        num_proc=_resolve_num_proc(num_proc, len(ds)),
        remove_columns=ds.column_names,
        features=tokenized_features,
        desc="Tokenizing",
    )
    num_rows = len(ds)
    num_documents = int(pc.sum(pc.greater(tokenized.data.column(_NUM_TOKENS), 0)).as_py() or 0)
    num_skipped = num_rows - num_documents
    if num_skipped:
        logger.warning(
            "prepare_moe_dataset skipped %d of %d rows of %r: empty, whitespace-only, None, "
            "or not UTF-8 text",
            num_skipped, num_rows, text_column,
        )
    if num_documents == 0:
        raise InputError(
            f"no usable text in column {text_column!r}: all {num_rows} rows are empty or not text"
        )

    if eos_token_id is None:
        logger.warning(
            "tokenizer %s has no eos_token_id, so documents cannot be packed: each document becomes "
            "one block of its first %d tokens (documents with fewer than 2 tokens are dropped)",
            type(tokenizer).__name__, max_length,
        )

    # 2. pack: one process with fixed groups, so the blocks never depend on num_proc
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    if label_column:
        features[label_column] = ds.features[label_column]
    packed = tokenized.map(
        _pack_batch,
        fn_kwargs={
            "max_length": max_length,
            "eos_token_id": eos_token_id,
            "label_column": label_column,
        },
        batched=True,
        batch_size=PACK_GROUP_ROWS,
        remove_columns=tokenized.column_names,
        features=features,
        desc="Packing",
    )
    if len(packed) == 0:
        raise InputError(
            f"no block of at least 2 tokens: the {num_documents} documents of {text_column!r} are "
            f"single tokens and tokenizer {type(tokenizer).__name__} has no eos_token_id to pack them"
        )
    if not return_stats:
        return packed
    num_tokens = pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py() or 0
    stats = PrepareStats(
        num_documents=num_documents,
        num_skipped=num_skipped,
        num_blocks=len(packed),
        num_tokens=int(num_tokens),
    )
    return packed, stats
