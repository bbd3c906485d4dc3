"""Load local text data, tokenize it and pack it into fixed-length blocks for training.

Usage::

    from moe_lab.data import build_corpus, load_text_dataset, prepare_moe_dataset

    raw = build_corpus()                             # or load_text_dataset("data/*.jsonl")
    packed, stats = prepare_moe_dataset(raw, max_length=256, return_stats=True)
    packed[0]["input_ids"]                            # 256 token ids
    packed[0]["domain"]                               # every block has a single domain

Packing: each document is tokenized (no special tokens) and followed by ``<eos>``; the
documents of one label (``domain``) inside a group of ``PACK_GROUP_ROWS`` consecutive rows
are concatenated and cut into blocks of exactly ``max_length`` tokens. The leftover at the
end of a group becomes one shorter block if it has at least 2 tokens. Tokenizing runs in
``num_proc`` processes for large datasets; packing always runs in one process, so the
result does not depend on ``num_proc``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import datasets
import pyarrow.compute as pc

from ..errors import ConfigError, InputError
from .collate import collate_moe_batch
from .tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = ["PrepareStats", "collate_moe_batch", "load_text_dataset", "prepare_moe_dataset"]

#: file extension -> datasets builder
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
#: below this many rows, tokenize in the main process (worker start-up costs more)
MIN_ROWS_FOR_MULTIPROCESSING = 5000
#: consecutive rows whose documents are packed together (fixed, so packing is deterministic)
PACK_GROUP_ROWS = 1000

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


def _as_text(value: Any) -> Optional[str]:
    """The value as usable text, or None if the row must be skipped."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    return value


def _tokenize_batch(batch: Dict[str, List[Any]], tokenizer: Any, text_column: str) -> Dict[str, list]:
    texts = [_as_text(value) for value in batch[text_column]]
    keep = [i for i, text in enumerate(texts) if text is not None]
    ids: List[List[int]] = [[] for _ in texts]
    if keep:
        encoded = tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"]
        for i, doc_ids in zip(keep, encoded):
            ids[i] = list(doc_ids)
    return {_IDS: ids, _NUM_TOKENS: [len(doc_ids) for doc_ids in ids]}


def _pack_batch(
    batch: Dict[str, List[Any]], max_length: int, eos_token_id: int, label_column: Optional[str]
) -> Dict[str, list]:
    labels = batch[label_column] if label_column else [None] * len(batch[_IDS])
    streams: Dict[Any, List[int]] = {}  # label -> its documents' tokens, eos after each
    for doc_ids, label in zip(batch[_IDS], labels):
        if doc_ids:
            stream = streams.setdefault(label, [])
            stream.extend(doc_ids)
            stream.append(eos_token_id)

    blocks: List[List[int]] = []
    block_labels: List[Any] = []
    for label, stream in streams.items():
        for start in range(0, len(stream), max_length):
            block = stream[start : start + max_length]
            if len(block) < 2:  # a lone eos (or token) teaches nothing
                break
            blocks.append(block)
            block_labels.append(label)
    out: Dict[str, list] = {"input_ids": blocks}
    if label_column:
        out[label_column] = block_labels
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
        columns[text_column] = [_as_text(value) for value in columns[text_column]]
    elif isinstance(dataset, (list, tuple)):
        columns = {text_column: [_as_text(value) for value in dataset]}
    else:
        raise InputError(
            "dataset must be a datasets.Dataset, a list of strings or a dict of columns, "
            f"got {type(dataset).__name__}"
        )
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as error:  # ragged or mixed-type columns
        raise InputError(f"cannot build a dataset from the given columns: {error}") from error


def _resolve_num_proc(num_proc: Optional[int], num_rows: int) -> Optional[int]:
    valid = num_proc is None or (
        isinstance(num_proc, int) and not isinstance(num_proc, bool) and num_proc >= 1
    )
    if not valid:
        raise ConfigError(f"num_proc must be a positive int or None, got {num_proc!r}")
    if num_proc is None or num_rows < MIN_ROWS_FOR_MULTIPROCESSING:
        return None
    num_proc = min(num_proc, os.cpu_count() or 1)
    return num_proc if num_proc > 1 else None


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
        tokenizer: ours or a ``transformers`` tokenizer (default :class:`ByteTokenizer`);
            it needs an ``eos_token_id``.
        max_length: tokens per block (the last block of a packing group may be shorter).
        num_proc: processes for tokenizing (capped at ``os.cpu_count()``; one process
            below ``MIN_ROWS_FOR_MULTIPROCESSING`` rows).
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
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an int >= 2, got {max_length!r}")
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; packing needs one")

    ds = _to_dataset(dataset, text_column)
    if text_column not in ds.column_names:
        raise InputError(
            f"text_column {text_column!r} is not in the dataset; its columns are {ds.column_names}"
        )
    if label_column is not None and label_column not in ds.column_names:
        label_column = None
    keep_columns = [text_column] + ([label_column] if label_column else [])
    ds = ds.select_columns(keep_columns)

    # 1. tokenize: one row per document (empty ids for skipped rows); parallel is safe here
    tokenized = ds.map(
        _tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column},
        batched=True,
        num_proc=_resolve_num_proc(num_proc, len(ds)),
        remove_columns=[text_column],
        desc="Tokenizing",
    )
    num_rows = len(tokenized)
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
