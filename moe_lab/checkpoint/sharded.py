"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes only
the pieces it holds, and a checkpoint saved at one layout loads at any other.

    save_sharded(model, optimizer, "ckpt/step-3", extra={"scheduler": sched.state_dict()})   # every rank
    extra = load_sharded(model, optimizer, "ckpt/step-3")      # any layout, or one process
    consolidate("ckpt/step-3", "export/model")                 # -> config.json + model.safetensors
    write_sharded_checkpoint("ckpt/step-3", model, opt, scheduler_state=..., trainer_state=...)  # the trainer's

The trainer writes its step checkpoints (``checkpoints/step-N``) in this format when
``training.checkpoint_format`` is "sharded", or "auto" at a layout that shards parameters
(dp_shard, tp or pp > 1): no rank ever gathers the full model or optimizer state for them.
It resumes from one at any layout (``ShardedCheckpoint.load_sharded``, after sharding). The
final ``model/`` is always the full format.

A sharded checkpoint directory holds ``config.json`` (the model's MoEConfig, as in the full
format), ``sharded.json`` (the format marker, the optimizer's hyper-parameters and the JSON
``extra``) and ``dcp/`` (DCP's ``.metadata`` and one ``.distcp`` file per rank; DCP
deduplicates replicated pieces, so each element is written once); a training checkpoint
also has the full format's ``scheduler.json``, ``trainer_state.json``, ``routing_stats.json``
and tokenizer files. Pipeline stages need nothing special: each rank's state dict holds its
stages' parameters under their one-process names, and DCP merges the ranks' keys.

Keys are the parameter names (``model.<name>``, ``optim.<name>.<state>``), and every tensor
is stored with its *global* shape: DTensors (FSDP2, TP) are that already; expert parameters
under expert parallelism, which each rank holds as its own rows ``[E/ep, ...]``, are saved as
a DTensor over the ``ep`` mesh (``Shard(0)``: global ``[E, ...]``). DCP reshards on load, so
the layout that loads need not be the one that saved.

:func:`consolidate` is the bridge to everything that reads the full format
(``load_pretrained_moe``, ``moe-lab export``, serving): it loads the sharded checkpoint into
a one-process model (DCP runs without a process group) and writes ``config.json`` +
``model.safetensors`` with :func:`~moe_lab.checkpoint.writer.write_checkpoint`.
``Checkpoint.open`` of a sharded directory does it transparently, on first use of the
weights, into a private temporary directory (:class:`~moe_lab.checkpoint.reader.ShardedCheckpoint`),
so every reader takes either format. We use
this consolidation step rather than DCP's Hugging Face storage writer so that the output is
exactly the full format, with its metadata and checks.

Writing is atomic: rank 0 creates a temporary directory next to the target and broadcasts
its name; every rank writes its shards there; after a barrier rank 0 adds the JSON files and
renames it into place (:class:`~moe_lab.checkpoint.files.AtomicDirectory`). A crash leaves
the previous checkpoint untouched. Nothing untrusted is unpickled: the tensors are raw
bytes read by DCP's tensor reader, the JSON is read by ``json``, and DCP's ``.metadata`` (a
pickle) by an unpickler that allows only DCP's metadata classes, ``torch.Size``, dtypes and
paths.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError
from .files import (
    CONFIG_NAME,
    DCP_DIR,
    ROUTING_STATS,
    SCHEDULER_NAME,
    SHARDED_META,
    TRAINER_STATE,
    AtomicDirectory,
    is_sharded_checkpoint,
    read_json_object,
    write_json_atomic,
)

FORMAT = "moe_lab.sharded/1"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


