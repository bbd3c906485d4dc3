"""How the world is split: :class:`ParallelDims` (data replicate × data shard × tensor ×
pipeline × expert parallel sizes), validated once, and :func:`model_problems` (what a layout
needs of a model config). Pure Python, no torch.distributed, so that job specs
(:mod:`moe_lab.jobs`) validate a layout before anything starts; the device mesh built from it
is :class:`moe_lab.parallel.mesh.ParallelMesh`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, List, Mapping, Optional, Tuple

from .errors import DistributedError

#: pipeline schedules (``ParallelDims.pp_schedule``) -> stages per rank (see moe_lab.parallel.pipeline)
PIPELINE_SCHEDULES = {"1f1b": 1, "interleaved_1f1b": 2, "gpipe": 1}


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
        tp: tensor-parallel ranks (DTensor ``parallelize_module``; with ``dp_shard > 1``, FSDP2
            shards TP's DTensors over the ``dp_shard`` ranks: a 2-D mesh, as torchtitan).
        pp: pipeline stages (``torch.distributed.pipelining``, :mod:`moe_lab.parallel.pipeline`;
            not with ``dp_shard > 1`` or ``tp > 1``).
        ep: ranks the experts are sharded over, borrowed from ``dp_shard`` (or from
            ``dp_replicate`` when ``dp_shard`` is 1).
        pp_schedule: the pipeline schedule with ``pp > 1``: ``"1f1b"``, ``"interleaved_1f1b"``
            (two stages per rank) or ``"gpipe"``.
        expert_tp: expert tensor parallelism (with ``tp > 1``, not with ``dp_shard > 1``): every
            expert's FFN is split over the TP ranks along its intermediate dim (``w_in``
            column-parallel, ``w_out`` row-parallel, the partial outputs summed over TP; see
            :class:`moe_lab.parallel.tensor_parallel.ExpertTensorParallel`). False: each TP rank
            holds whole experts (its EP share), replicated over TP.
    """

    dp_replicate: int = -1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_schedule: str = "1f1b"
    expert_tp: bool = False

    @property
    def pp_stages(self) -> int:
        """Pipeline stages in all: ``pp`` × the schedule's stages per rank."""
        return self.pp * PIPELINE_SCHEDULES.get(self.pp_schedule, 1)

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
        """The world mesh's shape over :data:`moe_lab.parallel.mesh.MESH_DIMS`."""
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
        if not isinstance(self.expert_tp, bool):
            out.append(f"{n('expert_tp')} must be true or false, got {self.expert_tp!r}")
        elif self.expert_tp and self.tp == 1:
            out.append(f"{n('expert_tp')} needs {n('tp')} > 1 (got {n('tp')} {self.tp}): it splits the experts over "
                       "the tensor-parallel ranks")
        elif self.expert_tp and self.dp_shard > 1:
            out.append(f"{n('expert_tp')} with {n('dp_shard')} ({self.dp_shard}) > 1 is not supported: FSDP would "
                       "shard the TP-split expert weights again; use expert_tp with tp and ep only")
        if self.pp_schedule not in PIPELINE_SCHEDULES:
            out.append(f"{n('pp_schedule')} ({self.pp_schedule!r}) must be one of {sorted(PIPELINE_SCHEDULES)}")
        if self.pp > 1 and (self.dp_shard > 1 or self.tp > 1):
            out.append(f"{n('pp')} ({self.pp}) > 1 with {n('dp_shard')} ({self.dp_shard}) or {n('tp')} ({self.tp}) > 1 "
                       "is not supported yet; pipeline parallelism composes with data and expert parallelism")
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
        if dims.expert_tp and config.intermediate_size % dims.tp:
            out.append(f"{prefix}expert_hidden_size ({config.intermediate_size}) must be divisible by {d('tp')} "
                       f"({dims.tp}) with {d('expert_tp')}: each TP rank holds 1/{dims.tp} of every expert's FFN")
        if getattr(config, "qk_norm", False):
            out.append(f"{prefix}qk_norm is not supported with {d('tp')} ({dims.tp}) > 1: its per-head norm "
                       "weights would see only this rank's heads")
    if dims.pp > 1:
        stages = dims.pp_stages
        if config.num_layers < stages:
            per = f" × {stages // dims.pp} stages per rank of {dims.pp_schedule} = {stages}" if stages > dims.pp else ""
            out.append(f"{prefix}num_layers ({config.num_layers}) must be at least {d('pp')} ({dims.pp}){per}")
        if getattr(config, "tie_word_embeddings", False):
            out.append(f"{prefix}tie_word_embeddings is not supported with {d('pp')} ({dims.pp}) > 1: the embedding "
                       "and the LM head live on different pipeline stages")
        if getattr(config, "load_balancing_scope", "micro_batch") == "global_batch":
            out.append(f"{prefix}load_balancing_scope 'global_batch' is not supported with {d('pp')} ({dims.pp}) > 1 "
                       "(its selection pre-pass is a whole-model forward); use 'micro_batch' or 'sequence'")
    return out
