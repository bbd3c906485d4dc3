"""Tests of ByteTokenizer, BPETokenizer, train_bpe_tokenizer and load/save_tokenizer."""

import json

import pytest
import torch

from moe_lab.data import (
    BPETokenizer,
    ByteTokenizer,
    MoETokenizer,
    build_corpus,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
)
from moe_lab.errors import ConfigError, InputError

TEXTS = ["hello world", "Grüße, 世界! 🎉", "", "  tabs\tand\nnewlines  ", "<eos> is text here"]


@pytest.fixture(scope="module")
def bpe():
    corpus = build_corpus(size_bytes=40_000, seed=0)
    return train_bpe_tokenizer(list(corpus["text"]) + TEXTS, vocab_size=600)


@pytest.fixture(params=["byte", "bpe"])
def tok(request, bpe):
    return ByteTokenizer() if request.param == "byte" else bpe


def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == len(tok) == 259
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert tok.all_special_ids == [256, 257, 258]
    assert tok.encode("Ab") == [65, 98]
    assert tok.encode("Ab", add_special_tokens=True) == [257, 65, 98, 258]
    assert tok.encode("é") == list("é".encode("utf-8"))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert tok.decode(tok.encode(text, add_special_tokens=True)) == text


def test_special_tokens_in_text_are_plain_text(tok):
    ids = tok.encode("<eos>")
    assert tok.eos_token_id not in ids


def test_decode_keeps_specials_when_asked(tok):
    ids = tok.encode("hi", add_special_tokens=True) + [tok.pad_token_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<eos><pad>"


def test_byte_decode_invalid_utf8_is_replaced():
    assert ByteTokenizer().decode([0xFF, 65]) == "\ufffdA"


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(InputError, match="token ids"):
        tok.decode([tok.vocab_size])
    with pytest.raises(InputError):
        tok.decode([-1])


def test_call_single_and_batch(tok):
    single = tok("hello")
    assert single["input_ids"] == tok.encode("hello")
    assert single["attention_mask"] == [1] * len(single["input_ids"])
    batch = tok(["hi", "hello there"])
    assert batch["input_ids"] == [tok.encode("hi"), tok.encode("hello there")]


def test_padding_longest_and_tensors(tok):
    out = tok(["hi", "hello there"], padding=True, return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    n_short, n_long = len(tok.encode("hi")), len(tok.encode("hello there"))
    assert ids.shape == mask.shape == (2, n_long)
    assert ids.dtype == torch.long
    assert mask[0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert (ids[0, n_short:] == tok.pad_token_id).all()
    assert tok.batch_decode(ids) == ["hi", "hello there"]


def test_padding_max_length_and_truncation():
    tok = ByteTokenizer()
    out = tok(["abc", "abcdefgh"], max_length=5, truncation=True, padding="max_length")
    assert out["input_ids"] == [[97, 98, 99, 256, 256], [97, 98, 99, 100, 101]]
    assert out["attention_mask"] == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # truncation keeps bos/eos
    out = tok("abcdefgh", max_length=4, truncation=True, add_special_tokens=True)
    assert out["input_ids"] == [257, 97, 98, 258]
    single = tok("abc", return_tensors="pt")
    assert single["input_ids"].shape == (1, 3)


def test_call_errors():
    tok = ByteTokenizer()
    with pytest.raises(InputError, match="different lengths"):
        tok(["a", "abc"], return_tensors="pt")
    with pytest.raises(ConfigError, match="padding"):
        tok(["a"], padding="sideways")
    with pytest.raises(ConfigError, match="max_length"):
        tok(["a"], padding="max_length")
    with pytest.raises(ConfigError, match="max_length"):
        tok(["a"], truncation=True)
    with pytest.raises(ConfigError, match="max_length"):
        tok(["a"], max_length=0)
    with pytest.raises(ConfigError, match="return_tensors"):
        tok(["a"], return_tensors="tf")
    with pytest.raises(InputError, match="str"):
        tok(123)
    with pytest.raises(InputError):
        tok(["a", None])


def test_pad_list_of_rows():
    tok = ByteTokenizer()
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": torch.tensor([4])}]
    out = tok.pad(rows, return_tensors="pt")
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 256, 256]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    out = tok.pad({"input_ids": [[1], [2, 3]]}, padding="max_length", max_length=4)
    assert out["input_ids"] == [[1, 256, 256, 256], [2, 3, 256, 256]]
    with pytest.raises(InputError):
        tok.pad([])


def test_bpe_compresses_and_has_specials(bpe):
    assert isinstance(bpe, BPETokenizer) and isinstance(bpe, MoETokenizer)
    assert 259 < bpe.vocab_size <= 600
    assert len(set(bpe.all_special_ids)) == 3
    text = build_corpus(size_bytes=5_000, seed=123)["text"][0]
    assert len(bpe.encode(text)) < 0.8 * len(text.encode("utf-8"))


def test_train_bpe_validates_vocab_size():
    with pytest.raises(ConfigError, match="259"):
        train_bpe_tokenizer(["abc"], vocab_size=259)
    with pytest.raises(ConfigError, match="min_frequency"):
        train_bpe_tokenizer(["abc"], vocab_size=300, min_frequency=0)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_save_and_load(tmp_path, bpe, kind):
    tok = ByteTokenizer() if kind == "byte" else bpe
    files = save_tokenizer(tok, tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == type(tok).__name__
    assert all((tmp_path / "tok" / f).exists() for f in files)
    if kind == "bpe":
        assert (tmp_path / "tok" / "tokenizer.json").exists()
    for loaded in (type(tok).from_pretrained(tmp_path / "tok"),
                   MoETokenizer.from_pretrained(tmp_path / "tok"),
                   load_tokenizer(tmp_path / "tok"),
                   load_tokenizer(str(tmp_path / "tok"))):
        assert type(loaded) is type(tok)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.all_special_ids == tok.all_special_ids
        for text in TEXTS:
            assert loaded.encode(text) == tok.encode(text)


def test_from_pretrained_wrong_class(tmp_path, bpe):
    bpe.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="BPETokenizer"):
        ByteTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        ByteTokenizer.from_pretrained(tmp_path / "nothing")


def test_load_tokenizer_byte():
    assert isinstance(load_tokenizer(), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_tokenizer_local_transformers(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(bpe.backend_tokenizer.to_str())  # a copy: HF may modify it
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    assert hf.pad_token is None
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_tokenizer(tmp_path / "hf")
    assert not isinstance(loaded, MoETokenizer)
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    assert loaded.pad_token_id == loaded.eos_token_id
    out = loaded(["hello", "hello world"], padding=True, return_tensors="pt")
    assert out["input_ids"].shape[0] == 2
    assert loaded.decode(loaded("hello world")["input_ids"]) == "hello world"
    files = save_tokenizer(loaded, tmp_path / "again")
    assert files and (tmp_path / "again" / "tokenizer_config.json").exists()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        load_tokenizer(42)
    with pytest.raises(InputError, match="save_pretrained"):
        save_tokenizer(object(), tmp_path / "x")


def test_load_tokenizer_without_transformers(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("no transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match="transformers"):
        load_tokenizer(str(tmp_path / "some-model"))
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
