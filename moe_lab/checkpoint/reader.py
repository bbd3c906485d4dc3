"""``Checkpoint.open(dir)``: the one way a checkpoint directory is read.

    ckpt = Checkpoint.open("outputs/demo/model")         # or a transformers Mixtral directory
    ckpt.config                                           # MoEConfig (validated, one-line errors)
    model = ckpt.build_model(device="cpu")                # MoEModel with the weights, checked first
    tok = ckpt.tokenizer()                                # its tokenizer, else ByteTokenizer
    w = ckpt.weights(lazy=True, exclude=lambda n: ".experts." in n)   # read on demand
    ckpt.training_state().trainer_state["global_step"]; ckpt.routing_stats()
    ckpt.load_into(model, expert_slices=None)             # into an existing (sharded) model

What ``build_model`` does, in order, so that a corrupt or mismatched checkpoint is refused
before memory is allocated: read the safetensors headers only (checked against the file
sizes), refuse a ``num_layers`` the weights do not hold, build the model on the meta device,
compare every parameter's name, shape and dtype (and the total size) with the headers,
check the parameters fit the memory of the target device, and only then read the tensors
and put them in place (``load_state_dict(assign=True)``; the tied head is re-tied and the
rotary frequencies, a non-persistent buffer, recomputed).

Formats: a moe_lab checkpoint has no ``model_type`` in its ``config.json``. A transformers
directory (``model_type`` ``mixtral``, ``llama``, ``mistral``) is opened by a subclass that
:mod:`moe_lab.interop` registers (see :mod:`moe_lab.checkpoint.formats`); it converts the
config and the tensor names, and everything above applies to it unchanged.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import MoEConfig
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError
from .checks import Where, check_layer_count, check_memory, check_model_matches, compare_specs, model_specs
from .config_file import moe_config_from_json, read_config_json
from .files import CONFIG_NAME, TOKENIZER_FILES, find_weight_files, is_sharded_checkpoint, read_routing_stats
from .formats import reader_for
from .header import SafetensorsHeader, TensorSpec, read_header
from .hub import resolve_local_or_hub
from .training_state import TrainingState, read_training_state
from .weights import Exclude, LazyWeights, describe_key_mismatch, exclusion, restrict

DeviceLike = Union[None, str, torch.device]
DtypeLike = Union[None, str, torch.dtype]


class Checkpoint:
    """A checkpoint directory: its config, weights, tokenizer and training state.

    Open one with :meth:`open`; the constructor is for format subclasses.

    Attributes:
        path: the directory.
        config: the :class:`MoEConfig` (with the overrides given to :meth:`open`).
        raw_config: ``config.json`` as stored.
        format: ``"moe_lab"``, or the converted format (``"hf-mixtral"``, ...).
    """

    format: ClassVar[str] = "moe_lab"
    #: whether the stored tensor names are moe_lab's (False: ``_convert`` renames/stacks them)
    stores_model_names: ClassVar[bool] = True
    #: whether the weights may be sharded over several files with an index
    sharded: ClassVar[bool] = False

    def __init__(self, path: Path, raw_config: Dict[str, Any], overrides: Dict[str, Any]) -> None:
        self.path = path
        self.raw_config = raw_config
        self._overrides = dict(overrides)
        self.config: MoEConfig = self._make_config(raw_config, self._overrides)
        self._found: Optional[List[Path]] = self._weight_files_at_open()
        self._headers: Optional[List[SafetensorsHeader]] = None

    # ---- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, name_or_path: Union[str, os.PathLike], **overrides: Any) -> "Checkpoint":
        """Open a checkpoint directory (moe_lab or a registered transformers format), or a hub id.

        Args:
            name_or_path: the directory, or "org/name" on the Hugging Face hub.
            **overrides: MoEConfig fields to change (``dropout=0.0``, ``moe_backend``, ...);
                changing a shape makes :meth:`build_model` refuse the weights.

        Raises:
            CheckpointError: no such directory, no or invalid ``config.json``, no weights file,
                or an unknown ``model_type``. Weights are not read yet.
        """
        path = resolve_local_or_hub(name_or_path)
        raw = read_config_json(path)
        model_type = raw.get("model_type")
        if model_type is None and is_sharded_checkpoint(path):
            return ShardedCheckpoint.from_directory(path, raw, overrides)
        if model_type is None:
            return cls.from_directory(path, raw, overrides)
        return reader_for(str(model_type), path).from_directory(path, raw, overrides)

    @classmethod
    def from_directory(cls, path: Path, raw_config: Dict[str, Any], overrides: Dict[str, Any]) -> "Checkpoint":
        """The reader of this format for ``path`` whose ``config.json`` is ``raw_config``."""
        return cls(path, raw_config, overrides)

    # ---- format hooks (overridden by converting readers) ------------------------------
    def _make_config(self, raw: Dict[str, Any], overrides: Dict[str, Any]) -> MoEConfig:
        return moe_config_from_json(raw, self.path / CONFIG_NAME, **overrides)

    def _convert(self, tensors: Dict[str, torch.Tensor], config: MoEConfig) -> Dict[str, torch.Tensor]:
        """Stored tensors -> moe_lab names (identity here). Also run on meta tensors to check shapes."""
        return tensors

    def _read_tokenizer(self) -> Any:
        from ..data.tokenizer import load_tokenizer

        return load_tokenizer(str(self.path))

    @property
    def model_type(self) -> Optional[str]:
        """``config.json``'s ``model_type`` (None for a moe_lab checkpoint)."""
        return self.raw_config.get("model_type")

    # ---- weights ----------------------------------------------------------------------
    def _weight_files_at_open(self) -> Optional[List[Path]]:
        """The weight files, found (and checked to exist) when the checkpoint is opened;
        None: a format that makes them on first use (:class:`ShardedCheckpoint`)."""
        return find_weight_files(self.path, allow_shards=self.sharded)

    def _make_weight_files(self) -> List[Path]:
        raise AssertionError(f"{type(self).__name__} found its weight files when it was opened")

    @property
    def _files(self) -> List[Path]:
        if self._found is None:
            self._found = self._make_weight_files()
        return self._found

    @property
    def is_sharded(self) -> bool:
        """Whether this is a sharded (DCP) training checkpoint (see :class:`ShardedCheckpoint`)."""
        return False

    @property
    def weight_files(self) -> List[Path]:
        return list(self._files)

    def headers(self) -> List[SafetensorsHeader]:
        """The checked safetensors headers of the weight files (read once)."""
        if self._headers is None:
            self._headers = [read_header(f) for f in self._files]
        return self._headers

    def stored_specs(self) -> Dict[str, TensorSpec]:
        """Shape and dtype of every stored tensor, under its stored name (headers only)."""
        return {name: spec for h in self.headers() for name, spec in h.specs.items()}

    def tensor_specs(self, config: Optional[MoEConfig] = None) -> Dict[str, TensorSpec]:
        """Shape and dtype of every tensor under moe_lab names (converted on meta tensors: no data read)."""
        stored = self.stored_specs()
        if self.stores_model_names:
            return stored
        meta = {name: spec.meta() for name, spec in stored.items()}
        return {name: TensorSpec.of(t) for name, t in self._convert(meta, config or self.config).items()}

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype the floating weights are stored in (that of the embeddings)."""
        specs = self.tensor_specs()
        if "embed_tokens.weight" in specs:
            return specs["embed_tokens.weight"].dtype
        return next((s.dtype for s in specs.values() if s.dtype.is_floating_point), torch.float32)

    def weights(self, lazy: bool = False, exclude: Exclude = None) -> Mapping[str, torch.Tensor]:
        """The weights under moe_lab names (the tied ``lm_head.weight`` is not stored).

        Args:
            lazy: a mapping that reads each tensor when it is looked up (memory-mapped), with
                ``spec(name)`` and ``rows(name, start, stop)``. Converted formats (Mixtral)
                stack tensors and are read eagerly.
            exclude: tensor names, or a predicate on the name, to leave out.
        """
        raw = LazyWeights(self.headers(), exclude if self.stores_model_names else None)
        if self.stores_model_names:
            return raw if lazy else dict(raw.items())
        return restrict(self._convert(dict(raw.items()), self.config), exclude)

    def _where(self) -> Where:
        files = self._files
        desc = files[0].name if len(files) == 1 else f"{len(files)} safetensors shards"
        return Where(self.path / CONFIG_NAME, desc)

    # ---- building and loading models --------------------------------------------------
    def build_model(
        self, device: DeviceLike = "cpu", dtype: DtypeLike = None, exclude: Exclude = None, **overrides: Any
    ) -> nn.Module:
        """A :class:`~moe_lab.model.MoEModel` with this checkpoint's weights, checked before allocation.

        Args:
            device: "cpu" (default), "cuda", "cuda:N" or "auto".
            dtype: floating dtype of the parameters; default float32 (as ``MoEModel`` builds).
            exclude: parameters not to load (names or a predicate): they stay on the meta
                device, for a caller that fills them itself (the expert cache).
            **overrides: more MoEConfig fields to change than those given to :meth:`open`.

        Raises:
            CheckpointError: corrupt files, weights that do not match the config (naming the
                fields), or parameters that do not fit the device's memory.
        """
        from ..model.transformer import MoEModel

        config = self._make_config(self.raw_config, {**self._overrides, **overrides}) if overrides else self.config
        device = resolve_device(device)
        dtype = resolve_dtype(dtype) or torch.float32
        where = self._where()
        stored = self.stored_specs()
        check_layer_count(config, stored, where)
        converted = self.tensor_specs(config)
        with meta_device():
            model = MoEModel(config=config)
        check_model_matches(model, stored, converted, config, where)
        skip = exclusion(exclude)
        wanted = {n: s for n, s in model_specs(model, config).items() if not skip(n)}
        itemsize = {n: dtype.itemsize if s.dtype.is_floating_point else s.dtype.itemsize for n, s in wanted.items()}
        check_memory(sum(s.numel * itemsize[n] for n, s in wanted.items()), device, config, where, dtype)
        # only now is data read: one tensor at a time, moved and cast, then put in place
        tensors = self.weights(lazy=True, exclude=lambda n: n not in wanted)
        state = {name: _to(tensors[name], device, dtype) for name in wanted if name in tensors}
        model.load_state_dict(state, strict=False, assign=True)
        _finish_materialising(model, config, device)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta and not skip(n)]
        if left:
            raise CheckpointError(f"{where.weights} left parameters unloaded: {left[:8]}")
        return model

    def load_into(self, model: nn.Module, expert_slices: Optional[Dict[str, slice]] = None) -> None:
        """Load the weights into an existing model, strictly (device and dtype are the model's).

        Args:
            model: a model of this checkpoint's architecture.
            expert_slices: for sharded experts, parameter name -> the rows of the full stored
                tensor this rank holds; only those rows are read.

        Raises:
            CheckpointError: missing, unexpected or mis-shaped tensors, all named.
        """
        config = getattr(model, "config", self.config)
        expected = model_specs(model, config)
        converted = self.tensor_specs()
        missing, unexpected, mismatched = compare_specs(expected, converted, expert_slices)
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"checkpoint {self.path} does not match the model: " + describe_key_mismatch(missing, unexpected, mismatched)
            )
        tensors = self.weights(lazy=True)
        state: Dict[str, torch.Tensor] = {}
        for name in expected:
            sl = (expert_slices or {}).get(name)
            if sl is not None and converted[name].shape[0] != expected[name].shape[0]:
                state[name] = tensors.rows(name, sl.start, sl.stop) if isinstance(tensors, LazyWeights) else tensors[name][sl]
            else:
                state[name] = tensors[name]
        if getattr(config, "tie_word_embeddings", False):
            state.setdefault("lm_head.weight", state["embed_tokens.weight"])
        model.load_state_dict(state, strict=True)

    # ---- the rest of the directory ----------------------------------------------------
    @property
    def has_tokenizer(self) -> bool:
        """Whether tokenizer files were saved with the checkpoint."""
        return any((self.path / name).is_file() for name in TOKENIZER_FILES)

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer if it has tokenizer files, else the built-in ``ByteTokenizer``."""
        if self.has_tokenizer:
            return self._read_tokenizer()
        from ..data.tokenizer import ByteTokenizer

        return ByteTokenizer()

    def training_state(self) -> TrainingState:
        """trainer_state.json, the optimizer tensors (lazy) and meta, scheduler.json (absent parts None)."""
        return read_training_state(self.path)

    def routing_stats(self) -> Optional[Dict[str, Any]]:
        """``routing_stats.json`` (tokens per expert per MoE layer over training), or None."""
        return read_routing_stats(self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, format={self.format!r})"


class ShardedCheckpoint(Checkpoint):
    """A sharded training checkpoint (``torch.distributed.checkpoint``, see
    :mod:`moe_lab.checkpoint.sharded`), read like any other.

    The trainer resumes from it at any layout with :meth:`load_sharded` (each rank reads its
    own pieces). Everything that wants the full format (``build_model``, ``load_pretrained_moe``,
    ``moe-lab export``, serving, ``weights``, ``load_into``) gets it transparently: on first
    use the checkpoint is consolidated in this process (:func:`~moe_lab.checkpoint.sharded.consolidate`)
    into a private temporary directory that lives as long as this object; the checkpoint
    itself is never modified. The config, tokenizer, trainer state and routing statistics are
    read from the directory as for a full checkpoint."""

    format: ClassVar[str] = "moe_lab-sharded"

    def _weight_files_at_open(self) -> Optional[List[Path]]:
        return None  # consolidated on first use

    def _make_weight_files(self) -> List[Path]:
        from .sharded import consolidate

        self._tmp = tempfile.TemporaryDirectory(prefix="moe-lab-consolidated-")  # removed with this object
        out = consolidate(self.path, Path(self._tmp.name) / "model")
        return find_weight_files(out, allow_shards=False)

    @property
    def is_sharded(self) -> bool:
        return True

    def load_sharded(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
        """Load the model (and optimizer) state into ``model``/``optimizer`` at their current
        layout (a collective under torch.distributed; one process works too)."""
        from .sharded import load_sharded

        return load_sharded(model, optimizer, self.path)


class _MetaWithoutReferenceKernels(TorchFunctionMode):
    """Keeps a meta build off PyTorch's Python meta kernels, whose first use imports
    torch._dynamo (seconds of a load): initialisers of meta tensors are skipped (there is no
    data to fill), and a small ``arange`` (the rotary frequencies) is made on the CPU so the
    arithmetic on it runs for real; the loader recomputes such buffers on the target device."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INIT_OPS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes tensor=...
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        if func is torch.arange and kwargs.get("device") is None and _arange_length(args) <= _SMALL:
            return func(*args, **{**kwargs, "device": "cpu"})
        return func(*args, **kwargs)


_INIT_OPS = frozenset(
    "normal_ uniform_ trunc_normal_ kaiming_uniform_ kaiming_normal_ xavier_uniform_ xavier_normal_ orthogonal_ "
    "sparse_ bernoulli_ exponential_ geometric_ log_normal_ cauchy_ random_ erfinv_ zero_ zeros_ ones_ fill_ "
    "constant_ eye_ dirac_".split()
)
_SMALL = 1 << 16


def _arange_length(bounds: Any) -> float:
    try:
        start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (bounds[0], bounds[1], (bounds[2:] or (1,))[0])
        return max(0.0, math.ceil((float(end) - float(start)) / float(step)))
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return math.inf


@contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the meta device (shapes and dtypes only), skipping their initialisers."""
    with torch.device("meta"), _MetaWithoutReferenceKernels():
        yield


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _finish_materialising(model: nn.Module, config: MoEConfig, device: torch.device) -> None:
    """What ``load_state_dict(assign=True)`` leaves to do: re-tie the head, recompute the
    rotary frequencies (a non-persistent buffer, never stored; kept in float32)."""
    from ..model.transformer import RotaryEmbedding

    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    with torch.device(device):
        model.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)


# ---------------------------------------------------------------------------------------
# the public loader
# ---------------------------------------------------------------------------------------

#: dense transformers formats: loadable as models, but not what load_pretrained_moe is for
_DENSE_MODEL_TYPES = ("llama", "mistral")


def load_pretrained_moe(model_name_or_path: Union[str, os.PathLike], **overrides: Any) -> nn.Module:
    """Load a moe_lab checkpoint directory (or a hub id when online) as a :class:`MoEModel`.

    Args:
        model_name_or_path: a checkpoint directory (``config.json`` + ``model.safetensors``),
            a transformers Mixtral directory (see :mod:`moe_lab.interop.hf_mixtral`), or a
            Hugging Face hub id when the hub is reachable.
        **overrides: MoEConfig fields to change on load (``dropout``, ``moe_backend``,
            ``capacity_factor``, ...). Changing shapes makes the load fail.

    Raises:
        CheckpointError: missing, truncated or mismatched files, with the reason.
    """
    path = resolve_local_or_hub(model_name_or_path)
    model_type = read_config_json(path).get("model_type")
    if model_type in _DENSE_MODEL_TYPES:
        raise CheckpointError(
            f"{path} is a transformers checkpoint of model_type {model_type!r}; load_pretrained_moe reads "
            "moe_lab checkpoints and transformers 'mixtral' directories (a dense 'llama'/'mistral' model can "
            "become an MoE with moe_lab.upcycle or `moe-lab upcycle`)"
        )
    return Checkpoint.open(path, **overrides).build_model()
