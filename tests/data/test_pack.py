"""Tests of moe_lab.data.pack: the one tokenize-and-pack definition (no Ray, no datasets).

The Ray Data side of the same semantics is checked in
tests/orchestration/test_distributed.py (``-k streaming``).
"""

import ast
import hashlib
from pathlib import Path

import pytest

from moe_lab.data import ByteTokenizer, build_corpus, prepare_moe_dataset
from moe_lab.data.pack import (
    MIN_BLOCK_TOKENS,
    PACK_GROUP_ROWS,
    as_text,
    document_digest,
    document_digests,
    pack_documents,
    tokenize_documents,
)
from moe_lab.errors import ConfigError, InputError

EOS = 9


def test_tails_of_two_tokens_are_kept_and_lone_tokens_dropped():
    # one stream: 1 2 3 EOS 4 5 EOS -> [1 2 3], [EOS 4 5], [EOS] (dropped)
    ids_BL, labels_B = pack_documents([[1, 2, 3], [4, 5]], max_length=3, eos_token_id=EOS)
    assert ids_BL == [[1, 2, 3], [EOS, 4, 5]] and labels_B is None
    # 1 2 3 4 EOS -> [1 2 3], [4 EOS] (a tail of 2 tokens is a block)
    ids_BL, _ = pack_documents([[1, 2, 3, 4]], max_length=3, eos_token_id=EOS)
    assert ids_BL == [[1, 2, 3], [4, EOS]]
    assert MIN_BLOCK_TOKENS == 2


def test_blocks_are_packed_per_label_in_order_of_first_appearance():
    ids_DT = [[1, 1], [2, 2], [1], [3, 3, 3]]
    labels_D = ["b", "a", "b", "c"]
    ids_BL, labels_B = pack_documents(ids_DT, max_length=4, eos_token_id=EOS, labels_D=labels_D)
    # b: 1 1 EOS 1 EOS -> [1 1 EOS 1], [EOS] dropped; a: 2 2 EOS; c: 3 3 3 EOS
    assert ids_BL == [[1, 1, EOS, 1], [2, 2, EOS], [3, 3, 3, EOS]]
    assert labels_B == ["b", "a", "c"]


def test_empty_documents_add_nothing_and_labels_need_one_per_document():
    ids_BL, labels_B = pack_documents([[], [1, 2]], max_length=8, eos_token_id=EOS, labels_D=["x", "y"])
    assert ids_BL == [[1, 2, EOS]] and labels_B == ["y"]
    with pytest.raises(InputError, match="got 1 labels for 2 documents"):
        pack_documents([[1], [2]], max_length=8, eos_token_id=EOS, labels_D=["x"])


def test_without_eos_each_document_is_one_truncated_block():
    ids_DT = [[1, 2, 3, 4, 5], [6], [7, 8]]
    ids_BL, labels_B = pack_documents(ids_DT, max_length=3, eos_token_id=None, labels_D=["p", "q", "p"])
    assert ids_BL == [[1, 2, 3], [7, 8]]  # document order; [6] has fewer than 2 tokens
    assert labels_B == ["p", "p"]


@pytest.mark.parametrize("bad", [1, 0, 2.5, True, "8"])
def test_max_length_is_checked(bad):
    with pytest.raises(ConfigError, match=f"max_length must be an int >= 2, got {bad!r}"):
        pack_documents([[1, 2]], max_length=bad, eos_token_id=EOS)


def test_as_text_and_tokenize_documents():
    assert as_text(b"caf\xc3\xa9") == "café"
    assert [as_text(v) for v in ("", "  \n", None, 17, b"\xff")] == [None] * 5
    tok = ByteTokenizer()
    assert tokenize_documents(["ab", "c"], tok) == [[97, 98], [99]]  # no bos/eos
    assert tokenize_documents([], tok) == []


def test_document_digest_is_a_stable_content_key():
    expected = hashlib.blake2b("some document".encode(), digest_size=16).digest()
    assert document_digest("some document") == expected  # not Python's per-process hash()
    assert document_digest("  some document\r\n") == expected  # readers may differ in edges
    assert document_digest("some document.") != expected
    assert document_digests(["a", None, "", b"a", "b"]) == {document_digest("a"), document_digest("b")}


def test_prepare_moe_dataset_packs_with_this_module_in_groups_of_documents():
    corpus = build_corpus(size_bytes=30_000, seed=3)
    texts = list(corpus["text"]) * 80  # > 2 groups of PACK_GROUP_ROWS documents
    domains = list(corpus["domain"]) * 80
    assert len(texts) > 2 * PACK_GROUP_ROWS
    tok = ByteTokenizer()
    expected_ids, expected_labels = [], []
    for start in range(0, len(texts), PACK_GROUP_ROWS):
        ids_BL, labels_B = pack_documents(
            tokenize_documents(texts[start : start + PACK_GROUP_ROWS], tok), 100, tok.eos_token_id,
            domains[start : start + PACK_GROUP_ROWS],
        )
        expected_ids += ids_BL
        expected_labels += labels_B
    packed = prepare_moe_dataset({"text": texts, "domain": domains}, tok, max_length=100, num_proc=1)
    assert list(packed["input_ids"]) == expected_ids
    assert list(packed["domain"]) == expected_labels


def test_data_package_never_imports_ray():
    """No module of moe_lab.data imports Ray, not even lazily inside a function."""
    import moe_lab.data

    offenders = []
    for path in Path(moe_lab.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not offenders
    assert len(list(Path(moe_lab.data.__file__).parent.glob("*.py"))) >= 6  # the scan saw the package
