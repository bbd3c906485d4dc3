"""Tokenize documents and pack them into training blocks: pure functions, no Ray, no datasets.

One definition of packing, used by :func:`moe_lab.data.prepare_moe_dataset` (through
``datasets.Dataset.map``) and by the Ray Data stream of :mod:`moe_lab.orchestration.data`
(through ``map_batches``), so both give the same blocks for the same documents.

Usage::

    from moe_lab.data import ByteTokenizer
    from moe_lab.data.pack import pack_documents, tokenize_documents

    tok = ByteTokenizer()
    ids_DT = tokenize_documents(["abc", "defg"], tok)        # [[97, 98, 99], [100, 101, 102, 103]]
    ids_BL, labels_B = pack_documents(ids_DT, max_length=4, eos_token_id=tok.eos_token_id,
                                      labels_D=["x", "x"])
    ids_BL       # [[97, 98, 99, 258], [100, 101, 102, 103]]  (the lone tail eos is dropped)
    labels_B     # ["x", "x"]

Shape letters: ``D`` documents of one packing group, ``T`` tokens of one document, ``B``
blocks, ``L`` tokens of one block (``2 <= L <= max_length``).

Semantics:

- **Documents.** A row is a document if its text is usable (:func:`as_text`: a ``str``, or
  UTF-8 ``bytes``, that is not empty or whitespace). Other rows are dropped *before*
  grouping, so they never shift group boundaries. Documents are tokenized without special
  tokens (``tokenizer(texts, add_special_tokens=False)``).
- **Groups.** Documents are packed in groups of :data:`PACK_GROUP_ROWS` consecutive
  documents; tokens never cross a group boundary. ``prepare_moe_dataset`` packs its
  documents in this grouping (one process, so the result never depends on ``num_proc``);
  the Ray Data stream re-blocks its documents into exactly ``PACK_GROUP_ROWS`` rows
  (``repartition(..., strict=True)``) and packs one block per call.
- **With an EOS id (packing).** Inside a group, the documents of each label are
  concatenated in document order, each followed by ``eos``, and that stream is cut into
  blocks of ``max_length`` tokens. The last, shorter block of a stream (the *tail*) is kept
  if it has at least :data:`MIN_BLOCK_TOKENS` tokens. Blocks come out label by label, labels
  in the order of their first document in the group. Every block has exactly one label.
- **Without an EOS id (truncation).** One block per document: its first ``max_length``
  tokens, kept if it has at least :data:`MIN_BLOCK_TOKENS` tokens, in document order.
- **Labels.** ``labels_D`` (one per document, e.g. the ``domain`` column) is optional. With
  it, blocks are packed per label and ``labels_B`` gives each block's label; without it
  (``None``) all documents form one stream and ``labels_B`` is ``None``, so callers write
  no label column.

:func:`document_digest` is the content key the streaming job uses to keep held-out eval
documents out of its training stream (see ``moe_lab.orchestration.data``).
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import ConfigError, InputError

__all__ = [
    "MIN_BLOCK_TOKENS",
    "PACK_GROUP_ROWS",
    "as_text",
    "check_max_length",
    "document_digest",
    "document_digests",
    "pack_documents",
    "tokenize_documents",
]

#: consecutive documents packed together (fixed, so packing is deterministic)
PACK_GROUP_ROWS = 1000
#: shorter blocks (a lone token or eos) teach nothing and are dropped
MIN_BLOCK_TOKENS = 2


def as_text(value: Any) -> Optional[str]:
    """The value as usable text (``str`` or UTF-8 ``bytes``, not blank), or None to skip it."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    return value


def tokenize_documents(texts_D: Sequence[str], tokenizer: Any) -> List[List[int]]:
    """Token ids of each text, no special tokens (ours or any ``transformers`` tokenizer)."""
    if not texts_D:
        return []
    encoded = tokenizer(list(texts_D), add_special_tokens=False)["input_ids"]
    return [[int(i) for i in ids_T] for ids_T in encoded]


def check_max_length(max_length: Any) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < MIN_BLOCK_TOKENS:
        raise ConfigError(f"max_length must be an int >= {MIN_BLOCK_TOKENS}, got {max_length!r}")
    return max_length


def pack_documents(
    ids_DT: Sequence[Sequence[int]],
    max_length: int,
    eos_token_id: Optional[int],
    labels_D: Optional[Sequence[Any]] = None,
) -> Tuple[List[List[int]], Optional[List[Any]]]:
    """Pack one group of tokenized documents into blocks (the semantics of the module docstring).

    Args:
        ids_DT: token ids of each document of the group (empty documents add nothing).
        max_length: tokens per block (``>= 2``); tails and truncated documents may be shorter.
        eos_token_id: appended after each document; ``None`` truncates each document to one
            block instead.
        labels_D: a label per document (pack per label), or ``None`` (one stream, no labels).

    Returns:
        ``(ids_BL, labels_B)``: the blocks, and their labels (``None`` without ``labels_D``).
    """
    check_max_length(max_length)
    if labels_D is not None and len(labels_D) != len(ids_DT):
        raise InputError(f"got {len(labels_D)} labels for {len(ids_DT)} documents; expected one label per document")
    labels = list(labels_D) if labels_D is not None else [None] * len(ids_DT)

    ids_BL: List[List[int]] = []
    labels_B: List[Any] = []
    if eos_token_id is None:  # truncation: one block per document
        for ids_T, label in zip(ids_DT, labels):
            block = [int(i) for i in ids_T[:max_length]]
            if len(block) >= MIN_BLOCK_TOKENS:
                ids_BL.append(block)
                labels_B.append(label)
    else:
        eos = int(eos_token_id)
        streams: Dict[Any, List[int]] = {}  # label -> its documents' tokens, eos after each
        for ids_T, label in zip(ids_DT, labels):
            if len(ids_T):
                stream = streams.setdefault(label, [])
                stream.extend(int(i) for i in ids_T)
                stream.append(eos)
        for label, stream in streams.items():
            for start in range(0, len(stream), max_length):
                block = stream[start : start + max_length]
                if len(block) < MIN_BLOCK_TOKENS:  # only the tail can be this short
                    break
                ids_BL.append(block)
                labels_B.append(label)
    return ids_BL, (labels_B if labels_D is not None else None)


def document_digest(text: str) -> bytes:
    """A stable content key of one document (blake2b of its stripped UTF-8 text, 16 bytes).

    Stable across processes and machines (unlike ``hash``) and blind to leading/trailing
    whitespace, so two readers of the same file agree on it.
    """
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).digest()


def document_digests(texts: Iterable[Any]) -> frozenset:
    """The :func:`document_digest` of every usable text (unusable values are skipped)."""
    return frozenset(document_digest(t) for t in map(as_text, texts) if t is not None)
