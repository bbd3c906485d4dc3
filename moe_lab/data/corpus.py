"""A built-in multi-domain text corpus, generated from a seed (nothing is downloaded).

Five domains with clearly different statistics, so that experts have something to
specialise on:

- ``arithmetic``: lines such as ``37 + 45 = 82`` (answers are correct).
- ``english``: sentences from a small generative grammar.
- ``code``: Python-like functions (def/for/if/return, indentation, identifiers).
- ``json``: a JSON array of records (id, name, price, tags, ...) per document.
- ``dna``: FASTA-like records (``>seq_17`` headers, ACGT lines with repeated motifs).

Usage::

    from moe_lab.data import build_corpus, train_eval_split

    corpus = build_corpus()                      # ~2.5 MB, columns "text" and "domain"
    train, eval = train_eval_split(corpus, eval_fraction=0.05)

The same arguments always give the same dataset: every domain draws from its own
``random.Random`` seeded with ``(seed, domain)``, never from the global RNG.
"""

from __future__ import annotations

import json
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import datasets

from ..errors import ConfigError, InputError

DOMAINS: Tuple[str, ...] = ("arithmetic", "english", "code", "json", "dna")

MIN_DOC_CHARS = 200
MAX_DOC_CHARS = 2000

# ---------------------------------------------------------------------------------------
# Word lists shared by the generators.
# ---------------------------------------------------------------------------------------

_DETERMINERS = ("the", "a", "every", "some", "this", "that", "one", "no")
_ADJECTIVES = (
    "quick", "lazy", "small", "large", "quiet", "bright", "old", "young", "green", "red",
    "careful", "curious", "hungry", "gentle", "strange", "silver", "warm", "cold",
)
_NOUNS = (
    "fox", "dog", "cat", "river", "teacher", "child", "garden", "city", "bird", "farmer",
    "window", "machine", "letter", "forest", "king", "student", "boat", "mountain",
    "doctor", "song", "village", "horse", "painter", "road",
)
_VERBS = (
    "saw", "chased", "found", "painted", "carried", "followed", "watched", "built",
    "remembered", "visited", "helped", "admired", "crossed", "opened", "praised",
)
_INTRANSITIVE = ("slept", "laughed", "waited", "sang", "arrived", "vanished", "rested")
_PREPOSITIONS = ("near", "under", "behind", "beside", "across", "above", "inside", "over")
_ADVERBS = ("slowly", "quietly", "suddenly", "happily", "again", "carefully", "often")
_CONJUNCTIONS = ("and", "but", "because", "while", "so")

_IDENT_PARTS = (
    "count", "total", "value", "item", "index", "buffer", "node", "result", "data", "key",
    "size", "limit", "offset", "score", "name", "line", "word", "step", "left", "right",
)
_FUNC_VERBS = ("get", "compute", "find", "update", "parse", "load", "merge", "check", "sum")

_PRODUCT_WORDS = (
    "lamp", "chair", "kettle", "notebook", "cable", "backpack", "mug", "speaker", "pillow",
    "jacket", "bottle", "clock", "blanket", "camera", "pencil", "shelf",
)
_BRANDS = ("acme", "nova", "zenith", "orbit", "pioneer", "summit", "aurora", "vertex")
_TAGS = (
    "home", "office", "outdoor", "kitchen", "sale", "new", "eco", "gift", "travel",
    "sport", "kids", "premium",
)
_CURRENCIES = ("USD", "EUR", "GBP", "JPY")

_DNA_MOTIFS = ("TATAAA", "GAATTC", "CCGCGG", "GGATCC", "AAGCTT", "CACGTG", "TTGACA")


# ---------------------------------------------------------------------------------------
# One "unit" (a line, sentence, function, record) per call; documents join units.
# ---------------------------------------------------------------------------------------


def _arithmetic_line(rng: random.Random) -> str:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a} * {b} = {a * b}"
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    if op == "+":
        return f"{a} + {b} = {a + b}"
    return f"{a} - {b} = {a - b}"


def _noun_phrase(rng: random.Random) -> str:
    words = [rng.choice(_DETERMINERS)]
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    if rng.random() < 0.25:
        words += [rng.choice(_PREPOSITIONS), rng.choice(_DETERMINERS), rng.choice(_NOUNS)]
    return " ".join(words)


