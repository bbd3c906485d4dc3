"""Tokenizers: a built-in byte-level one, a trainable byte-level BPE, and a loader.

Both of ours share :class:`MoETokenizer`, which gives them the familiar Hugging Face
interface (``__call__``, ``encode``, ``decode``, ``batch_decode``, ``pad``,
``save_pretrained``, ``from_pretrained``), so that the rest of moe_lab can take either
ours or a ``transformers`` tokenizer.

Usage::

    from moe_lab.data import ByteTokenizer, train_bpe_tokenizer, load_tokenizer

    tok = ByteTokenizer()                                   # vocab_size 259, nothing to train
    batch = tok(["hi", "hello"], padding=True, return_tensors="pt")
    batch["input_ids"].shape                                # [2, 5]

    bpe = train_bpe_tokenizer(texts, vocab_size=1024)      # byte-level BPE
    bpe.save_pretrained("out/tok")
    tok = load_tokenizer("out/tok")                         # or "byte", or a transformers dir

Special tokens are always ``<pad>``, ``<bos>`` and ``<eos>``. ``add_special_tokens=True``
prepends ``<bos>`` and appends ``<eos>``. Text that happens to contain the string
``"<eos>"`` is encoded as plain text, never as the special token.
"""

from __future__ import annotations

import abc
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import ConfigError, InputError

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

_PADDING_STRATEGIES = (False, True, "do_not_pad", "longest", "max_length")

TextInput = Union[str, Sequence[str]]
PathLike = Union[str, "os.PathLike[str]"]


def _check_max_length(max_length: Optional[int]) -> None:
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive int or None, got {max_length!r}")


