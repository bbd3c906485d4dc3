"""Tests of the built-in multi-domain corpus and the train/eval split."""

import json
import re
import time
from collections import Counter

import pytest

from moe_lab.data import DOMAINS, build_corpus, train_eval_split
from moe_lab.errors import ConfigError, InputError

SMALL = 60_000


@pytest.fixture(scope="module")
def small_corpus():
    return build_corpus(size_bytes=SMALL, seed=0)


def _docs(corpus, domain):
    return [t for t, d in zip(corpus["text"], corpus["domain"]) if d == domain]


def test_deterministic_and_seed_dependent(small_corpus):
    again = build_corpus(size_bytes=SMALL, seed=0)
    assert list(again["text"]) == list(small_corpus["text"])
    assert list(again["domain"]) == list(small_corpus["domain"])
    other = build_corpus(size_bytes=SMALL, seed=1)
    assert list(other["text"]) != list(small_corpus["text"])


def test_columns_domains_and_balance(small_corpus):
    assert small_corpus.column_names == ["text", "domain"]
    assert len(DOMAINS) >= 5
    assert set(small_corpus["domain"]) == set(DOMAINS)
    bytes_per_domain = Counter()
    for text, domain in zip(small_corpus["text"], small_corpus["domain"]):
        bytes_per_domain[domain] += len(text.encode("utf-8"))
    assert sum(bytes_per_domain.values()) >= SMALL
    assert max(bytes_per_domain.values()) < 1.5 * min(bytes_per_domain.values())


def test_rows_are_interleaved(small_corpus):
    first = list(small_corpus["domain"][: 2 * len(DOMAINS)])
    assert set(first) == set(DOMAINS)


def test_document_lengths(small_corpus):
    lengths = [len(t) for t in small_corpus["text"]]
    assert min(lengths) >= 150 and max(lengths) <= 2200


def test_domains_have_different_character_statistics(small_corpus):
    def char_dist(domain):
        counts = Counter("".join(_docs(small_corpus, domain)))
        total = sum(counts.values())
        return {c: n / total for c, n in counts.items()}

    dists = {d: char_dist(d) for d in DOMAINS}
    for i, a in enumerate(DOMAINS):
        for b in DOMAINS[i + 1 :]:
            keys = set(dists[a]) | set(dists[b])
            tv = 0.5 * sum(abs(dists[a].get(k, 0) - dists[b].get(k, 0)) for k in keys)
            assert tv > 0.2, (a, b, tv)


def test_arithmetic_answers_are_correct(small_corpus):
    pattern = re.compile(r"^(\d+) ([+\-*]) (\d+) = (-?\d+)$")
    num_checked = 0
    for doc in _docs(small_corpus, "arithmetic"):
        lines = doc.split("\n")
        assert len(lines) >= 3
        for line in lines:
            match = pattern.match(line)
            assert match, line
            a, op, b, c = match.groups()
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op], line
            num_checked += 1
    assert num_checked > 100


def test_json_documents_parse(small_corpus):
    for doc in _docs(small_corpus, "json"):
        records = json.loads(doc)
        assert isinstance(records, list) and records
        for record in records:
            assert {"id", "name", "price", "tags"} <= set(record)


def test_dna_and_code_shapes(small_corpus):
    for doc in _docs(small_corpus, "dna"):
        for line in doc.split("\n"):
            assert line.startswith(">seq_") or set(line) <= set("ACGT")
    for doc in _docs(small_corpus, "code"):
        assert doc.startswith("def ") and "return" in doc and "\n    " in doc
        compile(doc, "<corpus>", "exec")


def test_english_sentences(small_corpus):
    doc = _docs(small_corpus, "english")[0]
    assert doc[0].isupper() and doc[-1] in ".?!"
    assert set(doc) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,?!")


def test_domain_subset():
    corpus = build_corpus(size_bytes=5_000, domains=["dna", "json"])
    assert set(corpus["domain"]) == {"dna", "json"}


@pytest.mark.parametrize(
    "kwargs",
    [dict(size_bytes=0), dict(size_bytes=-5), dict(domains=["klingon"]), dict(domains=[]),
     dict(domains="dna"), dict(domains=["dna", "dna"])],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        build_corpus(**kwargs)


def test_default_size_and_speed():
    start = time.perf_counter()
    corpus = build_corpus()
    elapsed = time.perf_counter() - start
    assert sum(len(t.encode("utf-8")) for t in corpus["text"]) >= 2_000_000
    assert elapsed < 10.0  # ~0.4 s on 2 cores; generous for loaded CI machines


def test_train_eval_split_is_stratified_and_deterministic(small_corpus):
    train, eval_ = train_eval_split(small_corpus, eval_fraction=0.05, seed=0)
    assert len(train) + len(eval_) == len(small_corpus)
    assert set(eval_["domain"]) == set(DOMAINS)
    assert not set(train["text"]) & set(eval_["text"])
    train2, eval2 = train_eval_split(small_corpus, eval_fraction=0.05, seed=0)
    assert list(eval2["text"]) == list(eval_["text"])
    _, eval3 = train_eval_split(small_corpus, eval_fraction=0.05, seed=1)
    assert list(eval3["text"]) != list(eval_["text"])


def test_train_eval_split_errors(small_corpus):
    for bad in (0, 1, 1.5, -0.1, "0.1"):
        with pytest.raises(ConfigError, match="eval_fraction"):
            train_eval_split(small_corpus, eval_fraction=bad)
    with pytest.raises(InputError):
        train_eval_split(small_corpus.select([0]))
    with pytest.raises(InputError):
        train_eval_split(["a", "b"])
