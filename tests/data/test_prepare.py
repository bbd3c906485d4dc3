"""Tests of load_text_dataset and prepare_moe_dataset (tokenize + pack)."""

import json
import logging
import sys
import types

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_lab.data import (
    PACK_GROUP_ROWS,
    ByteTokenizer,
    PrepareStats,
    build_corpus,
    load_text_dataset,
    prepare_moe_dataset,
    train_bpe_tokenizer,
)
from moe_lab.data import prepare as prepare_module
from moe_lab.errors import ConfigError, InputError

EOS = ByteTokenizer().eos_token_id


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(size_bytes=30_000, seed=0)


# ---------------------------------------------------------------------------------------
# prepare_moe_dataset
# ---------------------------------------------------------------------------------------


def test_packing_exact_lengths_and_stats(corpus):
    packed, stats = prepare_moe_dataset(corpus, max_length=64, return_stats=True)
    assert isinstance(stats, PrepareStats)
    assert packed.column_names == ["input_ids", "domain"]
    lengths = [len(ids) for ids in packed["input_ids"]]
    # per (group, domain) only the last block may be short; with one group, at most one per domain
    assert sum(n != 64 for n in lengths) <= len(set(corpus["domain"]))
    assert all(2 <= n <= 64 for n in lengths)
    total_bytes = sum(len(t.encode("utf-8")) for t in corpus["text"])
    assert stats.num_documents == len(corpus) and stats.num_skipped == 0
    assert stats.num_blocks == len(packed)
    assert stats.num_tokens == sum(lengths) == total_bytes + len(corpus)  # + one eos per doc


def test_eos_between_documents_and_content_preserved():
    docs = ["abc", "defg", "hi"]
    packed = prepare_moe_dataset(docs, max_length=4)
    flat = [i for ids in packed["input_ids"] for i in ids]
    assert flat == [97, 98, 99, EOS, 100, 101, 102, 103, EOS, 104, 105, EOS]
    assert [len(ids) for ids in packed["input_ids"]] == [4, 4, 4]
    assert packed.column_names == ["input_ids"]


def test_short_leftover_is_kept_only_with_two_tokens():
    packed = prepare_moe_dataset(["abcdef"], max_length=3)  # 7 tokens: 3 + 3 + 1 (dropped)
    assert [len(ids) for ids in packed["input_ids"]] == [3, 3]
    packed = prepare_moe_dataset(["abcde"], max_length=4)  # 6 tokens: 4 + 2 (kept)
    assert packed["input_ids"][1] == [101, EOS]


def test_blocks_have_a_single_domain():
    tok = ByteTokenizer()
    data = {
        "text": ["aaaa", "bbbb", "aaaa", "bbbb", "aaaa"],
        "domain": ["a", "b", "a", "b", "a"],
    }
    packed = prepare_moe_dataset(data, max_length=8)
    for ids, domain in zip(packed["input_ids"], packed["domain"]):
        text = tok.decode(ids)
        assert set(text) == {domain}, (text, domain)
    # a: 3 x (4 + eos) = 15 tokens -> 8 + 7; b: 2 x (4 + eos) = 10 tokens -> 8 + 2
    assert list(packed["domain"]) == ["a", "a", "b", "b"]
    assert [len(ids) for ids in packed["input_ids"]] == [8, 7, 8, 2]


def test_corpus_blocks_match_domain(corpus):
    tok = ByteTokenizer()
    packed = prepare_moe_dataset(corpus, max_length=128)
    for ids, domain in zip(packed["input_ids"][:200], packed["domain"][:200]):
        text = tok.decode(ids)
        if domain == "dna":
            assert set(text.replace("\n", "").replace(">seq_", "")) <= set("ACGT0123456789")
        if domain == "arithmetic":
            assert set(text) <= set("0123456789+-*= \n")


def test_skipped_rows_are_counted_and_logged(caplog):
    data = datasets.Dataset.from_dict({"text": [b"hello", b"\xff\xfe", b"", b"world"]})
    with caplog.at_level(logging.WARNING, logger="moe_lab.data.prepare"):
        packed, stats = prepare_moe_dataset(data, max_length=16, return_stats=True)
    assert (stats.num_documents, stats.num_skipped) == (2, 2)
    assert "skipped 2 of 4" in caplog.text
    assert ByteTokenizer().decode(packed["input_ids"][0]) == "helloworld"

    rows = ["ok", "", None, "   \n", b"\xff\xfe", 17, "fine"]
    packed, stats = prepare_moe_dataset(rows, max_length=16, return_stats=True)
    assert (stats.num_documents, stats.num_skipped) == (2, 5)
    assert packed["input_ids"][0] == [111, 107, EOS, 102, 105, 110, 101, EOS]


def test_all_rows_skipped_is_an_error():
    with pytest.raises(InputError, match="no usable text"):
        prepare_moe_dataset(["", None, "  "])


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_max_length_must_be_at_least_two(bad):
    with pytest.raises(ConfigError, match=f"max_length.*{bad!r}"):
        prepare_moe_dataset(["abc"], max_length=bad)


