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
HSDP; ``dp_replicate=4, ep=2`` is today's data + expert parallelism (no FSDP);
``dp_shard=2, tp=2`` is FSDP x TP (FSDP2 over the ``dp_shard`` mesh shards TP's DTensors: a 2-D
``(dp_shard, tp)`` mesh, as torchtitan), with ``ep=2`` the experts also shard over the dp_shard ranks.

Process groups are created once, by :func:`torch.distributed.device_mesh.init_device_mesh`
inside each worker (gloo on CPU, NCCL on GPU); every rank builds the same mesh in the same
order. Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch.distributed as dist

from ..dims import ParallelDims, model_problems  # noqa: F401  (re-exported: the layout lives in moe_lab.dims)
from ..errors import DistributedError

#: the world mesh's dimensions, outermost first
MESH_DIMS = ("pp", "rep", "efsdp", "ep", "tp")


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