def _clause(rng: random.Random) -> str:
    subject = _noun_phrase(rng)
    if rng.random() < 0.3:
        clause = f"{subject} {rng.choice(_INTRANSITIVE)}"
    else:
        clause = f"{subject} {rng.choice(_VERBS)} {_noun_phrase(rng)}"
    if rng.random() < 0.3:
        clause += f" {rng.choice(_ADVERBS)}"
    return clause


def _english_sentence(rng: random.Random) -> str:
    sentence = _clause(rng)
    if rng.random() < 0.35:
        sentence += f", {rng.choice(_CONJUNCTIONS)} {_clause(rng)}"
    end = rng.choices(".?!", weights=(8, 1, 1))[0]
    return sentence[0].upper() + sentence[1:] + end


def _identifier(rng: random.Random) -> str:
    return "_".join(rng.sample(_IDENT_PARTS, rng.choice((1, 2, 2))))


def _code_function(rng: random.Random) -> str:
    name = f"{rng.choice(_FUNC_VERBS)}_{_identifier(rng)}"
    args = [_identifier(rng) for _ in range(rng.randint(1, 3))]
    args = list(dict.fromkeys(args))  # no duplicate parameter names
    acc, var = "result", rng.choice(("i", "j", "k", "x", "item"))
    lines = [f"def {name}({', '.join(args)}):"]
    if rng.random() < 0.5:
        lines.append(f'    """{rng.choice(_FUNC_VERBS).capitalize()} the {_identifier(rng)}."""')
    lines.append(f"    {acc} = {rng.choice(('0', '[]', '{}', 'None', args[0]))}")
    lines.append(f"    for {var} in range(len({args[0]})):")
    cmp = rng.choice(("<", ">", "==", "!=", "<=", ">="))
    lines.append(f"        if {args[0]}[{var}] {cmp} {rng.randint(0, 100)}:")
    lines.append(f"            {acc} = {acc} + {args[-1]}[{var}]")
    if rng.random() < 0.5:
        lines.append("        else:")
        lines.append(f"            {acc} = {acc} - {rng.randint(1, 9)}")
    if rng.random() < 0.4:
        lines.append(f"    # {rng.choice(_FUNC_VERBS)} {rng.choice(_IDENT_PARTS)} before returning")
    lines.append(f"    return {acc}")
    return "\n".join(lines) + "\n"


def _json_record(rng: random.Random) -> str:
    record = {
        "id": rng.randint(1, 99_999),
        "name": f"{rng.choice(_BRANDS)} {rng.choice(_ADJECTIVES)} {rng.choice(_PRODUCT_WORDS)}",
        "price": round(rng.uniform(0.5, 500.0), 2),
        "currency": rng.choice(_CURRENCIES),
        "tags": rng.sample(_TAGS, rng.randint(0, 4)),
        "in_stock": rng.random() < 0.7,
    }
    if rng.random() < 0.5:
        record["rating"] = round(rng.uniform(1.0, 5.0), 1)
    return json.dumps(record)


def _dna_record(rng: random.Random) -> str:
    pieces: List[str] = []
    length = 0
    target = rng.randint(80, 500)
    while length < target:
        if rng.random() < 0.3:
            piece = rng.choice(_DNA_MOTIFS)
        else:
            piece = "".join(rng.choices("ACGT", k=rng.randint(4, 24)))
        pieces.append(piece)
        length += len(piece)
    sequence = "".join(pieces)
    lines = [f">seq_{rng.randint(1, 9999)}"]
    lines += [sequence[i : i + 60] for i in range(0, len(sequence), 60)]
    return "\n".join(lines)


# unit generator and the string that joins units into a document
_GENERATORS: Dict[str, Tuple[Callable[[random.Random], str], str]] = {
    "arithmetic": (_arithmetic_line, "\n"),
    "english": (_english_sentence, " "),
    "code": (_code_function, "\n"),
    "json": (_json_record, ",\n"),
    "dna": (_dna_record, "\n"),
}


def _document(domain: str, rng: random.Random) -> str:
    """One document of ``domain`` of about MIN_DOC_CHARS..MAX_DOC_CHARS characters."""
    unit, joiner = _GENERATORS[domain]
    target = rng.randint(MIN_DOC_CHARS, MAX_DOC_CHARS)
    units: List[str] = []
    num_chars = 0
    while num_chars < target:
        u = unit(rng)
        if num_chars >= MIN_DOC_CHARS and num_chars + len(u) > MAX_DOC_CHARS:
            break
        units.append(u)
        num_chars += len(u) + len(joiner)
    text = joiner.join(units)
    if domain == "json":
        text = "[\n" + text + "\n]"
    return text


