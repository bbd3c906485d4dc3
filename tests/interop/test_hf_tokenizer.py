"""Tokenizer files for transformers: same ids as moe_lab's tokenizers, and back."""

import json

import pytest

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

from moe_lab.data import BPETokenizer, ByteTokenizer, train_bpe_tokenizer  # noqa: E402
from moe_lab.interop import load_hf_tokenizer, save_hf_tokenizer  # noqa: E402

TEXTS = [
    "hello world",
    "  x = 1 + 2 ;\n\tif (a < b) { return \"ok\"; }  ",
    "héllo wörld — 日本語 🙂 ∑ ß",
    "a literal <eos> and <pad> and <bos> stay text",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    corpus = ["the cat sat on the mat", "def f(x): return x + 1", "12 + 5 = 17", "héllo wörld 日本語"] * 20
    return train_bpe_tokenizer(corpus, vocab_size=300)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_autotokenizer_gives_the_same_ids(tmp_path, bpe, kind):
    ours = ByteTokenizer() if kind == "byte" else bpe
    save_hf_tokenizer(ours, tmp_path, model_max_length=64)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == len(ours)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id)
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf.encode(text) == ids, text  # transformers' default call adds no special tokens, like ours
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == text == ours.decode(ids)
    with_specials = [ours.bos_token_id] + ours.encode("ab") + [ours.eos_token_id]
    assert hf.decode(with_specials, skip_special_tokens=False) == ours.decode(with_specials, skip_special_tokens=False)
    assert hf.decode(with_specials, skip_special_tokens=True) == "ab"
    batch = hf(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][-1] == ours.pad_token_id and batch["attention_mask"][0] == [1, 1, 0, 0]


def test_byte_ids_are_the_utf8_bytes(tmp_path):
    save_hf_tokenizer(ByteTokenizer(), tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode("€") == [0xE2, 0x82, 0xAC]
    assert hf.convert_ids_to_tokens([256, 257, 258]) == ["<pad>", "<bos>", "<eos>"]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["split_special_tokens"] is True and cfg["clean_up_tokenization_spaces"] is False


def test_load_hf_tokenizer_gives_ours_back(tmp_path, bpe):
    save_hf_tokenizer(ByteTokenizer(), tmp_path / "byte")
    assert isinstance(load_hf_tokenizer(tmp_path / "byte"), ByteTokenizer)
    save_hf_tokenizer(bpe, tmp_path / "bpe")
    back = load_hf_tokenizer(tmp_path / "bpe")
    assert isinstance(back, BPETokenizer)
    assert all(back.encode(t) == bpe.encode(t) for t in TEXTS)


def test_an_edited_byte_vocab_is_not_mistaken_for_ours(tmp_path):
    save_hf_tokenizer(ByteTokenizer(), tmp_path)
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 259, "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    loaded = load_hf_tokenizer(tmp_path)
    assert not isinstance(loaded, ByteTokenizer) and len(loaded) == 260  # a transformers tokenizer instead


def test_transformers_tokenizers_pass_through(tmp_path):
    save_hf_tokenizer(ByteTokenizer(), tmp_path / "a")
    hf = AutoTokenizer.from_pretrained(tmp_path / "a")
    names = save_hf_tokenizer(hf, tmp_path / "b")
    assert "tokenizer.json" in names
    assert AutoTokenizer.from_pretrained(tmp_path / "b").encode("héllo") == list("héllo".encode())


def test_no_tokenizer_files_gives_none(tmp_path):
    assert load_hf_tokenizer(tmp_path) is None