#: what DCP's ``.metadata`` pickle may name: its own metadata classes, torch.Size, dtypes,
#: layouts and paths (nothing else is looked up, so no other code can run)
_METADATA_MODULES = {
    "torch.distributed.checkpoint.metadata": None,  # its dataclasses and enums (types only)
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": None,  # torch.Size and dtypes (checked below)
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` (a pickle) allowing only what DCP's metadata is made of."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _METADATA_MODULES.get(module, set())
        if allowed is not None and name not in allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")
        obj = super().find_class(module, name)
        if module == "torch" and not (obj is torch.Size or isinstance(obj, torch.dtype)):
            raise pickle.UnpicklingError(f"torch.{name} is not part of DCP's metadata")
        if module.endswith(".metadata") and not isinstance(obj, type):
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")
        return obj


def _reader(dcp_dir: Path) -> Any:
    """DCP's file-system reader whose metadata is read with :class:`_MetadataUnpickler`
    (DCP's own ``pickle.load`` would run whatever a tampered ``.metadata`` names)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except OSError as exc:
                raise CheckpointError(f"cannot read the sharded checkpoint's metadata {path}: {exc}") from None
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as exc:
                raise CheckpointError(f"{path} is not DCP metadata ({exc}); refused, nothing was executed") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(dcp_dir))


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns on every one-process save/load ("assuming the intent is to ... in a single
    process"); one process is a supported case here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _ep_mesh(model: nn.Module) -> Optional[Any]:
    """The 1D ``ep`` DeviceMesh of a parallelized model (None without expert parallelism)."""
    groups = getattr(model, "parallel_groups", None)
    if groups is None or groups.expert_parallel_size == 1:
        return None
    if groups.mesh is None:  # each rank's experts would be saved as the same (replicated) key
        raise CheckpointError(
            f"sharded checkpoints need the device mesh of moe_lab.parallel.parallelize; this model's expert "
            f"parallelism (ep={groups.expert_parallel_size}) has none: use checkpoint_format='full'")
    return groups.mesh.mesh("ep")


def _expert_names(model: nn.Module) -> set:
    return set(model.expert_parameter_names()) if hasattr(model, "expert_parameter_names") else set()


def _global_view(t: torch.Tensor, ep_mesh: Optional[Any]) -> Tuple[torch.Tensor, Optional[Callable[[], None]]]:
    """An expert tensor as a DTensor of global shape ``[E, ...]`` over ``ep_mesh``, and the
    write-back that copies loaded values into ``t`` (its FSDP shard, if ``t`` is a DTensor)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    with torch.no_grad():  # a plain tensor that DCP loads into in place (no autograd history)
        rows = (t.full_tensor() if isinstance(t, DTensor) else t).detach()  # this rank's experts [E/ep, ...]
    view = DTensor.from_local(rows, ep_mesh, [Shard(0)], run_check=False)

    def write_back() -> None:
        loaded = view.to_local().detach()
        with torch.no_grad():
            if isinstance(t, DTensor):
                shard = distribute_tensor(loaded, t.device_mesh, t.placements, src_data_rank=None)
                t.to_local().copy_(shard.to_local())
            else:
                t.copy_(loaded)

    return view, write_back


def _state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Tuple[Dict[str, Any], List[Callable[[], None]]]:
    """The DCP state dict (global shapes, see the module docstring) and the write-backs that
    finish a load."""
    ep_mesh = _ep_mesh(model)
    experts = _expert_names(model) if ep_mesh is not None else set()
    state: Dict[str, Any] = {}
    write_backs: List[Callable[[], None]] = []

    def put(key: str, name: str, t: torch.Tensor) -> None:
        if name in experts and t.dim() > 0:
            state[key], wb = _global_view(t, ep_mesh)
            write_backs.append(wb)
        else:
            state[key] = t.detach() if isinstance(t, nn.Parameter) else t  # loaded in place

    params = dict(model.named_parameters())
    for name, t in model.state_dict().items():
        put(f"model.{name}", name, params[name] if name in params else t)
    if optimizer is not None:
        for name, p in params.items():
            for key, val in (optimizer.state.get(p) or {}).items():
                if isinstance(val, torch.Tensor):
                    put(f"optim.{name}.{key}", name, val)
    return state, write_backs


def _hyper_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        g = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params"}
        g["params"] = [names[id(p)] for p in group["params"]]
        out.append(g)
    return out


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (a step with zero gradients at lr 0), so that a
    load has somewhere to put them. Weights do not move: AdamW's decay is scaled by lr."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def save_sharded(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    path: str | os.PathLike,
    extra: Optional[Dict[str, Any]] = None,
    files: Optional[Dict[str, Any]] = None,
    tokenizer: Any = None,
) -> Path:
    """Write a sharded checkpoint of ``model`` (and ``optimizer``) to ``path``, atomically.
    A collective under torch.distributed: every rank calls it with the same ``path``;
    ``extra`` (JSON kept in ``sharded.json``), ``files`` (file name -> JSON, written beside
    the shards) and ``tokenizer`` (its ``save_pretrained``) are taken from rank 0."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    rank0 = not _distributed() or dist.get_rank() == 0
    atomic = AtomicDirectory(path) if rank0 else None
    tmp = [str(atomic.__enter__()) if atomic is not None else None]
    try:
        if _distributed():
            dist.broadcast_object_list(tmp, src=0)
        state, _ = _state(model, optimizer)
        with _single_process_quietly():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(Path(tmp[0]) / DCP_DIR)),
                     no_dist=not _distributed())
        if _distributed():
            dist.barrier()  # every rank's shards are written
    except BaseException as exc:
        if atomic is not None:
            atomic.__exit__(type(exc), exc, exc.__traceback__)
        raise
    failure: List[Optional[str]] = [None]  # rank 0 finishes the directory; every rank learns how it went
    if atomic is not None:
        try:
            _check_all_shards_here(Path(tmp[0]) / DCP_DIR)
            meta: Dict[str, Any] = {"format": FORMAT, "extra": extra or {}}
            if optimizer is not None:
                meta["optimizer"] = {"class": type(optimizer).__name__,
                                     "param_groups": _hyper_parameters(model, optimizer)}
            write_json_atomic(Path(tmp[0]) / CONFIG_NAME, model.config.to_dict())
            write_json_atomic(Path(tmp[0]) / SHARDED_META, meta)
            for name, data in (files or {}).items():
                write_json_atomic(Path(tmp[0]) / name, data)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp[0])
            atomic.__exit__(None, None, None)  # the rename into place
        except BaseException as exc:
            if Path(tmp[0]).exists():
                atomic.__exit__(type(exc), exc, exc.__traceback__)
            if _distributed():
                failure[0] = f"{type(exc).__name__}: {exc}"
                dist.broadcast_object_list(failure, src=0)
            raise
    if _distributed():
        dist.broadcast_object_list(failure, src=0)  # and nobody reads ``path`` before it exists
        if failure[0] is not None:
            raise CheckpointError(f"rank 0 could not finish the sharded checkpoint {path}: {failure[0]}")
    return path


def _check_all_shards_here(dcp_dir: Path) -> None:
    """Every file DCP's metadata lists is in ``dcp_dir``: the ranks share this file system (on
    separate disks, another node's shards would be missing and the checkpoint incomplete)."""
    storage = getattr(_reader(dcp_dir).read_metadata(), "storage_data", None) or {}
    missing = sorted({info.relative_path for info in storage.values()} - {p.name for p in dcp_dir.iterdir()})
    if missing:
        raise CheckpointError(
            f"sharded checkpoint {dcp_dir.parent}: the shards {missing[:4]} of other ranks are not in this "
            "directory; sharded checkpoints need an output_dir that every worker shares (a shared file system), "
            "else set training.checkpoint_format=full")


def write_sharded_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    scheduler_state: Optional[Dict[str, Any]] = None,
    trainer_state: Optional[Dict[str, Any]] = None,
    routing_stats: Optional[Dict[str, Any]] = None,
    tokenizer: Any = None,
    extra_files: Optional[Dict[str, Any]] = None,
) -> Path:
    """A training checkpoint in the sharded format (the counterpart of
    :func:`~moe_lab.checkpoint.writer.write_checkpoint`): model and optimizer as DCP shards,
    every rank writing only its own pieces (no gather), and the trainer's small JSON files
    (``scheduler.json``, ``trainer_state.json``, ``routing_stats.json``, tokenizer) beside
    them, as in the full format. A collective; the JSON is taken from rank 0."""
    files: Dict[str, Any] = {}
    for name, data in ((SCHEDULER_NAME, scheduler_state), (TRAINER_STATE, trainer_state),
                       (ROUTING_STATS, routing_stats)):
        if data is not None:
            files[name] = data
    files.update(extra_files or {})
    return save_sharded(model, optimizer, path, files=files, tokenizer=tokenizer)


def load_sharded(
    model: nn.Module, optimizer: Optional[torch.optim.Optimizer], path: str | os.PathLike,
    collective: Optional[bool] = None,
) -> Dict[str, Any]:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``) at whatever layout they
    have now (a collective under torch.distributed; works in one process too). Returns the
    ``extra`` JSON it was saved with. CheckpointError when ``path`` is not a sharded
    checkpoint or does not fit the model. ``collective=False`` loads a one-process model in
    this process alone even where a process group exists (default: collective when one does)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint (expected {SHARDED_META} and {DCP_DIR}/)")
    meta = read_json_object(path / SHARDED_META)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / SHARDED_META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{path} holds no optimizer state")
        saved_groups = meta["optimizer"]["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise CheckpointError(f"{path}: the optimizer had {len(saved_groups)} parameter groups, this one has "
                                  f"{len(optimizer.param_groups)}")
        _init_optimizer_state(optimizer)
    from torch.distributed.checkpoint.api import CheckpointException

    _reader(path / DCP_DIR).read_metadata()  # a tampered or corrupt .metadata: CheckpointError here
    state, write_backs = _state(model, optimizer)
    try:
        with _single_process_quietly():
            dcp.load(state, storage_reader=_reader(path / DCP_DIR),
                     no_dist=not (_distributed() if collective is None else collective))
    except (RuntimeError, ValueError, KeyError, CheckpointException) as exc:
        raise CheckpointError(f"cannot load the sharded checkpoint {path} into this model: {exc}") from exc
    for wb in write_backs:
        wb()
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})
    return meta.get("extra", {})


def consolidate(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Turn the sharded checkpoint at ``path`` into a full checkpoint directory ``out``
    (``config.json`` + ``model.safetensors``, what ``load_pretrained_moe``, ``moe-lab export``
    and serving read), in this one process, atomically. Returns ``out``."""
    from ..model import MoEModel
    from .writer import write_checkpoint

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint (expected {SHARDED_META} and {DCP_DIR}/)")
    model = MoEModel.from_config(read_json_object(path / CONFIG_NAME))
    extra = load_sharded(model, None, path, collective=False)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return write_checkpoint(out, model.config, state, scheduler_state=extra.get("scheduler"))