def test_missing_text_column_lists_columns():
    data = datasets.Dataset.from_dict({"content": ["a"], "domain": ["x"]})
    with pytest.raises(InputError, match=r"'text'.*\['content', 'domain'\]"):
        prepare_moe_dataset(data)
    with pytest.raises(InputError, match="content"):
        prepare_moe_dataset({"content": ["a"]})
    packed = prepare_moe_dataset(data, text_column="content", max_length=4)
    assert list(packed["domain"]) == ["x"]


def test_bad_inputs():
    with pytest.raises(InputError, match="DatasetDict"):
        prepare_moe_dataset(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}))
    with pytest.raises(InputError):
        prepare_moe_dataset(42)
    with pytest.raises(ConfigError, match="num_proc"):
        prepare_moe_dataset(["abc"], num_proc=0)


def test_bpe_tokenizer_packing(corpus):
    bpe = train_bpe_tokenizer(corpus["text"], vocab_size=400)
    packed, stats = prepare_moe_dataset(corpus, tokenizer=bpe, max_length=32, return_stats=True)
    assert stats.num_tokens < sum(len(t) for t in corpus["text"])
    first_doc_ids = bpe.encode(corpus["text"][0])
    flat = [i for ids in packed["input_ids"] for i in ids]
    assert flat[: len(first_doc_ids) + 1] == first_doc_ids + [bpe.eos_token_id]


def test_transformers_tokenizer_packing(corpus):
    transformers = pytest.importorskip("transformers")
    bpe = train_bpe_tokenizer(corpus["text"], vocab_size=300)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.backend_tokenizer, eos_token="<eos>")
    packed = prepare_moe_dataset(["hello world", "again"], tokenizer=hf, max_length=64)
    expected = hf("hello world")["input_ids"] + [hf.eos_token_id] + hf("again")["input_ids"]
    assert packed["input_ids"][0] == expected + [hf.eos_token_id]


def test_deterministic(corpus):
    a = prepare_moe_dataset(corpus, max_length=100)
    b = prepare_moe_dataset(corpus, max_length=100)
    assert list(a["input_ids"]) == list(b["input_ids"]) and list(a["domain"]) == list(b["domain"])


@pytest.fixture
def no_ray(monkeypatch):
    """These tests are about num_proc, not about a Ray cluster another test file left running."""
    monkeypatch.setattr(prepare_module, "_ray_runs_in_this_process", lambda: False)


def test_num_proc_resolution(monkeypatch, no_ray):
    resolve = prepare_module._resolve_num_proc
    monkeypatch.setattr(prepare_module.os, "cpu_count", lambda: 8)
    assert resolve(4, 10) == 4  # honoured for small datasets too (no silent row threshold)
    assert resolve(4, 3) == 3  # never more processes than rows
    assert resolve(16, 10**6) == 8  # capped at the CPU count
    assert resolve(1, 10**6) is None and resolve(None, 10**6) is None
    monkeypatch.setattr(prepare_module.os, "cpu_count", lambda: 1)
    assert resolve(4, 10**6) is None


