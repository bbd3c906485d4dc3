"""Data: a built-in multi-domain corpus, tokenizers, tokenize+pack, and batch collation.

    from moe_lab.data import build_corpus, prepare_moe_dataset, collate_moe_batch

    corpus = build_corpus()                                  # text + domain, ~2.5 MB
    packed = prepare_moe_dataset(corpus, max_length=256)     # input_ids + domain
    batch = collate_moe_batch([packed[0], packed[1]], pad_token_id=256)

Packing semantics (shared with the Ray Data stream) live in :mod:`moe_lab.data.pack`
(``pack_documents``, ``tokenize_documents``, ``PACK_GROUP_ROWS``). This package never
imports Ray.
"""

from .collate import collate_moe_batch
from .corpus import DOMAINS, build_corpus, train_eval_split
from .pack import PACK_GROUP_ROWS, document_digest, pack_documents, tokenize_documents
from .prepare import PrepareStats, load_text_dataset, prepare_moe_dataset
from .tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    MoETokenizer,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DOMAINS",
    "MoETokenizer",
    "PACK_GROUP_ROWS",
    "PrepareStats",
    "build_corpus",
    "collate_moe_batch",
    "document_digest",
    "load_text_dataset",
    "load_tokenizer",
    "pack_documents",
    "prepare_moe_dataset",
    "save_tokenizer",
    "tokenize_documents",
    "train_bpe_tokenizer",
    "train_eval_split",
]
