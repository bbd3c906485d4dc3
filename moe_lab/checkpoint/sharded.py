"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes only
the pieces it holds, and a checkpoint saved at one layout loads at any other.

    save_sharded(model, optimizer, "ckpt/step-3", extra={"scheduler": sched.state_dict()})   # every rank
    extra = load_sharded(model, optimizer, "ckpt/step-3")      # any layout, or one process
    consolidate("ckpt/step-3", "export/model")                 # -> config.json + model.safetensors

A sharded checkpoint directory holds ``config.json`` (the model's MoEConfig, as in the full
format), ``sharded.json`` (the format marker, the optimizer's hyper-parameters and the JSON
``extra``) and ``dcp/`` (DCP's ``.metadata`` and one ``.distcp`` file per rank; DCP
deduplicates replicated pieces, so each element is written once).

Keys are the parameter names (``model.<name>``, ``optim.<name>.<state>``), and every tensor
is stored with its *global* shape: DTensors (FSDP2, TP) are that already; expert parameters
under expert parallelism, which each rank holds as its own rows ``[E/ep, ...]``, are saved as
a DTensor over the ``ep`` mesh (``Shard(0)``: global ``[E, ...]``). DCP reshards on load, so
the layout that loads need not be the one that saved.

:func:`consolidate` is the bridge to everything that reads the full format
(``load_pretrained_moe``, ``moe-lab export``, serving): it loads the sharded checkpoint into
a one-process model (DCP runs without a process group) and writes ``config.json`` +
``model.safetensors`` with :func:`~moe_lab.checkpoint.writer.write_checkpoint`. We use
this consolidation step rather than DCP's Hugging Face storage writer so that the output is
exactly the full format, with its metadata and checks.

Writing is atomic: rank 0 creates a temporary directory next to the target and broadcasts
its name; every rank writes its shards there; after a barrier rank 0 adds the JSON files and
renames it into place (:class:`~moe_lab.checkpoint.files.AtomicDirectory`). A crash leaves
the previous checkpoint untouched. Nothing is unpickled: DCP's files are read by DCP's
tensor reader, the JSON by ``json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError
from .files import CONFIG_NAME, AtomicDirectory, read_json_object, write_json_atomic

SHARDED_META = "sharded.json"
DCP_DIR = "dcp"
FORMAT = "moe_lab.sharded/1"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded (DCP) checkpoint directory."""
    return (Path(path) / SHARDED_META).is_file() and (Path(path) / DCP_DIR).is_dir()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _ep_mesh(model: nn.Module) -> Optional[Any]:
    """The 1D ``ep`` DeviceMesh of a parallelized model (None without expert parallelism)."""
    groups = getattr(model, "parallel_groups", None)
    if groups is None or groups.expert_parallel_size == 1 or groups.mesh is None:
        return None
    return groups.mesh.mesh("ep")


def _expert_names(model: nn.Module) -> set:
    return set(model.expert_parameter_names()) if hasattr(model, "expert_parameter_names") else set()


def _global_view(t: torch.Tensor, ep_mesh: Optional[Any]) -> Tuple[torch.Tensor, Optional[Callable[[], None]]]:
    """An expert tensor as a DTensor of global shape ``[E, ...]`` over ``ep_mesh``, and the
    write-back that copies loaded values into ``t`` (its FSDP shard, if ``t`` is a DTensor)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    rows = t.full_tensor() if isinstance(t, DTensor) else t.detach()  # this rank's experts [E/ep, ...]
    view = DTensor.from_local(rows, ep_mesh, [Shard(0)], run_check=False)

    def write_back() -> None:
        loaded = view.to_local()
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
) -> Path:
    """Write a sharded checkpoint of ``model`` (and ``optimizer``) to ``path``, atomically.
    A collective under torch.distributed: every rank calls it with the same ``path``;
    ``extra`` (JSON: scheduler, trainer state) is taken from rank 0."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    rank0 = not _distributed() or dist.get_rank() == 0
    atomic = AtomicDirectory(path) if rank0 else None
    tmp = [str(atomic.__enter__()) if atomic is not None else None]
    try:
        if _distributed():
            dist.broadcast_object_list(tmp, src=0)
        state, _ = _state(model, optimizer)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(Path(tmp[0]) / DCP_DIR)))
        if _distributed():
            dist.barrier()
        if atomic is not None:
            meta: Dict[str, Any] = {"format": FORMAT, "extra": extra or {}}
            if optimizer is not None:
                meta["optimizer"] = {"class": type(optimizer).__name__,
                                     "param_groups": _hyper_parameters(model, optimizer)}
            write_json_atomic(Path(tmp[0]) / CONFIG_NAME, model.config.to_dict())
            write_json_atomic(Path(tmp[0]) / SHARDED_META, meta)
    except BaseException as exc:
        if atomic is not None:
            atomic.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if atomic is not None:
        atomic.__exit__(None, None, None)
    if _distributed():
        dist.barrier()  # nobody reads ``path`` before it exists
    return path


def load_sharded(
    model: nn.Module, optimizer: Optional[torch.optim.Optimizer], path: str | os.PathLike
) -> Dict[str, Any]:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``) at whatever layout they
    have now (a collective under torch.distributed; works in one process too). Returns the
    ``extra`` JSON it was saved with. CheckpointError when ``path`` is not a sharded
    checkpoint or does not fit the model."""
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
    state, write_backs = _state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=not _distributed())
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load the sharded checkpoint {path} into this model: {exc}") from exc
    for wb in write_backs:
        wb()
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
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
    extra = load_sharded(model, None, path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return write_checkpoint(out, model.config, state, scheduler_state=extra.get("scheduler"))
