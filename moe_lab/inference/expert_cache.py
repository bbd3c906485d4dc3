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
  3. look-ahead, one layer ahead (``lookahead=True``): when MoE layer ``a`` has done its
     attention, the *next* MoE layer's norm and router are applied to that residual stream
     (it changes slowly from layer to layer) to predict the experts the next layer will
     pick; they are copied in while ``a``'s experts and the next layer's attention run. The
     first MoE layer predicts from its own router on the stream entering it.
- ``"none"``: no warm start, no look-ahead, plain demand loading.

Overlap and synchronisation:

- On CUDA the host copies are page-locked, and every host-to-device copy (prefetch or
  demand) runs on a side stream after the work already queued (earlier readers of the
  slot), with an event per slot; a layer's forward makes the compute stream wait for the
  events of its own slots only.
- A partly resident layer does one host read per forward: its tokens per expert together
  with the next layer's predicted votes. Then it loads its misses (if any), issues the next
  layer's prefetches and runs :meth:`CachedExperts.forward_resident`, the hit path, which
  reads only device tensors (an expert-to-slot map on the device): no host sync, so it can
  be captured in a CUDA graph by a caller that knows the needed experts are resident.
- On CPU the same logic runs synchronously (no streams).
- Counters (:meth:`DynamicExpertLoader.stats`): experts_needed = hits + misses;
  prefetches = prefetch_hits + wasted_prefetches + pending_prefetches.

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
        self._prefetched_unused: set = set()  # prefetched since this layer's last forward, not yet judged
        self.load_listeners: List[Callable[["CachedExperts", int, int], None]] = []
        self.device = torch.device(device)
        #: expert -> slot on the device (-1: not resident); the hit path reads only this
        self.slot_of_expert = torch.full((self.num_experts,), -1, dtype=torch.long, device=device)
        #: the side stream host-to-device copies run on (CUDA); None: copies are synchronous
        self.copy_stream: Optional["torch.cuda.Stream"] = None
        self._pending: Dict[int, Any] = {}  # slot -> CUDA event of its copy in flight
        #: look-ahead stashed for this forward: (next layer's cache, its predicted votes [E])
        self.lookahead: Optional[Tuple["CachedExperts", torch.Tensor]] = None
        #: the next MoE layer's cache when this layer predicts it (look-ahead on)
        self.next_cache: Optional["CachedExperts"] = None
        self.reset_stats()

    # ---- bookkeeping ------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.hits = self.misses = self.evictions = self.prefetches = 0
        self.prefetch_hits = self.wasted_prefetches = 0
        self.bytes_loaded = self.rounds = self.forwards = 0

    @property
    def useful_prefetches(self) -> int:
        """Prefetched experts the next forward of the layer used (= ``prefetch_hits``)."""
        return self.prefetch_hits

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
            self.slot_of_expert[old] = -1
            if old in self._prefetched_unused:  # evicted before its layer ran: the copy was wasted
                self._prefetched_unused.discard(old)
                self.wasted_prefetches += 1
            self.evictions += 1
        self.slot_expert[slot] = -1
        w_in, w_out = self.store.fetch(self.layer_idx, expert)
        self._copy_into(slot, w_in, w_out)
        self.slot_expert[slot] = expert
        self.expert_slot[expert] = slot
        self.slot_of_expert[expert] = slot
        self.bytes_loaded += w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
        if prefetch:
            self.prefetches += 1
            self._prefetched_unused.add(expert)
        for fn in self.load_listeners:
            fn(self, expert, slot)
        return slot

    def _copy_into(self, slot: int, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        """Copy one expert's host weights into device ``slot``.

        On CUDA the copy runs on :attr:`copy_stream` (from pinned memory: asynchronous), after
        the work already queued on the compute stream (earlier readers of the slot), and an
        event marks its end: the forward that uses the slot waits for that event only
        (:meth:`_wait_slots`). Elsewhere it is an ordinary synchronous copy.
        """
        stream = self.copy_stream
        if stream is None:
            self.slots.w_in[slot].copy_(w_in)
            self.slots.w_out[slot].copy_(w_out)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.slots.w_in[slot].copy_(w_in, non_blocking=w_in.is_pinned())
            self.slots.w_out[slot].copy_(w_out, non_blocking=w_out.is_pinned())
            done = torch.cuda.Event()
            done.record(stream)
        self._pending[slot] = done

    def _wait_slots(self, slots: Iterable[int]) -> None:
        """Make the compute stream wait for the copies in flight into ``slots`` (only those)."""
        if not self._pending:
            return
        current = torch.cuda.current_stream(self.device)
        for s in slots:
            ev = self._pending.pop(s, None)
            if ev is not None:
                current.wait_event(ev)

    @torch.no_grad()
    def arrange_identity(self) -> bool:
        """With a slot for every expert, put expert ``e`` in slot ``e`` (loading what is missing).

        The slots are then an ordinary stacked expert module (``self.slots``) that static,
        graph-captured decoding can call directly. Returns False when there are fewer slots
        than experts.
        """
        if self.cache_size != self.num_experts:
            return False
        self._wait_slots(list(self._pending))
        for e in range(self.num_experts):
            if self.slot_expert[e] == e:
                continue
            prev = self.expert_slot.get(e)  # expert e sits in another slot: that slot is freed
            if prev is not None:
                self.slot_expert[prev] = -1
            old = self.slot_expert[e]
            if old >= 0:
                del self.expert_slot[old]
                self.slot_of_expert[old] = -1
            w_in, w_out = self.store.fetch(self.layer_idx, e)
            self.slots.w_in[e].copy_(w_in)
            self.slots.w_out[e].copy_(w_out)
            self.bytes_loaded += w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
            self.slot_expert[e] = e
            self.expert_slot[e] = e
            self.slot_of_expert[e] = e
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

    def prefetch_votes(self, votes_E: Sequence[float]) -> int:
        """Prefetch the experts a prediction voted for (most votes first, ties by expert id)."""
        order = sorted((e for e, v in enumerate(votes_E) if v > 0), key=lambda e: (-votes_E[e], e))
        return self.prefetch(order)

    # ---- forward ----------------------------------------------------------------------
    def _read_counts(self, tokens_per_expert: torch.Tensor) -> Tuple[List[int], Optional[List[float]]]:
        """The layer's one host read: its tokens per expert, and the look-ahead votes for
        the next MoE layer when one is stashed (read together: a single synchronisation)."""
        look, self.lookahead = self.lookahead, None
        if look is None:
            return tokens_per_expert.tolist(), None
        nxt, votes_E = look
        if votes_E.device == tokens_per_expert.device:
            both = torch.cat([tokens_per_expert.to(votes_E.dtype), votes_E]).tolist()
            return [int(c) for c in both[: self.num_experts]], both[self.num_experts :]
        return tokens_per_expert.tolist(), votes_E.tolist()

    @torch.no_grad()
    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        nxt = self.lookahead[0] if self.lookahead is not None else None
        counts, votes = self._read_counts(tokens_per_expert)  # [E], [E_next]
        if len(counts) != self.num_experts:
            raise ExpertError(f"tokens_per_expert has {len(counts)} entries, expected {self.num_experts}")
        if self.prepare(counts, votes, nxt):
            if not any(counts):
                return x_ND.new_zeros(x_ND.shape[0], self.hidden_size)
            return self.forward_resident(x_ND, tokens_per_expert, backend)
        out_ND = self.forward_rounds(x_ND, counts, backend)
        if nxt is not None and votes is not None:
            nxt.prefetch_votes(votes)
        return out_ND

    @torch.no_grad()
    def prepare(self, counts: Sequence[int], votes: Optional[Sequence[float]] = None,
                nxt: Optional["CachedExperts"] = None) -> bool:
        """The host part of a forward, from the layer's routing counts ``[E]`` (host ints).

        Judges the prefetches made since the layer last ran, counts hits and misses, and,
        when the needed experts fit in the slots, loads the misses, issues the next layer's
        prefetch from ``votes`` and makes the compute stream wait for this layer's copies.
        Returns True when :meth:`forward_resident` can run now; False when more experts are
        needed than there are slots (the caller runs :meth:`forward_rounds`, then the
        prefetch).
        """
        self.forwards += 1
        needed = [e for e, c in enumerate(counts) if c > 0]
        for e in self._prefetched_unused:  # judge the prefetches made since this layer last ran
            if counts[e] > 0:
                self.prefetch_hits += 1
            else:
                self.wasted_prefetches += 1
        self._prefetched_unused.clear()
        if needed:
            self._tick += 1
        for e in needed:
            if e in self.expert_slot:
                self.hits += 1
            else:
                self.misses += 1
            self.frequency[e] += 1
            self.last_used[e] = self._tick
        self.add_usage(counts)
        if len(needed) > self.cache_size:
            return False
        for e in needed:
            if e not in self.expert_slot:
                self._load(e, keep=needed)
        if nxt is not None and votes is not None:  # the next layer's copies overlap this layer's GEMMs
            nxt.prefetch_votes(votes)
        self._wait_slots(self.expert_slot[e] for e in needed)
        self.rounds += 1 if needed else 0
        return True

    def forward_rounds(self, x_ND: torch.Tensor, counts: Sequence[int], backend: Optional[str] = None) -> torch.Tensor:
        """A forward that needs more experts than slots (a long prefill): rounds of at most
        C experts, resident ones first (so they are never evicted before use)."""
        out_ND = x_ND.new_zeros(x_ND.shape[0], self.hidden_size)
        starts = [0] * self.num_experts
        acc = 0
        for e, c in enumerate(counts):
            starts[e] = acc
            acc += c
        needed = sorted((e for e, c in enumerate(counts) if c > 0), key=lambda e: (e not in self.expert_slot, e))
        for r in range(0, len(needed), self.cache_size):
            group = needed[r : r + self.cache_size]
            for e in group:
                if e not in self.expert_slot:
                    self._load(e, keep=group)
            self._wait_slots(self.expert_slot[e] for e in group)
            self._run_round(x_ND, out_ND, group, list(counts), starts, backend)
        return out_ND

    def forward_resident(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor,
                         backend: Optional[str] = None) -> torch.Tensor:
        """The hit path: ``GroupedExperts.forward`` over the device slots.

        Reads only device tensors (``slot_of_expert``, ``tokens_per_expert``): no host
        synchronisation, so it can be captured in a CUDA graph. Rows go to their expert's slot
        in a stable order, so each slot's GEMM sees exactly the rows (in the same order) that
        the fully resident layer gives that expert: the outputs are equal. Rows of an expert
        that is not resident come out as zeros (:meth:`forward` loads misses first, so it
        has none; the engine's graph step relies on it for idle rows).
        """
        n, dev = x_ND.shape[0], x_ND.device
        tpe_E = tokens_per_expert.to(dev)
        if self.cache_size == self.num_experts and all(s == e for e, s in enumerate(self.slot_expert)):
            return self.slots(x_ND, tpe_E, backend=backend)  # slot e holds expert e: rows already in slot order
        expert_N = torch.repeat_interleave(torch.arange(self.num_experts, device=dev), tpe_E, output_size=n)
        slot_N = self.slot_of_expert[expert_N]
        valid_N = slot_N >= 0
        slot_N = torch.where(valid_N, slot_N, torch.zeros_like(slot_N))  # not resident: any slot, zeroed below
        tps_C = torch.zeros(self.cache_size, dtype=tpe_E.dtype, device=dev)
        tps_C.scatter_add_(0, slot_N, torch.ones_like(slot_N, dtype=tpe_E.dtype))
        order_N = torch.sort(slot_N, stable=True).indices  # rows grouped by slot
        y_ND = self.slots(x_ND[order_N], tps_C, backend=backend)
        out_ND = torch.empty_like(y_ND).index_copy_(0, order_N, y_ND)
        return torch.where(valid_N[:, None], out_ND, torch.zeros_like(out_ND))

    def _run_round(
        self,
        x_ND: torch.Tensor,
        out_ND: torch.Tensor,
        group: List[int],
        counts: List[int],
        starts: List[int],
        backend: Optional[str],
    ) -> None:
        """One round of a forward that needs more experts than slots: run the experts of
        ``group`` (all resident) on their rows, writing into ``out_ND``."""
        self.rounds += 1
        by_slot = sorted(group, key=lambda e: self.expert_slot[e])
        tokens_per_slot = [0] * self.cache_size
        for e in by_slot:
            tokens_per_slot[self.expert_slot[e]] = counts[e]
        tps = torch.tensor(tokens_per_slot, device=x_ND.device)  # [C]
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
            "prefetch_hits": self.prefetch_hits,
            "useful_prefetches": self.prefetch_hits,
            "wasted_prefetches": self.wasted_prefetches,
            "pending_prefetches": len(self._prefetched_unused),
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
        device, dtype: of the device slots; default: each layer's slots where its router is
            (a model split over devices keeps them per layer) and the dense weights' dtype.
        lookahead: with ``usage_based``, prefetch one layer ahead from the next layer's
            router (False: warm start and hot experts only; for comparisons).

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
        lookahead: bool = True,
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
        self.lookahead = bool(lookahead) and prefetch_strategy == "usage_based"
        dtype = dtype or _model_dtype(model)
        layer_ids = list(model.moe_layer_indices)
        if store is None:
            store = TensorExpertStore(
                {i: (m.experts.w_in, m.experts.w_out) for i, m in zip(layer_ids, moe_layers)},
                pin_memory=self.device.type == "cuda" or any(
                    m.router.gate.weight.device.type == "cuda" for m in moe_layers),
            )
        missing = sorted(set(layer_ids) - set(store.layer_indices()))
        if missing:
            raise ConfigError(f"the expert store has no weights for MoE layers {missing}")
        self.store = store
        self.caches: List[CachedExperts] = []
        streams: Dict[str, Any] = {}  # one side stream per device for the copies
        for idx, layer in zip(layer_ids, moe_layers):
            if layer.experts.num_experts != store.num_experts:
                raise ConfigError(
                    f"layer {idx} has {layer.experts.num_experts} experts, the store holds {store.num_experts}"
                )
            # each layer's slots sit where its router is (a model split over devices by a
            # device_map) unless one device is given
            where = torch.device(device) if device is not None else layer.router.gate.weight.device
            cache = CachedExperts(idx, layer.experts, store, cache_size, eviction_policy, where, dtype)
            if where.type == "cuda" and cache.cache_size < cache.num_experts:
                if str(where) not in streams:
                    streams[str(where)] = torch.cuda.Stream(device=where)
                cache.copy_stream = streams[str(where)]
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
        if self.lookahead:
            self._install_lookahead()

    # ---- look-ahead prefetch ----------------------------------------------------------
    def _install_lookahead(self) -> None:
        """Hooks that predict each MoE layer's experts one layer ahead.

        - The first MoE layer: when its decoder layer starts, its own router on the residual
          stream entering it (the copies overlap its attention).
        - Every later MoE layer ``b``: when the previous MoE layer ``a`` has done its
          attention, ``b``'s norm and router on that residual stream (it changes slowly from
          layer to layer). The votes stay on the device and are read with ``a``'s own routing
          counts (one host read per MoE layer); the copies are issued before ``a``'s expert
          GEMMs, so they overlap ``a``'s experts and ``b``'s attention.

        Nothing is installed when every expert is resident.
        """
        by_layer = {c.layer_idx: c for c in self.caches}
        chain = [layer for layer in self.model.layers
                 if layer.layer_idx in by_layer and by_layer[layer.layer_idx].cache_size < by_layer[layer.layer_idx].num_experts]
        if not chain:
            return
        masks: Dict[str, Any] = {}

        def remember_mask(decoder_layer: nn.Module, args: Tuple[Any, ...]) -> None:
            masks["token_mask"] = args[4] if len(args) > 4 else None
            by_layer[decoder_layer.layer_idx].lookahead = None

        first = chain[0]
        first_cache = by_layer[first.layer_idx]

        def own_prediction(decoder_layer: nn.Module, args: Tuple[Any, ...]) -> None:
            remember_mask(decoder_layer, args)
            first_cache.prefetch_votes(self._votes(decoder_layer, args[0], masks["token_mask"]).tolist())

        self._hooks.append(first.register_forward_pre_hook(own_prediction))
        for layer in chain[1:]:
            self._hooks.append(layer.register_forward_pre_hook(remember_mask))
        for a, b in zip(chain, chain[1:]):
            by_layer[a.layer_idx].next_cache = by_layer[b.layer_idx]

            def next_prediction(norm: nn.Module, args: Tuple[Any, ...], a: nn.Module = a, b: nn.Module = b) -> None:
                votes_E = self._votes(b, args[0], masks.get("token_mask"))
                by_layer[a.layer_idx].lookahead = (by_layer[b.layer_idx], votes_E)

            self._hooks.append(a.post_attn_norm.register_forward_pre_hook(next_prediction))

    @staticmethod
    @torch.no_grad()
    def _votes(decoder_layer: nn.Module, x_BSD: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Tokens per expert ``[E]`` (float, on the layer's device) that ``decoder_layer``'s
        router would pick for the residual stream ``x_BSD``; masked tokens do not vote."""
        router = decoder_layer.mlp.router
        dev = router.gate.weight.device
        x_BSD = x_BSD.to(dev)
        # .forward, not the call: the norm's own look-ahead hook must not fire for a prediction
        h_TD = decoder_layer.post_attn_norm.forward(x_BSD).reshape(-1, x_BSD.shape[-1])  # [T, D]
        logits_TE = router.compute_logits(h_TD, training=False)
        select = getattr(router, "select", None)
        if select is not None and hasattr(router, "normalize_weights"):  # token choice: the router's own rule
            top_TK = select(logits_TE)[1]
        else:
            top_TK = logits_TE.topk(min(router.top_k, router.num_experts), dim=-1).indices
        ones_TK = torch.ones(top_TK.shape, dtype=torch.float32, device=dev)
        if token_mask is not None:
            ones_TK = ones_TK * token_mask.reshape(-1, 1).to(device=dev, dtype=torch.float32)
        votes_E = torch.zeros(router.num_experts, dtype=torch.float32, device=dev)
        return votes_E.scatter_add_(0, top_TK.reshape(-1), ones_TK.reshape(-1))

    # ---- reporting --------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Totals over the MoE layers, plus ``per_layer`` and the store's stats.

        Keys: experts_needed (demand accesses: one expert needed by one layer in one forward)
        = hits (resident, or its prefetch issued in time) + misses (loaded on demand, the
        forward waits for it); hit_rate = hits / experts_needed; evictions; prefetches
        (copies issued ahead of use: look-ahead and warm start) = prefetch_hits (the layer's
        next forward used the expert) + wasted_prefetches (it did not, or the expert was
        evicted first) + pending_prefetches (the layer has not run since);
        useful_prefetches (= prefetch_hits); bytes_loaded (host-to-device bytes, demand +
        prefetch); resident ({layer_idx: [experts]}); rounds; cache_size; num_experts;
        eviction_policy; prefetch_strategy; lookahead; per_layer; store.
        """
        keys = ("hits", "misses", "evictions", "prefetches", "prefetch_hits", "wasted_prefetches",
                "bytes_loaded", "rounds")
        totals = {k: sum(getattr(c, k) for c in self.caches) for k in keys}
        accesses = totals["hits"] + totals["misses"]
        return {
            **totals,
            "experts_needed": accesses,
            "useful_prefetches": totals["prefetch_hits"],
            "pending_prefetches": sum(len(c._prefetched_unused) for c in self.caches),
            "lookahead": self.lookahead,
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