def build_corpus(
    size_bytes: int = 2_500_000,
    seed: int = 0,
    domains: Optional[Sequence[str]] = None,
) -> datasets.Dataset:
    """Generate the built-in multi-domain corpus.

    Args:
        size_bytes: total UTF-8 bytes of text to generate (at least this many).
        seed: the corpus is a pure function of ``(size_bytes, seed, domains)``.
        domains: subset of :data:`DOMAINS` (default: all of them).

    Returns:
        A ``datasets.Dataset`` with columns ``text`` (one document per row) and ``domain``.
        Each domain gets about ``size_bytes / len(domains)`` bytes, and rows of different
        domains are interleaved.
    """
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
        raise ConfigError(f"size_bytes must be a positive int, got {size_bytes!r}")
    if domains is None:
        domains = DOMAINS
    if isinstance(domains, str):
        raise ConfigError(f"domains must be a sequence of domain names, got the string {domains!r}")
    domains = tuple(domains)
    unknown = [d for d in domains if d not in _GENERATORS]
    if not domains or unknown:
        raise ConfigError(
            f"domains must be a non-empty subset of {list(DOMAINS)}, got {list(domains)}"
        )
    if len(set(domains)) != len(domains):
        raise ConfigError(f"domains must not repeat a name, got {list(domains)}")

    # Each domain has its own RNG, so a domain's documents do not depend on the others.
    bytes_per_domain = -(-size_bytes // len(domains))  # ceil
    docs: Dict[str, List[str]] = {}
    for domain in domains:
        rng = random.Random(f"moe_lab-corpus-{seed}-{domain}")
        docs[domain] = []
        num_bytes = 0
        while num_bytes < bytes_per_domain:
            doc = _document(domain, rng)
            docs[domain].append(doc)
            num_bytes += len(doc)  # all generators emit ASCII: chars == bytes

    # Interleave: always emit next from the domain that has emitted the fewest bytes.
    texts: List[str] = []
    labels: List[str] = []
    emitted = {d: 0 for d in domains}
    position = {d: 0 for d in domains}
    while True:
        pending = [d for d in domains if position[d] < len(docs[d])]
        if not pending:
            break
        domain = min(pending, key=lambda d: emitted[d])
        doc = docs[domain][position[domain]]
        position[domain] += 1
        emitted[domain] += len(doc)
        texts.append(doc)
        labels.append(domain)
    return datasets.Dataset.from_dict({"text": texts, "domain": labels})


def train_eval_split(
    dataset: datasets.Dataset,
    eval_fraction: float = 0.05,
    seed: int = 0,
    label_column: str = "domain",
) -> Tuple[datasets.Dataset, datasets.Dataset]:
    """Split a dataset into (train, eval), stratified by ``label_column`` when present.

    Every label with at least 2 rows puts at least one row into eval. Rows keep their
    original order inside each split. Deterministic for a given ``seed``.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise InputError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    is_number = isinstance(eval_fraction, (int, float)) and not isinstance(eval_fraction, bool)
    if not is_number or not 0 < eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be a float in (0, 1), got {eval_fraction!r}")
    if len(dataset) < 2:
        raise InputError(f"need at least 2 rows to split into train and eval, got {len(dataset)}")

    if label_column in dataset.column_names:
        groups: Dict[object, List[int]] = {}
        for i, label in enumerate(dataset[label_column]):
            groups.setdefault(label, []).append(i)
    else:
        groups = {None: list(range(len(dataset)))}

    rng = random.Random(f"moe_lab-split-{seed}")
    eval_indices: List[int] = []
    for label in sorted(groups, key=str):
        indices = groups[label]
        if len(indices) < 2:
            continue
        num_eval = min(len(indices) - 1, max(1, round(len(indices) * eval_fraction)))
        eval_indices += rng.sample(indices, num_eval)
    eval_set = set(eval_indices)
    train_indices = [i for i in range(len(dataset)) if i not in eval_set]
    return dataset.select(train_indices), dataset.select(sorted(eval_indices))