def _record_map_num_proc(monkeypatch):
    """Record (desc, num_proc) of every datasets.Dataset.map call in this process."""
    calls = []
    original = datasets.Dataset.map

    def recording_map(self, *args, **kwargs):
        calls.append((kwargs.get("desc"), kwargs.get("num_proc")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", recording_map)
    return calls


def test_num_proc_is_passed_to_datasets_map(monkeypatch, no_ray):
    monkeypatch.setattr(prepare_module.os, "cpu_count", lambda: 8)
    calls = _record_map_num_proc(monkeypatch)
    prepare_moe_dataset([f"doc {i}" for i in range(20)], max_length=16, num_proc=3)
    assert ("Tokenizing", 3) in calls
    assert ("Packing", None) in calls  # packing is one process, whatever num_proc is


def test_num_proc_gives_same_result(monkeypatch, no_ray):
    monkeypatch.setattr(prepare_module.os, "cpu_count", lambda: 4)
    num_rows = 2 * PACK_GROUP_ROWS + 300  # three packing groups
    texts = [f"doc {i}: " + "xy " * (i % 11) for i in range(num_rows)]
    data = {"text": texts, "domain": [("p", "q", "r")[i % 3] for i in range(num_rows)]}
    data["text"][7] = ""
    data["text"][1500] = None
    calls = _record_map_num_proc(monkeypatch)
    serial, serial_stats = prepare_moe_dataset(data, max_length=48, num_proc=1, return_stats=True)
    parallel, parallel_stats = prepare_moe_dataset(data, max_length=48, num_proc=2, return_stats=True)
    assert [n for desc, n in calls if desc == "Tokenizing"] == [None, 2]  # really ran in 2 processes
    assert serial_stats == parallel_stats and serial_stats.num_skipped == 2
    assert list(serial["input_ids"]) == list(parallel["input_ids"])
    assert list(serial["domain"]) == list(parallel["domain"])


def test_no_worker_processes_where_ray_runs(monkeypatch, caplog):
    monkeypatch.setattr(prepare_module.os, "cpu_count", lambda: 8)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    calls = _record_map_num_proc(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="moe_lab.data.prepare"):
        packed = prepare_moe_dataset(["abc", "def"], max_length=16, num_proc=2)
    assert ("Tokenizing", None) in calls and packed["input_ids"][0] == [97, 98, 99, EOS, 100, 101, 102, EOS]
    assert "instead of num_proc=2: this process runs Ray" in caplog.text
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    assert prepare_module._resolve_num_proc(2, 100) == 2  # Ray imported but not running: forking is fine


def test_rows_without_text_do_not_shift_packing_groups():
    texts = [f"document number {i}" for i in range(2 * PACK_GROUP_ROWS + 10)]
    with_gaps = []
    for i, text in enumerate(texts):
        with_gaps.append(text)
        if i % 7 == 0:
            with_gaps.append("" if i % 2 else None)
    plain = prepare_moe_dataset(texts, max_length=64, num_proc=1)
    gapped = prepare_moe_dataset(with_gaps, max_length=64, num_proc=1)
    # groups are PACK_GROUP_ROWS documents, not rows: the Ray Data stream drops such rows first
    assert list(gapped["input_ids"]) == list(plain["input_ids"])


def word_level_tokenizer():
    """A transformers tokenizer with only [PAD] and [UNK] as special tokens (no EOS), offline."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "again": 4, "moe": 5}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def test_tokenizer_without_eos_truncates_each_document(caplog):
    hf = word_level_tokenizer()
    assert hf.eos_token_id is None
    reps = 400  # 2000 rows: two packing groups, and two tokenizing processes
    data = {
        "text": ["hello world again moe", "moe", "hello zzz", "", "world world world"] * reps,
        "domain": ["p", "q", "r", "s", "t"] * reps,
    }
    with caplog.at_level(logging.WARNING, logger="moe_lab.data.prepare"):
        packed, stats = prepare_moe_dataset(data, tokenizer=hf, max_length=3, num_proc=2, return_stats=True)
    # one block per document, its first 3 tokens; "moe" (1 token) is too short; zzz is [UNK]
    assert list(packed["input_ids"]) == [[2, 3, 4], [2, 1], [3, 3, 3]] * reps
    assert list(packed["domain"]) == ["p", "r", "t"] * reps
    assert (stats.num_documents, stats.num_skipped, stats.num_blocks) == (4 * reps, reps, 3 * reps)
    eos_warnings = [r for r in caplog.records if "no eos_token_id" in r.getMessage()]
    assert len(eos_warnings) == 1 and "first 3 tokens" in eos_warnings[0].getMessage()


def test_tokenizer_without_eos_and_only_single_token_documents_fails_clearly():
    with pytest.raises(InputError, match="no block of at least 2 tokens.*no eos_token_id"):
        prepare_moe_dataset(["hello", "world"], tokenizer=word_level_tokenizer(), max_length=8)


def test_label_column_none_packs_one_stream():
    data = {"text": ["aaaa", "bbbb"], "domain": ["a", "b"]}
    packed = prepare_moe_dataset(data, max_length=16, label_column=None)
    assert packed.column_names == ["input_ids"]
    assert ByteTokenizer().decode(packed["input_ids"][0]) == "aaaabbbb"  # one stream, not one per domain


# ---------------------------------------------------------------------------------------
# load_text_dataset
# ---------------------------------------------------------------------------------------


def test_load_txt(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n")
    ds = load_text_dataset(path, cache_dir=tmp_path / "cache")
    assert ds.column_names == ["text"] and list(ds["text"]) == ["first line", "second line"]


def test_load_jsonl_parquet_csv(tmp_path):
    rows = [{"text": "alpha", "domain": "x"}, {"text": "beta", "domain": "y"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("text,domain\nalpha,x\nbeta,y\n")
    cache = tmp_path / "cache"
    for name in ("d.jsonl", "d.parquet", "d.csv"):
        ds = load_text_dataset(tmp_path / name, cache_dir=cache)
        assert list(ds["text"]) == ["alpha", "beta"] and list(ds["domain"]) == ["x", "y"], name
    both = load_text_dataset([tmp_path / "d.jsonl", tmp_path / "d.parquet"], cache_dir=cache)
    assert len(both) == 4
    packed = prepare_moe_dataset(load_text_dataset(tmp_path / "d.jsonl", cache_dir=cache), max_length=8)
    assert set(packed["domain"]) == {"x", "y"}


def test_load_directory(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "b.txt").write_text("two\n")
    (data / "a.txt").write_text("one\n")
    (data / "notes.md").write_text("ignored\n")
    ds = load_text_dataset(data, cache_dir=tmp_path / "cache")
    assert list(ds["text"]) == ["one", "two"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="supported"):
        load_text_dataset(empty)


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="nope.txt"):
        load_text_dataset(tmp_path / "nope.txt")
    bad = tmp_path / "data.xml"
    bad.write_text("<a/>")
    with pytest.raises(InputError, match=r"\.parquet"):
        load_text_dataset(bad)
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match=r"\['body'\]"):
        load_text_dataset(tmp_path / "d.jsonl", cache_dir=tmp_path / "cache")
    with pytest.raises(InputError):
        load_text_dataset([])
