"""Expert cache: keep only some experts of each MoE layer on the compute device.

Most experts sit idle for any one token, yet all of them take memory. The
:class:`DynamicExpertLoader` turns a :class:`~moe_lab.model.MoEModel` into one that holds
only ``cache_size`` experts per MoE layer on its device and brings the others in on demand:

    loader = DynamicExpertLoader(model, cache_size=4, eviction_policy="lru")
    logits = model(input_ids)          # same outputs as before; experts load on demand
    loader.stats()                     # hits, misses, hit_rate, evictions, prefetches, ...

How it works, per MoE layer:

- The layer's :class:`~moe_lab.model.experts.GroupedExperts` is replaced, in place, by a
  :class:`CachedExperts` with the same ``forward(x_sorted [N, D], tokens_per_expert [E])``.
  It owns ``cache_size`` *device slots*: a ``GroupedExperts`` of ``cache_size`` experts. The
  full weights of all experts stay off the device in an :class:`ExpertStore`.
- A forward looks at which experts received tokens. Resident ones are hits; the others are
  misses and are copied into a slot, evicting a resident expert that this round does not
  use (``lru``: least recently used; ``lfu``: least often used, ties by recency).
- If one forward needs more distinct experts than there are slots (a long prefill, say),
  it runs in *rounds* of at most ``cache_size`` experts, so the bound always holds.
- Outputs equal those of the fully resident model (the same grouped kernel runs on the
  same rows; tested to 1e-6 in fp32).

Prefetch (``prefetch_strategy``):

- ``"usage_based"`` uses routing statistics, from the checkpoint's ``routing_stats.json``
  (tokens per expert over training) plus counts gathered online:
  1. warm start: each layer's slots are filled with its most used experts;
  2. hot experts are kept: the ``cache_size // 2`` most used experts of a layer are evicted
     only when no other resident expert can go;
  3. look-ahead: when a decoder layer starts, its router is applied to the residual stream
     entering the layer (before attention) to predict the experts its MoE block will pick,
     and the most likely ones are loaded before they are needed. This is the "likely
     experts of the next layer" computed as soon as the previous layer is done; on a GPU
     the copy can overlap with attention.
- ``"none"``: no warm start, no look-ahead, plain demand loading.

Stores (where the off-device weights live):

- :class:`TensorExpertStore`: the model's own expert tensors, moved to (pinned, on CUDA
  machines) CPU memory. What ``DynamicExpertLoader(model)`` uses by default.
- :class:`SafetensorsExpertStore`: experts read lazily from a checkpoint's weights
  (``Checkpoint.weights(lazy=True)``, memory-mapped: an expert's bytes are read only when it
  is fetched), with a bounded host-side cache of materialised copies (pinned on CUDA
  machines). Used by :class:`~moe_lab.inference.OptimizedMoEModel`.

A managed model is for inference (no gradients flow into the slots). Its ``state_dict``
holds the device slots, not the experts: save from the original checkpoint.

Shape letters: N sorted token rows, D hidden, I intermediate, E experts, C cache slots.
"""

from __future__ import annotations

import abc
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoint import LazyWeights, read_routing_stats
from ..errors import CheckpointError, ConfigError, ExpertError
from ..model.experts import GroupedExperts

EVICTION_POLICIES = ("lru", "lfu")
PREFETCH_STRATEGIES = ("usage_based", "none")

ExpertPair = Tuple[torch.Tensor, torch.Tensor]  # (w_in [I_in, D], w_out [D, I])


# ---------------------------------------------------------------------------------------
# off-device stores
# ---------------------------------------------------------------------------------------


class ExpertStore(abc.ABC):
    """Where the full weights of every expert live, off the compute device.

    ``fetch(layer_idx, expert)`` returns host tensors ``(w_in [I_in, D], w_out [D, I])``.
    """

    num_experts: int

    @abc.abstractmethod
    def fetch(self, layer_idx: int, expert: int) -> ExpertPair:
        """Host tensors ``(w_in, w_out)`` of one expert."""

    @abc.abstractmethod
    def layer_indices(self) -> List[int]:
        """The MoE layers this store holds."""

    def stats(self) -> Dict[str, Any]:
        return {}


