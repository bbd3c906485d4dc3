"""Tokenizer files that ``transformers.AutoTokenizer`` loads, for moe_lab's tokenizers.

    save_hf_tokenizer(ByteTokenizer(), "out/")      # tokenizer.json + tokenizer_config.json
    AutoTokenizer.from_pretrained("out/")("héllo")  # the same ids as ByteTokenizer().encode("héllo")
    load_hf_tokenizer("out/")                       # back to a ByteTokenizer

- :class:`~moe_lab.data.ByteTokenizer` becomes an equivalent ``tokenizers`` byte-level BPE
  with no merges: the 256 byte tokens keep ids 0-255 and ``<pad>``/``<bos>``/``<eos>`` keep
  256/257/258, so text encodes and decodes to the same ids.
- :class:`~moe_lab.data.BPETokenizer` is already a ``tokenizers`` BPE; its ``tokenizer.json``
  is written as it is.
- A ``transformers`` tokenizer is saved with its own ``save_pretrained``.

Both of ours encode without special tokens by default (``tok(text)`` gives the same ids as
ours), never split a literal ``"<eos>"`` in text into the special token
(``split_special_tokens``), and never clean up spaces on decode. ``tokenizer_config.json``
records which moe_lab tokenizer it came from (``moe_lab_tokenizer_class``) so that an import
gives the same tokenizer object back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import ConfigError, InputError
from ._io import PathLike

# The same names as moe_lab.data.tokenizer; moe_lab.data is imported lazily (it loads `datasets`).
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
BYTE_PAD_ID = 256  # ByteTokenizer: <pad>=256, <bos>=257, <eos>=258
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
MARKER = "moe_lab_tokenizer_class"
#: files a transformers tokenizer may consist of
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    SPECIAL_TOKENS_MAP,
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def byte_level_vocab() -> Dict[str, int]:
    """The vocabulary of the byte tokenizer in ``tokenizers`` form: byte characters, then specials."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    for i, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = BYTE_PAD_ID + i
    return vocab


def byte_tokenizer_backend() -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to :class:`~moe_lab.data.ByteTokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    # use_regex=False: no word splitting, every byte becomes its own token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != BYTE_PAD_ID + i:  # pragma: no cover - tokenizers invariant
            raise ConfigError(f"special token {token!r} got id {tok.token_to_id(token)}")
    return tok


def _tokenizer_config(kind: str, model_max_length: Optional[int]) -> Dict[str, Any]:
    config: Dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "padding_side": "right",
        MARKER: kind,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    return config


def save_hf_tokenizer(tokenizer: Any, directory: PathLike, model_max_length: Optional[int] = None) -> List[str]:
    """Write files for ``transformers.AutoTokenizer`` into ``directory``; returns their names.

    Args:
        tokenizer: a ByteTokenizer, a BPETokenizer, or a ``transformers`` tokenizer.
        directory: where to write (created if needed).
        model_max_length: recorded in ``tokenizer_config.json`` (the model's context length).
    """
    from ..data.tokenizer import BPETokenizer, ByteTokenizer, MoETokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, ByteTokenizer):
        backend, kind = byte_tokenizer_backend(), "ByteTokenizer"
    elif isinstance(tokenizer, BPETokenizer):
        backend, kind = tokenizer.backend_tokenizer, "BPETokenizer"
    elif isinstance(tokenizer, MoETokenizer):
        raise InputError(f"cannot export a {type(tokenizer).__name__} for transformers")
    elif callable(getattr(tokenizer, "save_pretrained", None)):
        return [Path(p).name for p in tokenizer.save_pretrained(str(directory))]
    else:
        raise InputError(
            f"tokenizer must be a ByteTokenizer, a BPETokenizer or a transformers tokenizer, "
            f"got {type(tokenizer).__name__}"
        )
    backend.save(str(directory / TOKENIZER_FILE))
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    (directory / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps(_tokenizer_config(kind, model_max_length), indent=2) + "\n", encoding="utf-8"
    )
    (directory / SPECIAL_TOKENS_MAP).write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP]


def has_tokenizer_files(directory: PathLike) -> bool:
    d = Path(directory)
    return (d / TOKENIZER_FILE).is_file() or (d / "tokenizer.model").is_file() or (d / "vocab.json").is_file()


def load_hf_tokenizer(directory: PathLike) -> Optional[Any]:
    """The tokenizer of a transformers directory, or None if it has no tokenizer files.

    Files written by :func:`save_hf_tokenizer` come back as the moe_lab tokenizer they came
    from (a ByteTokenizer only if the vocabulary is still exactly the byte vocabulary); any
    other tokenizer is loaded with ``transformers.AutoTokenizer`` (via
    :func:`moe_lab.data.load_tokenizer`).
    """
    d = Path(directory)
    if not has_tokenizer_files(d):
        return None
    config_path = d / TOKENIZER_CONFIG_FILE
    config: Dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {config_path}: {exc}") from None
    kind = config.get(MARKER) if isinstance(config, dict) else None
    if kind in ("ByteTokenizer", "BPETokenizer") and (d / TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer

        from ..data.tokenizer import BPETokenizer, ByteTokenizer

        backend = Tokenizer.from_file(str(d / TOKENIZER_FILE))
        if kind == "ByteTokenizer" and backend.get_vocab(with_added_tokens=True) == byte_level_vocab():
            return ByteTokenizer()
        if kind == "BPETokenizer":
            return BPETokenizer(backend)
    from ..data.tokenizer import load_tokenizer

    return load_tokenizer(str(d))


def copy_tokenizer_files(src: PathLike, dst: PathLike) -> List[str]:
    """Copy the tokenizer files of a transformers directory (the ones that exist)."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copyfile(p, Path(dst) / name)
            copied.append(name)
    return copied