def _to_id_list(ids: Any) -> List[int]:
    """A list/tuple/tensor/int of token ids as a flat list of python ints."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise InputError(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        return ids.reshape(-1).tolist()
    if isinstance(ids, int):
        return [ids]
    if hasattr(ids, "tolist"):  # numpy arrays
        ids = ids.tolist()
    return [int(i) for i in ids]


class MoETokenizer(abc.ABC):
    """Abstract base class of moe_lab's tokenizers: the shared Hugging Face-like interface.

    Subclasses implement ``vocab_size``, ``_encode_batch`` (texts to ids, no specials),
    ``_decode_one`` and ``_save_files``/``_from_dir``.
    """

    pad_token = PAD_TOKEN
    bos_token = BOS_TOKEN
    eos_token = EOS_TOKEN
    padding_side = "right"
    model_input_names = ["input_ids", "attention_mask"]

    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    # -- to implement ------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @abc.abstractmethod
    def _encode_batch(self, texts: List[str]) -> List[List[int]]:
        """Texts to ids, no special tokens."""

    @abc.abstractmethod
    def _decode_one(self, ids: List[int], skip_special_tokens: bool) -> str:
        """Ids to text."""

    def _save_files(self, directory: Path) -> List[str]:
        return []

    @classmethod
    @abc.abstractmethod
    def _from_dir(cls, directory: Path, config: Dict[str, Any]) -> "MoETokenizer":
        """Rebuild from the files ``_save_files`` wrote."""

    # -- shared interface --------------------------------------------------------------
    @property
    def all_special_ids(self) -> List[int]:
        return [self.pad_token_id, self.bos_token_id, self.eos_token_id]

    @property
    def all_special_tokens(self) -> List[str]:
        return [self.pad_token, self.bos_token, self.eos_token]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """Token ids of one string; with ``add_special_tokens`` as ``[bos, ..., eos]``."""
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode_batch([text])[0]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids + [self.eos_token_id]
        return ids

    def __call__(
        self,
        text: TextInput,
        max_length: Optional[int] = None,
        truncation: bool = False,
        padding: Union[bool, str] = False,
        add_special_tokens: bool = False,
        return_tensors: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Tokenize a string or a list of strings.

        Args:
            text: one string, or a list of strings.
            max_length: length to truncate to (``truncation=True``) or pad to
                (``padding="max_length"``).
            truncation: cut sequences to ``max_length`` (the specials are kept).
            padding: False/"do_not_pad", True/"longest" (to the longest sequence) or
                "max_length". Padding is on the right with ``pad_token_id``.
            add_special_tokens: prepend ``<bos>`` and append ``<eos>``.
            return_tensors: None for python lists, "pt" for int64 tensors [batch, seq]
                (a single string gives batch 1).

        Returns:
            ``{"input_ids": ..., "attention_mask": ...}``.
        """
        single = isinstance(text, str)
        if single:
            texts = [text]
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise InputError(
                f"text must be a str or a list of str, got {type(text).__name__}"
                + (" containing non-str items" if isinstance(text, (list, tuple)) else "")
            )
        _check_max_length(max_length)
        if truncation and max_length is None:
            raise ConfigError("truncation=True needs max_length (a positive int), got None")

        num_specials = 2 if add_special_tokens else 0
        encoded = []
        for ids in self._encode_batch(texts):
            if truncation:
                ids = ids[: max(max_length - num_specials, 0)]
            if add_special_tokens:
                ids = [self.bos_token_id] + ids + [self.eos_token_id]
                if truncation:
                    ids = ids[:max_length]
            encoded.append(ids)

        result = {"input_ids": encoded, "attention_mask": [[1] * len(ids) for ids in encoded]}
        if padding not in (False, "do_not_pad"):
            result = self.pad(result, padding=padding, max_length=max_length)
        if return_tensors is not None:
            return self._as_tensors(result, return_tensors)
        if single:
            return {key: value[0] for key, value in result.items()}
        return result

    def pad(
        self,
        encoded_inputs: Union[Dict[str, Any], List[Dict[str, Any]]],
        padding: Union[bool, str] = True,
        max_length: Optional[int] = None,
        return_tensors: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Right-pad a batch of encodings to a common length.

        Args:
            encoded_inputs: ``{"input_ids": [[...], ...], ...}`` or a list of
                ``{"input_ids": [...], ...}`` rows (ids as lists or 1-D tensors).
            padding: True/"longest" pads to the longest row, "max_length" to
                ``max_length``; False/"do_not_pad" leaves rows as they are.
            max_length: target length for "max_length" padding.
            return_tensors: None or "pt".
        """
        if padding not in _PADDING_STRATEGIES:
            raise ConfigError(
                f"padding must be one of {list(_PADDING_STRATEGIES)}, got {padding!r}"
            )
        _check_max_length(max_length)
        if padding == "max_length" and max_length is None:
            raise ConfigError('padding="max_length" needs max_length (a positive int), got None')

        if isinstance(encoded_inputs, (list, tuple)):
            if not encoded_inputs or not all(isinstance(row, dict) for row in encoded_inputs):
                raise InputError("pad expects a non-empty list of dicts or a dict of lists")
            rows = encoded_inputs
            encoded_inputs = {key: [row[key] for row in rows] for key in rows[0]}
        if not isinstance(encoded_inputs, dict) or "input_ids" not in encoded_inputs:
            raise InputError(
                f"pad expects a dict with 'input_ids', got {type(encoded_inputs).__name__}"
                + (f" with keys {list(encoded_inputs)}" if isinstance(encoded_inputs, dict) else "")
            )

        input_ids = [_to_id_list(ids) for ids in encoded_inputs["input_ids"]]
        if "attention_mask" in encoded_inputs:
            masks = [_to_id_list(m) for m in encoded_inputs["attention_mask"]]
        else:
            masks = [[1] * len(ids) for ids in input_ids]

        if padding in (False, "do_not_pad"):
            target = None
        elif padding == "max_length":
            target = max_length
        else:
            target = max((len(ids) for ids in input_ids), default=0)
        if target is not None:
            for i, ids in enumerate(input_ids):
                num_pad = max(target - len(ids), 0)
                input_ids[i] = ids + [self.pad_token_id] * num_pad
                masks[i] = masks[i] + [0] * num_pad

        result = dict(encoded_inputs)
        result["input_ids"], result["attention_mask"] = input_ids, masks
        if return_tensors is not None:
            return self._as_tensors(result, return_tensors)
        return result

    def _as_tensors(self, encoded: Dict[str, Any], return_tensors: str) -> Dict[str, Any]:
        if return_tensors != "pt":
            raise ConfigError(f'return_tensors must be None or "pt", got {return_tensors!r}')
        out = dict(encoded)
        for key in ("input_ids", "attention_mask"):
            rows = encoded[key]
            lengths = sorted({len(row) for row in rows})
            if len(lengths) > 1:
                raise InputError(
                    f"cannot make a tensor of {key} with different lengths {lengths}; "
                    'use padding=True or padding="max_length"'
                )
            out[key] = torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)  # [batch, seq]
        return out

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (list, tuple or 1-D tensor)."""
        ids = _to_id_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(
                f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}"
                + (" ..." if len(bad) > 5 else "")
            )
        return self._decode_one(ids, skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> List[str]:
        """Decode each row of a list of id lists or a 2-D tensor [batch, seq]."""
        if isinstance(sequences, torch.Tensor):
            if sequences.dim() != 2:
                raise InputError(
                    "batch_decode expects a 2-D tensor [batch, seq], "
                    f"got shape {tuple(sequences.shape)}"
                )
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def save_pretrained(self, save_directory: PathLike) -> Tuple[str, ...]:
        """Write ``tokenizer_config.json`` (and the class's own files) into a directory."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise InputError(f"save_directory {str(directory)!r} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        files = self._save_files(directory)
        config = {
            "tokenizer_class": type(self).__name__,
            "vocab_size": self.vocab_size,
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "padding_side": self.padding_side,
        }
        config_path = directory / TOKENIZER_CONFIG_FILE
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        return (str(config_path), *files)

    @classmethod
    def from_pretrained(cls, directory: PathLike) -> "MoETokenizer":
        """Load a tokenizer saved with :meth:`save_pretrained`.

        ``MoETokenizer.from_pretrained`` picks the class named in the config; a subclass
        checks that the directory holds its own class.
        """
        directory = Path(directory)
        config = _read_tokenizer_config(directory)
        if config is None:
            raise ConfigError(
                f"{str(directory)!r} is not a saved tokenizer: no {TOKENIZER_CONFIG_FILE} in it"
            )
        name = config.get("tokenizer_class")
        if name not in _TOKENIZER_CLASSES:
            raise ConfigError(
                f"tokenizer_class in {str(directory / TOKENIZER_CONFIG_FILE)!r} must be one of "
                f"{sorted(_TOKENIZER_CLASSES)}, got {name!r}"
            )
        klass = _TOKENIZER_CLASSES[name]
        if cls is not MoETokenizer and klass is not cls:
            raise ConfigError(f"{str(directory)!r} holds a {name}, not a {cls.__name__}")
        return klass._from_dir(directory, config)


class ByteTokenizer(MoETokenizer):
    """UTF-8 bytes as tokens: ids 0-255 are bytes, then ``<pad>``, ``<bos>``, ``<eos>``."""

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258

    @property
    def vocab_size(self) -> int:
        return 259

    def _encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def _decode_one(self, ids: List[int], skip_special_tokens: bool) -> str:
        special_text = dict(zip(self.all_special_ids, self.all_special_tokens))
        pieces: List[str] = []
        run: List[int] = []  # bytes since the last special token
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            pieces.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
            if not skip_special_tokens:
                pieces.append(special_text[i])
        pieces.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(pieces)

    @classmethod
    def _from_dir(cls, directory: Path, config: Dict[str, Any]) -> "ByteTokenizer":
        return cls()


class BPETokenizer(MoETokenizer):
    """A byte-level BPE ``tokenizers.Tokenizer`` behind the :class:`MoETokenizer` interface.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose vocabulary holds ``<pad>``, ``<bos>``
            and ``<eos>`` (as :func:`train_bpe_tokenizer` makes).
    """

    def __init__(self, tokenizer: Any):
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise InputError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ConfigError(f"the BPE vocabulary lacks the special tokens {missing}")
        self._tokenizer = tokenizer
        # Encode a literal "<eos>" in the text as text, as ByteTokenizer does.
        self._tokenizer.encode_special_tokens = True
        self.pad_token_id = ids[PAD_TOKEN]
        self.bos_token_id = ids[BOS_TOKEN]
        self.eos_token_id = ids[EOS_TOKEN]

    @property
    def backend_tokenizer(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode_batch(self, texts: List[str]) -> List[List[int]]:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def _decode_one(self, ids: List[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _save_files(self, directory: Path) -> List[str]:
        path = directory / TOKENIZER_FILE
        self._tokenizer.save(str(path))
        return [str(path)]

    @classmethod
    def _from_dir(cls, directory: Path, config: Dict[str, Any]) -> "BPETokenizer":
        from tokenizers import Tokenizer

        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise ConfigError(f"BPE tokenizer directory {str(directory)!r} has no {TOKENIZER_FILE}")
        return cls(Tokenizer.from_file(str(path)))


_TOKENIZER_CLASSES = {"ByteTokenizer": ByteTokenizer, "BPETokenizer": BPETokenizer}


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer (``decode(encode(x)) == x`` for any text).

    Args:
        texts: training documents.
        vocab_size: final vocabulary size, including the 256 byte tokens and the 3
            specials, so it must be more than 259.
        min_frequency: a pair must occur this often to be merged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    num_base = 256 + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= num_base:
        raise ConfigError(
            f"vocab_size must be an int > {num_base} (256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens), got {vocab_size!r}"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ConfigError(f"min_frequency must be a positive int, got {min_frequency!r}")
    if isinstance(texts, str):
        raise InputError("texts must be an iterable of documents, got a single str")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((t for t in texts if isinstance(t, str)), trainer=trainer)
    return BPETokenizer(tokenizer)


def _read_tokenizer_config(directory: Path) -> Optional[Dict[str, Any]]:
    path = directory / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {str(path)!r}: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def load_tokenizer(spec: Optional[PathLike] = None) -> Any:
    """Load a tokenizer from a short spec.

    Args:
        spec: None or ``"byte"`` for :class:`ByteTokenizer`; a directory saved by one of
            ours; otherwise anything ``transformers.AutoTokenizer.from_pretrained`` takes
            (a local directory or a hub name).

    Returns:
        One of ours, or a ``transformers`` tokenizer (given a pad token, the eos token,
        if it had none).
    """
    if spec is None or (isinstance(spec, str) and spec == "byte"):
        return ByteTokenizer()
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"tokenizer spec must be None, 'byte' or a path/name, got {spec!r}")

    path = Path(spec)
    if path.is_dir():
        config = _read_tokenizer_config(path)
        if config is not None and config.get("tokenizer_class") in _TOKENIZER_CLASSES:
            return MoETokenizer.from_pretrained(path)

    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ConfigError(
            f"tokenizer {str(spec)!r} is neither 'byte' nor a saved moe_lab tokenizer, and "
            "loading it needs the optional package transformers, which is not installed "
            "(pip install transformers)"
        ) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec))
    except Exception as error:  # hub/network/format errors all mean the same to the user
        raise ConfigError(
            f"cannot load tokenizer {str(spec)!r}: {type(error).__name__}: {error}"
        ) from error

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("tokenizer %r has no pad or eos token; adding %r", str(spec), PAD_TOKEN)
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def save_tokenizer(tokenizer: Any, directory: PathLike) -> Tuple[str, ...]:
    """Save one of ours or a ``transformers`` tokenizer into ``directory``."""
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise InputError(
            f"tokenizer must have a save_pretrained method, got {type(tokenizer).__name__}"
        )
    Path(directory).mkdir(parents=True, exist_ok=True)
    return tuple(tokenizer.save_pretrained(str(directory)))