def _maybe_pin(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return t.pin_memory() if pin and not t.is_pinned() else t


class TensorExpertStore(ExpertStore):
    """Expert weights held as CPU tensors (page-locked when ``pin_memory``).

    Args:
        weights: ``{layer_idx: (w_in [E, I_in, D], w_out [E, D, I])}``.
        pin_memory: pin the host copies (for fast, asynchronous host-to-GPU copies).
    """

    def __init__(self, weights: Dict[int, Tuple[torch.Tensor, torch.Tensor]], pin_memory: bool = False) -> None:
        if not weights:
            raise ExpertError("TensorExpertStore needs the experts of at least one layer")
        self._weights = {
            idx: (_maybe_pin(w_in.detach().to("cpu"), pin_memory), _maybe_pin(w_out.detach().to("cpu"), pin_memory))
            for idx, (w_in, w_out) in weights.items()
        }
        counts = {w_in.shape[0] for w_in, _ in self._weights.values()}
        if len(counts) != 1:
            raise ExpertError(f"every layer must hold the same number of experts, got {sorted(counts)}")
        self.num_experts = counts.pop()
        self.pin_memory = pin_memory

    def fetch(self, layer_idx: int, expert: int) -> ExpertPair:
        w_in, w_out = self._weights[layer_idx]
        return w_in[expert], w_out[expert]

    def layer_indices(self) -> List[int]:
        return sorted(self._weights)


class SafetensorsExpertStore(ExpertStore):
    """Experts read lazily from a checkpoint's ``model.safetensors``, with a bounded host cache.

    The weights are a :class:`~moe_lab.checkpoint.LazyWeights` (memory-mapped through
    ``safetensors.safe_open``, headers checked); fetching an expert reads only that expert's
    rows. Up to ``host_cache_size`` materialised copies per layer are kept in host memory
    (LRU; pinned when ``pin_memory``), so a repeated fetch is a memory copy instead of a read
    from the mapped file. With ``host_cache_size=0`` every fetch reads the file.

    Args:
        weights: ``Checkpoint.weights(lazy=True)``, or the path of a ``model.safetensors`` file.
        layer_indices: transformer layer indices of the MoE layers
            (keys ``layers.{i}.mlp.experts.w_in`` / ``.w_out``).
        host_cache_size: materialised host copies kept per layer.
        pin_memory: page-lock the host copies (CUDA machines).
        dtype: convert on fetch (None keeps the stored dtype).
    """

    def __init__(
        self,
        weights: Union[LazyWeights, str, os.PathLike],
        layer_indices: Sequence[int],
        host_cache_size: int = 8,
        pin_memory: bool = False,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if isinstance(host_cache_size, bool) or not isinstance(host_cache_size, int) or host_cache_size < 0:
            raise ConfigError(f"expert_cache_size (host copies per layer) must be an int >= 0, got {host_cache_size!r}")
        if not isinstance(weights, LazyWeights):
            weights = LazyWeights.from_files([Path(weights)])
        self.weights = weights
        self.path = weights.files[0] if weights.files else None
        self._layers = list(layer_indices)
        self._shapes: Dict[int, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
        num = set()
        for idx in self._layers:
            names = (f"layers.{idx}.mlp.experts.w_in", f"layers.{idx}.mlp.experts.w_out")
            missing = [n for n in names if n not in weights]
            if missing:
                raise CheckpointError(f"{weights!r} has no expert weights {missing} for MoE layer {idx}")
            shapes = tuple(weights.spec(n).shape for n in names)
            self._shapes[idx] = shapes  # type: ignore[assignment]
            num.add(shapes[0][0])
        if len(num) != 1:
            raise CheckpointError(f"MoE layers in {weights!r} hold different numbers of experts: {sorted(num)}")
        self.num_experts = num.pop()
        self.host_cache_size = host_cache_size
        self.pin_memory = pin_memory
        self.dtype = dtype
        self._host: Dict[int, "OrderedDict[int, ExpertPair]"] = {idx: OrderedDict() for idx in self._layers}
        self.host_hits = 0
        self.host_misses = 0
        self.file_bytes_read = 0

    def shapes(self, layer_idx: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """``(w_in shape [E, I_in, D], w_out shape [E, D, I])`` as stored."""
        return self._shapes[layer_idx]

    def layer_indices(self) -> List[int]:
        return list(self._layers)

    def _read(self, layer_idx: int, expert: int) -> ExpertPair:
        out = []
        for name in (f"layers.{layer_idx}.mlp.experts.w_in", f"layers.{layer_idx}.mlp.experts.w_out"):
            t = self.weights.rows(name, expert, expert + 1)[0]  # reads this expert's rows only
            self.file_bytes_read += t.numel() * t.element_size()
            if self.dtype is not None and t.dtype != self.dtype:
                t = t.to(self.dtype)
            out.append(_maybe_pin(t.contiguous(), self.pin_memory))
        return out[0], out[1]

    def fetch(self, layer_idx: int, expert: int) -> ExpertPair:
        if not 0 <= expert < self.num_experts:
            raise ExpertError(f"expert {expert} out of range [0, {self.num_experts})")
        cache = self._host[layer_idx]
        if expert in cache:
            cache.move_to_end(expert)
            self.host_hits += 1
            return cache[expert]
        self.host_misses += 1
        pair = self._read(layer_idx, expert)
        if self.host_cache_size > 0:
            cache[expert] = pair
            while len(cache) > self.host_cache_size:
                cache.popitem(last=False)
        return pair

    def host_resident(self) -> Dict[int, List[int]]:
        """Experts with a materialised host copy, per MoE layer."""
        return {idx: sorted(c) for idx, c in self._host.items()}

    def stats(self) -> Dict[str, Any]:
        lookups = self.host_hits + self.host_misses
        return {
            "host_cache_size": self.host_cache_size,
            "host_hits": self.host_hits,
            "host_misses": self.host_misses,
            "host_hit_rate": self.host_hits / lookups if lookups else 0.0,
            "file_bytes_read": self.file_bytes_read,
            "host_resident": self.host_resident(),
        }

    def reset_stats(self) -> None:
        self.host_hits = self.host_misses = self.file_bytes_read = 0


# ---------------------------------------------------------------------------------------
# the per-layer cache
# ---------------------------------------------------------------------------------------


class CachedExperts(nn.Module):
    """Drop-in replacement for a layer's :class:`GroupedExperts` with ``cache_size`` device slots.

    ``forward(x_ND, tokens_per_expert_E)`` has the GroupedExperts contract (rows sorted by
    expert). Built by :class:`DynamicExpertLoader`; not meant to be constructed directly.
    """

    def __init__(
        self,
        layer_idx: int,
        template: GroupedExperts,
        store: ExpertStore,
        cache_size: int,
        eviction_policy: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.store = store
        self.num_experts = store.num_experts
        self.hidden_size = template.hidden_size
        self.intermediate_size = template.intermediate_size
        self.expert_type = template.expert_type
        self.activation = template.activation
        self.backend = template.backend
        self.cache_size = min(cache_size, self.num_experts)
        self.eviction_policy = eviction_policy
        with torch.device(device):
            slots = GroupedExperts(
                self.cache_size,
                template.hidden_size,
                template.intermediate_size,
                expert_type=template.expert_type.value,
                activation=template.activation,
                dropout=0.0,
                backend=template.backend,
            )
        #: the device slots: w_in [C, I_in, D], w_out [C, D, I]
        self.slots = slots.to(dtype=dtype).requires_grad_(False)
        self.slot_expert: List[int] = [-1] * self.cache_size  # expert held by each slot
        self.expert_slot: Dict[int, int] = {}
        self._tick = 0
        self.last_used = [0] * self.num_experts
        self.frequency = [0] * self.num_experts  # demand accesses (forwards that used the expert)
        self.usage = [0.0] * self.num_experts  # routing counts: prior (checkpoint) + tokens seen online
        self._hot: frozenset = frozenset()  # experts evicted last (usage_based)
        self._hot_dirty = False
        self.num_hot = 0
        self._prefetched_unused: set = set()
        self.load_listeners: List[Callable[["CachedExperts", int, int], None]] = []
        self.reset_stats()

    # ---- bookkeeping ------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.hits = self.misses = self.evictions = self.prefetches = 0
        self.useful_prefetches = self.bytes_loaded = self.rounds = self.forwards = 0

    def resident(self) -> List[int]:
        """Experts currently in a device slot (at most ``cache_size``)."""
        return sorted(self.expert_slot)

    def add_usage(self, counts_E: Sequence[float]) -> None:
        for e, c in enumerate(counts_E):
            if c:
                self.usage[e] += float(c)
        self._hot_dirty = True

    def hot_experts(self) -> frozenset:
        """The ``num_hot`` most used experts (usage_based keeps them resident longest)."""
        if self._hot_dirty and self.num_hot:
            order = sorted(range(self.num_experts), key=lambda e: (-self.usage[e], e))
            self._hot = frozenset(order[: self.num_hot])
        self._hot_dirty = False
        return self._hot

    def _victim_slot(self, keep: Iterable[int], expert: int = -1) -> int:
        """A free slot (slot ``expert`` when free, which keeps slot order = expert order
        when everything fits), else the slot of the resident expert the policy evicts first."""
        if 0 <= expert < self.cache_size and self.slot_expert[expert] < 0:
            return expert
        for s, e in enumerate(self.slot_expert):
            if e < 0:
                return s
        keep = set(keep)
        candidates = [s for s, e in enumerate(self.slot_expert) if e not in keep]
        if not candidates:
            raise ExpertError(f"layer {self.layer_idx}: every slot is needed; cannot load another expert")
        hot = self.hot_experts()
        cold = [s for s in candidates if self.slot_expert[s] not in hot]
        if cold:
            candidates = cold
        if self.eviction_policy == "lfu":
            return min(candidates, key=lambda s: (self.frequency[self.slot_expert[s]], self.last_used[self.slot_expert[s]]))
        return min(candidates, key=lambda s: self.last_used[self.slot_expert[s]])

    @torch.no_grad()
    def _load(self, expert: int, keep: Iterable[int], prefetch: bool = False) -> int:
        slot = self._victim_slot(keep, expert)
        old = self.slot_expert[slot]
        if old >= 0:
            del self.expert_slot[old]
            self._prefetched_unused.discard(old)
            self.evictions += 1
        self.slot_expert[slot] = -1
        w_in, w_out = self.store.fetch(self.layer_idx, expert)
        non_blocking = w_in.is_pinned()
        self.slots.w_in[slot].copy_(w_in, non_blocking=non_blocking)
        self.slots.w_out[slot].copy_(w_out, non_blocking=non_blocking)
        self.slot_expert[slot] = expert
        self.expert_slot[expert] = slot
        self.bytes_loaded += w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
        if prefetch:
            self.prefetches += 1
            self._prefetched_unused.add(expert)
        for fn in self.load_listeners:
            fn(self, expert, slot)
        return slot

    @torch.no_grad()
    def arrange_identity(self) -> bool:
        """With a slot for every expert, put expert ``e`` in slot ``e`` (loading what is missing).

        The slots are then an ordinary stacked expert module (``self.slots``) that static,
        graph-captured decoding can call directly. Returns False when there are fewer slots
        than experts.
        """
        if self.cache_size != self.num_experts:
            return False
        for e in range(self.num_experts):
            if self.slot_expert[e] == e:
                continue
            prev = self.expert_slot.get(e)  # expert e sits in another slot: that slot is freed
            if prev is not None:
                self.slot_expert[prev] = -1
            old = self.slot_expert[e]
            if old >= 0:
                del self.expert_slot[old]
            w_in, w_out = self.store.fetch(self.layer_idx, e)
            self.slots.w_in[e].copy_(w_in, non_blocking=w_in.is_pinned())
            self.slots.w_out[e].copy_(w_out, non_blocking=w_out.is_pinned())
            self.bytes_loaded += w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
            self.slot_expert[e] = e
            self.expert_slot[e] = e
        return True

    def prefetch(self, experts: Sequence[int]) -> int:
        """Load ``experts`` (most likely first, at most ``cache_size``) ahead of use; returns loads done."""
        wanted = [int(e) for e in experts][: self.cache_size]
        done = 0
        for e in wanted:
            if e not in self.expert_slot:
                self._load(e, keep=wanted, prefetch=True)
                done += 1
        return done

    # ---- forward ----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        counts = tokens_per_expert.tolist()  # [E]
        if len(counts) != self.num_experts:
            raise ExpertError(f"tokens_per_expert has {len(counts)} entries, expected {self.num_experts}")
        self.forwards += 1
        out_ND = x_ND.new_zeros(x_ND.shape[0], self.hidden_size)
        needed = [e for e, c in enumerate(counts) if c > 0]
        if not needed:
            return out_ND
        self._tick += 1
        starts = [0] * self.num_experts
        acc = 0
        for e, c in enumerate(counts):
            starts[e] = acc
            acc += c
        for e in needed:
            if e in self.expert_slot:
                self.hits += 1
                if e in self._prefetched_unused:
                    self.useful_prefetches += 1
                    self._prefetched_unused.discard(e)
            else:
                self.misses += 1
            self.frequency[e] += 1
            self.last_used[e] = self._tick
        self.add_usage(counts)
        # resident experts first: they all fit in the first round, so they are never evicted
        # before use; the remaining (missing) experts follow in rounds of at most C.
        needed.sort(key=lambda e: (e not in self.expert_slot, e))
        for r in range(0, len(needed), self.cache_size):
            group = needed[r : r + self.cache_size]
            for e in group:
                if e not in self.expert_slot:
                    self._load(e, keep=group)
            self._run_round(x_ND, out_ND, group, counts, starts, tokens_per_expert, backend)
        return out_ND

    def _run_round(
        self,
        x_ND: torch.Tensor,
        out_ND: torch.Tensor,
        group: List[int],
        counts: List[int],
        starts: List[int],
        tokens_per_expert: torch.Tensor,
        backend: Optional[str],
    ) -> None:
        """Run the experts of ``group`` (all resident) on their rows, writing into ``out_ND``."""
        self.rounds += 1
        by_slot = sorted(group, key=lambda e: self.expert_slot[e])
        all_routed = len(group) == sum(1 for c in counts if c)
        if all_routed and self.cache_size == self.num_experts and all(self.expert_slot[e] == e for e in group):
            # slot e holds expert e: the layer's own tokens_per_expert is the slot count
            out_ND.copy_(self.slots(x_ND, tokens_per_expert, backend=backend))
            return
        tokens_per_slot = [0] * self.cache_size
        for e in by_slot:
            tokens_per_slot[self.expert_slot[e]] = counts[e]
        tps = torch.tensor(tokens_per_slot, device=x_ND.device)  # [C]
        if all_routed and by_slot == sorted(group):
            # slot order == expert order and every routed expert is here: the rows are
            # already grouped by slot, no gather/scatter needed
            out_ND.copy_(self.slots(x_ND, tps, backend=backend))
            return
        rows = torch.cat([torch.arange(starts[e], starts[e] + counts[e], device=x_ND.device) for e in by_slot])  # [n]
        y = self.slots(x_ND[rows], tps, backend=backend)  # [n, D], rows in slot order
        out_ND[rows] = y.to(out_ND.dtype)

    # ---- GroupedExperts-compatible introspection ---------------------------------------
    def params_per_expert(self) -> int:
        return self.slots.params_per_expert()

    def flat_weights(self) -> torch.Tensor:
        """[E, params_per_expert] of every expert, fetched from the store (materialises all)."""
        rows = []
        for e in range(self.num_experts):
            w_in, w_out = self.store.fetch(self.layer_idx, e)
            rows.append(torch.cat([w_in.flatten(), w_out.flatten()]))
        return torch.stack(rows)

    def layer_stats(self) -> Dict[str, Any]:
        accesses = self.hits + self.misses
        return {
            "layer_idx": self.layer_idx,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / accesses if accesses else 0.0,
            "evictions": self.evictions,
            "prefetches": self.prefetches,
            "useful_prefetches": self.useful_prefetches,
            "bytes_loaded": self.bytes_loaded,
            "rounds": self.rounds,
            "forwards": self.forwards,
            "resident": self.resident(),
        }

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, cache_size={self.cache_size}, num_experts={self.num_experts}, "
            f"eviction={self.eviction_policy}, resident={self.resident()}"
        )


# ---------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------


def load_routing_stats(source: Union[None, str, os.PathLike, Dict[str, Any]]) -> Optional[Dict[int, List[float]]]:
    """``{layer_idx: tokens per expert}`` from a checkpoint directory, its ``routing_stats.json``
    or the parsed dict (``Checkpoint.routing_stats()``); None when there are none."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        source = read_routing_stats(source)
        if source is None:
            return None
    if not isinstance(source, dict) or "expert_counts" not in source or "moe_layer_indices" not in source:
        raise ConfigError("routing_stats must hold 'moe_layer_indices' and 'expert_counts' (see routing_stats.json)")
    return {int(i): [float(c) for c in row] for i, row in zip(source["moe_layer_indices"], source["expert_counts"])}


def _model_device(model: nn.Module) -> torch.device:
    for name, p in model.named_parameters():
        if ".experts." not in name and p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for name, p in model.named_parameters():
        if ".experts." not in name and p.is_floating_point():
            return p.dtype
    return torch.float32


class DynamicExpertLoader:
    """Manage a model's experts in place: ``cache_size`` device slots per MoE layer.

    Args:
        model: a :class:`~moe_lab.model.MoEModel` (not expert-parallel). Its MoE layers'
            ``experts`` modules are replaced by :class:`CachedExperts`; afterwards the
            model runs as before, loading experts on demand.
        cache_size: experts resident on the device per MoE layer (clipped to num_experts).
        eviction_policy: "lru" or "lfu".
        prefetch_strategy: "usage_based" (routing statistics: warm start, hot experts kept,
            look-ahead prefetch) or "none".
        routing_stats: a ``routing_stats.json`` path (or checkpoint dir, or the parsed dict)
            whose counts seed ``usage_based``; None starts from online counts only.
        store: where the full expert weights live; default: the model's own expert tensors
            moved to CPU (pinned when the model is on CUDA).
        device, dtype: of the device slots; default: those of the model's dense weights.

    Raises:
        ConfigError: bad cache_size, policy or strategy (the message lists the options).
    """

    def __init__(
        self,
        model: nn.Module,
        cache_size: int = 8,
        eviction_policy: str = "lru",
        prefetch_strategy: str = "usage_based",
        routing_stats: Union[None, str, os.PathLike, Dict[str, Any]] = None,
        store: Optional[ExpertStore] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ConfigError(f"cache_size must be an int >= 1, got {cache_size!r}")
        if eviction_policy not in EVICTION_POLICIES:
            raise ConfigError(f"unknown eviction_policy {eviction_policy!r}; expected one of {list(EVICTION_POLICIES)}")
        if prefetch_strategy not in PREFETCH_STRATEGIES:
            raise ConfigError(
                f"unknown prefetch_strategy {prefetch_strategy!r}; expected one of {list(PREFETCH_STRATEGIES)}"
            )
        moe_layers = list(getattr(model, "moe_layers", []))
        if not moe_layers:
            raise ConfigError("DynamicExpertLoader needs a model with MoE layers (model.moe_layers is empty)")
        if getattr(model, "expert_parallel_group", None) is not None:
            raise ConfigError("DynamicExpertLoader cannot manage an expert-parallel (sharded) model")
        if any(isinstance(layer.experts, CachedExperts) for layer in moe_layers):
            raise ConfigError("this model's experts are already managed by a DynamicExpertLoader")
        self.model = model
        self.cache_size = cache_size
        self.eviction_policy = eviction_policy
        self.prefetch_strategy = prefetch_strategy
        self.device = torch.device(device) if device is not None else _model_device(model)
        dtype = dtype or _model_dtype(model)
        layer_ids = list(model.moe_layer_indices)
        if store is None:
            store = TensorExpertStore(
                {i: (m.experts.w_in, m.experts.w_out) for i, m in zip(layer_ids, moe_layers)},
                pin_memory=self.device.type == "cuda",
            )
        missing = sorted(set(layer_ids) - set(store.layer_indices()))
        if missing:
            raise ConfigError(f"the expert store has no weights for MoE layers {missing}")
        self.store = store
        self.caches: List[CachedExperts] = []
        for idx, layer in zip(layer_ids, moe_layers):
            if layer.experts.num_experts != store.num_experts:
                raise ConfigError(
                    f"layer {idx} has {layer.experts.num_experts} experts, the store holds {store.num_experts}"
                )
            cache = CachedExperts(idx, layer.experts, store, cache_size, eviction_policy, self.device, dtype)
            layer.experts = cache  # in place: the old module (and its weights on the device) goes
            self.caches.append(cache)
        self._hooks: List[Any] = []
        prior = load_routing_stats(routing_stats)
        if prefetch_strategy == "usage_based":
            for cache in self.caches:
                cache.num_hot = cache.cache_size // 2
                if prior is not None and cache.layer_idx in prior and len(prior[cache.layer_idx]) == cache.num_experts:
                    cache.add_usage(prior[cache.layer_idx])
                    order = sorted(range(cache.num_experts), key=lambda e: (-cache.usage[e], e))
                    cache.prefetch(order[: cache.cache_size])  # warm start: the hottest experts
            by_layer = {c.layer_idx: c for c in self.caches}
            for layer in model.layers:  # look-ahead is pointless when every expert fits
                if layer.layer_idx in by_layer and by_layer[layer.layer_idx].cache_size < by_layer[layer.layer_idx].num_experts:
                    self._hooks.append(layer.register_forward_pre_hook(self._lookahead_hook(by_layer[layer.layer_idx])))

    # ---- look-ahead prefetch ----------------------------------------------------------
    def _lookahead_hook(self, cache: CachedExperts) -> Callable[..., None]:
        def hook(decoder_layer: nn.Module, args: Tuple[Any, ...]) -> None:
            x_BSD = args[0]
            token_mask = args[4] if len(args) > 4 else None
            with torch.no_grad():
                h_TD = decoder_layer.post_attn_norm(x_BSD).reshape(-1, x_BSD.shape[-1])  # [T, D]
                router = decoder_layer.mlp.router
                logits_TE = router.compute_logits(h_TD, training=False)
                top_TK = logits_TE.topk(min(router.top_k, cache.num_experts), dim=-1).indices
                if token_mask is not None:
                    top_TK = top_TK[token_mask.reshape(-1).bool()]
                votes = torch.bincount(top_TK.reshape(-1), minlength=cache.num_experts)  # [E]
            order = [e for e in votes.argsort(descending=True, stable=True).tolist() if votes[e] > 0]
            cache.prefetch(order[: cache.cache_size])

        return hook

    # ---- reporting --------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Totals over the MoE layers, plus ``per_layer`` and the store's stats.

        Keys: hits, misses, hit_rate (hits / demand accesses; an access is one expert needed
        by one layer in one forward), evictions, prefetches (look-ahead and warm-start
        loads), useful_prefetches (prefetched experts used before eviction), bytes_loaded
        (host-to-device bytes, demand + prefetch), resident ({layer_idx: [experts]}),
        rounds, cache_size, num_experts, eviction_policy, prefetch_strategy, per_layer, store.
        """
        keys = ("hits", "misses", "evictions", "prefetches", "useful_prefetches", "bytes_loaded", "rounds")
        totals = {k: sum(getattr(c, k) for c in self.caches) for k in keys}
        accesses = totals["hits"] + totals["misses"]
        return {
            **totals,
            "hit_rate": totals["hits"] / accesses if accesses else 0.0,
            "resident": {c.layer_idx: c.resident() for c in self.caches},
            "cache_size": self.caches[0].cache_size,
            "num_experts": self.store.num_experts,
            "eviction_policy": self.eviction_policy,
            "prefetch_strategy": self.prefetch_strategy,
            "per_layer": [c.layer_stats() for c in self.caches],
            "store": self.store.stats(),
        }

    def reset_stats(self) -> None:
        """Zero the counters (residency and usage counts are kept)."""
        for c in self.caches:
            c.reset_stats()
        if hasattr(self.store, "reset_stats"):
            self.store.reset_stats()  # type: ignore[attr-defined]

    def resident(self) -> Dict[int, List[int]]:
        return {c.layer_idx: c.resident() for c in self.caches}

    def __repr__(self) -> str:
        return (
            f"DynamicExpertLoader(layers={len(self.caches)}, cache_size={self.caches[0].cache_size}, "
            f"num_experts={self.store.num_experts}, eviction_policy={self.eviction_policy!r}, "
            f"prefetch_strategy={self.prefetch_strategy!r})"
        )
