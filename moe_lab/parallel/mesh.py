"""How the world is split (:class:`ParallelDims`) and the device mesh built from it
(:class:`ParallelMesh`).

    dims = ParallelDims(dp_shard=4, ep=2).resolve(world_size=4)     # validated, dp_replicate filled in
    dims.check_model(model.config)                                  # num_experts % ep, layers % pp, heads % tp
    pmesh = ParallelMesh.build(dims, "cpu")                         # init_device_mesh, in every rank
    pmesh.group("ep"), pmesh.dense_fsdp_mesh, pmesh.expert_fsdp_mesh

The world is ``pp × dp_replicate × dp_shard × tp`` ranks (torchtitan's order, tp innermost).
Expert parallelism borrows its ranks from the data-parallel ones, as in torchtitan: the EP
group is the innermost ``ep`` ranks of ``dp_shard`` (or of ``dp_replicate`` when
``dp_shard`` is 1). One world mesh holds every dimension, with the data-parallel ranks
unflattened so that expert parameters get their own expert-data-parallel mesh:

    dims:   pp   rep   efsdp   ep   tp
    dense:  data parallel over rep × efsdp × ep: FSDP shards over dp_shard = efsdp × ep (and
            replicates over rep = dp_replicate, HSDP), or, with dp_shard 1, plain all-reduce
            replication over dp_replicate = rep × ep
    expert: sharded by expert over ep (the model's own seam, ``MoEModel.set_expert_parallel_group``);
            FSDP shards the local experts over efsdp = dp_shard / ep (replicated over rep)

Examples (4 ranks): ``dp_shard=4`` is FSDP 4; ``dp_shard=4, ep=2`` shards dense parameters
over 4 ranks and each expert over 2 (EP 2 × expert-FSDP 2); ``dp_replicate=2, dp_shard=2`` is
HSDP; ``dp_replicate=4, ep=2`` is today's data + expert parallelism (no FSDP).

Process groups are created once, by :func:`torch.distributed.device_mesh.init_device_mesh`
inside each worker (gloo on CPU, NCCL on GPU); every rank builds the same mesh in the same
order. Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch.distributed as dist

from ..errors import DistributedError

#: the world mesh's dimensions, outermost first
MESH_DIMS = ("pp", "rep", "efsdp", "ep", "tp")


def _positive(name: str, v: Any, allow_fill: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and not (allow_fill and v == -1)):
        raise DistributedError(f"{name} must be a positive int{' or -1 (the rest of the world)' if allow_fill else ''}, got {v!r}")


@dataclass(frozen=True)
class ParallelDims:
    """How the world is split.

    Args:
        dp_replicate: data-parallel replicas (plain all-reduce, or HSDP's replicate dim with
            ``dp_shard > 1``); -1: whatever the other sizes leave of the world.
        dp_shard: FSDP2 shards (1: no FSDP).
        tp: tensor-parallel ranks (DTensor ``parallelize_module``; not with ``dp_shard > 1`` yet).
        pp: pipeline stages (not built yet: ``pp > 1`` is rejected).
        ep: ranks the experts are sharded over, borrowed from ``dp_shard`` (or from
            ``dp_replicate`` when ``dp_shard`` is 1).
    """

    dp_replicate: int = -1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel ranks: every one sees its own slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1

    @property
    def sharded(self) -> bool:
        """Whether parameters are DTensors or split over stages (FSDP, TP or PP)."""
        return self.dp_shard > 1 or self.tp > 1 or self.pp > 1

    @property
    def efsdp(self) -> int:
        """Ranks each expert is FSDP-sharded over (dp_shard / ep; 1 without FSDP)."""
        return self.dp_shard // self.ep if self.dp_shard > 1 else 1

    @property
    def mesh_shape(self) -> Tuple[int, ...]:
        """The world mesh's shape over :data:`MESH_DIMS`."""
        rep = self.dp_replicate if self.dp_shard > 1 else self.dp_replicate // self.ep
        return (self.pp, rep, self.efsdp, self.ep, self.tp)

    def resolve(self, world_size: int, names: Optional[Mapping[str, str]] = None) -> "ParallelDims":
        """These dims for ``world_size`` ranks, ``dp_replicate=-1`` filled in; DistributedError
        naming the values when they cannot work together (see :meth:`problems`)."""
        problems = self.problems(world_size, names)
        if problems:
            raise DistributedError("; ".join(problems))
        if self.dp_replicate == -1:
            return replace(self, dp_replicate=world_size // (self.dp_shard * self.tp * self.pp))
        return self

    def problems(self, world_size: int, names: Optional[Mapping[str, str]] = None) -> List[str]:
        """Every reason these dims cannot split ``world_size`` ranks (empty: they can).
        ``names`` renames the sizes in messages, e.g. ``{"tp": "scaling.tp", "world_size":
        "scaling.num_workers"}`` or the API reference's ``{"tp": "model_parallel_size", ...}``.
        A size that is not a positive int raises DistributedError at once."""

        def n(key: str) -> str:
            return (names or {}).get(key, key)

        _positive(n("world_size"), world_size)
        _positive(n("dp_replicate"), self.dp_replicate, allow_fill=True)
        for name in ("dp_shard", "tp", "pp", "ep"):
            _positive(n(name), getattr(self, name))
        others = self.dp_shard * self.tp * self.pp
        if self.dp_replicate == -1:
            if world_size % others:
                return [f"{n('world_size')} ({world_size}) must be divisible by {n('dp_shard')} ({self.dp_shard}) "
                        f"× {n('tp')} ({self.tp}) × {n('pp')} ({self.pp}) = {others}"]
            rep = world_size // others
        elif self.world_size != world_size:
            return [f"{n('world_size')} ({world_size}) must equal {n('dp_replicate')} ({self.dp_replicate}) × "
                    f"{n('dp_shard')} ({self.dp_shard}) × {n('tp')} ({self.tp}) × {n('pp')} ({self.pp}) = {self.world_size}"]
        else:
            rep = self.dp_replicate
        out = []
        if self.dp_shard > 1 and self.tp > 1:
            # not exact yet: FSDP2 mishandles the gradients of the vocab-parallel embedding
            # and the sequence-parallel norms (a known gap, see the tensor-parallel tests)
            out.append(f"{n('dp_shard')} ({self.dp_shard}) > 1 with {n('tp')} ({self.tp}) > 1 is not supported yet; "
                       "use FSDP or TP, each with expert parallelism")
        if self.pp > 1:
            out.append(f"{n('pp')} ({self.pp}) > 1 is not supported yet: pipeline parallelism is not built")
        if self.dp_shard > 1 and self.dp_shard % self.ep:
            out.append(f"{n('dp_shard')} ({self.dp_shard}) must be divisible by {n('ep')} ({self.ep})")
        if self.dp_shard == 1 and rep % self.ep:
            out.append(f"{n('ep')} ({self.ep}) must divide the data-parallel ranks: {n('dp_replicate')} ({rep}) "
                       f"with {n('dp_shard')} 1")
        return out

    def check_model(self, config: Any) -> None:
        """DistributedError naming the values when the model cannot be split this way."""
        problems = model_problems(self, config)
        if problems:
            raise DistributedError("; ".join(problems))


def model_problems(dims: ParallelDims, config: Any, prefix: str = "", dim_prefix: str = "",
                   dim_names: Optional[Mapping[str, str]] = None) -> List[str]:
    """Every reason ``config`` (a MoEConfig) cannot be split by ``dims`` (empty: it can).
    ``prefix``/``dim_prefix`` name the fields in messages (``model.``, ``scaling.``);
    ``dim_names`` renames single sizes (``{"ep": "expert_parallel_size"}``)."""

    def d(key: str) -> str:
        return (dim_names or {}).get(key, f"{dim_prefix}{key}")

    out = []
    if config.num_experts % dims.ep:
        out.append(f"{prefix}num_experts ({config.num_experts}) must be divisible by {d('ep')} ({dims.ep})")
    if dims.tp > 1:
        for name, v in (("num_attention_heads", config.num_attention_heads), ("num_key_value_heads", config.kv_heads),
                        ("vocab_size", config.vocab_size), ("dense_ffn_size", config.dense_ffn_size)):
            if v is not None and v % dims.tp:
                out.append(f"{prefix}{name} ({v}) must be divisible by {d('tp')} ({dims.tp})")
        if getattr(config, "qk_norm", False):
            out.append(f"{prefix}qk_norm is not supported with {d('tp')} ({dims.tp}) > 1: its per-head norm "
                       "weights would see only this rank's heads")
    if dims.pp > 1 and config.num_layers < dims.pp:
        out.append(f"{prefix}num_layers ({config.num_layers}) must be at least {d('pp')} ({dims.pp})")
    return out


@dataclass
class ParallelMesh:
    """The world mesh of one rank and the meshes and groups cut from it (see the module docstring)."""

    dims: ParallelDims
    world: Any  #: DeviceMesh over :data:`MESH_DIMS`
    device_type: str
    #: FSDP mesh of the dense parameters: 1D (dp_shard) or 2D (rep, dp_shard) for HSDP; None without FSDP
    dense_fsdp_mesh: Optional[Any] = None
    #: FSDP mesh of the expert parameters: 1D (efsdp) or 2D (rep, efsdp); None without FSDP
    expert_fsdp_mesh: Optional[Any] = None
    #: the tensor-parallel mesh (1D, "tp"); None without TP
    tp_mesh: Optional[Any] = None
    _groups: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, dims: ParallelDims, device_type: str = "cpu") -> "ParallelMesh":
        """Create the mesh and every group this layout needs. A collective: every rank calls
        it with the same dims, in the same order."""
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise DistributedError("torch.distributed is not initialised; call init_process_group first")
        dims = dims.resolve(dist.get_world_size())
        world = init_device_mesh(device_type, dims.mesh_shape, mesh_dim_names=MESH_DIMS)
        pm = cls(dims, world, device_type)
        # flattened groups; every rank creates every one of them, in this order
        pm._groups["dp"] = world["rep", "efsdp", "ep"]._flatten("dp")
        pm._groups["dp_shard"] = world["efsdp", "ep"]._flatten("dp_shard")
        pm._groups["dp_replicate"] = world["rep", "ep"]._flatten("dp_replicate") if not dims.fsdp else world["rep"]
        pm._groups["edp"] = world["rep", "efsdp"]._flatten("edp")  # ranks that hold the same experts
        for name in ("pp", "rep", "efsdp", "ep", "tp"):
            pm._groups[name] = world[name]
        if dims.fsdp:
            shard = pm._groups["dp_shard"]
            pm.dense_fsdp_mesh = world["rep", "dp_shard"] if dims.dp_replicate > 1 else shard
            pm.expert_fsdp_mesh = world["rep", "efsdp"] if dims.dp_replicate > 1 else world["efsdp"]
        if dims.tp > 1:
            pm.tp_mesh = world["tp"]
        return pm

    def mesh(self, name: str) -> Any:
        """The 1D mesh of a dimension (:data:`MESH_DIMS`) or a flattened one (dp, dp_shard,
        dp_replicate, edp)."""
        if name not in self._groups:
            raise DistributedError(f"no mesh dimension {name!r}; expected one of {sorted(self._groups)}")
        return self._groups[name]

    def group(self, name: str) -> Optional[Any]:
        """The ProcessGroup of a dimension; None when it holds only this rank."""
        m = self.mesh(name)
        return m.get_group() if m.size() > 1 else None

    def size(self, name: str) -> int:
        return self.mesh(name).size()

    def local_rank(self, name: str) -> int:
        """This rank's coordinate along a dimension."""
        return self.mesh(name).get_local_rank()


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups one rank belongs to."""

    world_size: int
    rank: int
    expert_parallel_size: int
    ep_rank: int
    ep_group: Optional[Any]  #: None when expert_parallel_size == 1
    edp_group: Optional[Any]  #: None when it would be the whole world
    dp_group: Optional[Any] = None  #: None means the default (world) group
    dims: Optional["ParallelDims"] = None  #: the resolved layout (None: data + expert parallelism only)
    mesh: Optional[Any] = None  #: the :class:`~moe_lab.parallel.mesh.ParallelMesh` it was cut from

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (each sees its own slice of the global batch)."""
        return self.dims.dp if self.dims is not None else self.world_size

    @property
    def dp_rank(self) -> int:
        return self.mesh.local_rank("dp") if self.mesh is not None else self.rank

    @property
    def expert_data_parallel_size(self) -> int:
        """Ranks that hold the same experts."""
        return self.dp_size // self.expert_parallel_size

    @classmethod
    def from_mesh(cls, pmesh: Any) -> "ParallelGroups":
        dims = pmesh.dims
        world, rank = dist.get_world_size(), dist.get_rank()
        return cls(
            world, rank, dims.ep, pmesh.local_rank("ep") if dims.ep > 1 else 0, pmesh.group("ep"),
            # experts replicated on the whole world (ep 1) sync with the dense parameters
            pmesh.group("edp") if 1 < dims.ep and pmesh.size("edp") < world else None,
            pmesh.group("dp") if dims.dp < world else None,
            dims, pmesh,
        )


