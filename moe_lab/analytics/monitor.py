"""ExpertMonitor: live expert-load statistics from forward hooks, for training and serving.

    from moe_lab.analytics import ExpertMonitor
    monitor = ExpertMonitor(model, window_size=None)   # None: everything since start
    monitor.start_monitoring()
    ... model(ids) ...                                 # any forwards, from any thread
    stats = monitor.get_current_stats()                # MonitoringStats
    stats.layers[0].expert_fractions, stats.layers[0].dead_experts, stats.to_dict()
    summary = monitor.stop_monitoring()                # the final stats as a dict

    trainer = MoETrainer(model, monitor=monitor)       # logged to metrics.jsonl + TensorBoard

How it works: one forward hook, shared by every :class:`~moe_lab.model.MoELayer`, reads the
``info`` dict the layer returns (``expert_counts`` [E], ``dropped_fraction``) and the layer's
``token_mask``, and adds them in place into accumulator tensors kept on the layer as
non-persistent buffers (on the layer's device, moved by ``model.to()``, never saved in a
state dict; removed by :meth:`ExpertMonitor.stop_monitoring`). In eager mode the adds run
under a lock, so concurrent forwards from several threads are all counted. Nothing is
copied to the host until :meth:`ExpertMonitor.get_current_stats`, which makes one
device-to-host copy. The hook never touches the autograd graph.

Under ``torch.compile`` (the trainer compiles each decoder layer on CUDA) the hook is traced
into the graph with no graph break and no recompilation between layers: the in-place adds
become part of the compiled graph (no lock there; compiled training runs in one thread).

Window: with ``window_size=None`` the statistics cover every forward since
:meth:`start_monitoring` (or the last :meth:`reset`). With ``window_size=N`` they cover the
last N forward calls of each MoE layer (N micro-batches during training, N batches of
requests in serving), kept in a ring of N slots on the device; ``window_seconds`` is then
the share of the elapsed time that N forwards took at the average rate. The ring takes
``N * (E + 2) * 8`` bytes per MoE layer on the model's device.

The stable, documented output is :meth:`MonitoringStats.to_dict`::

    {"monitoring": bool, "window_size": int | None, "window_seconds": float,
     "num_forwards": int, "num_tokens": int, "timestamp": float (unix time),
     "mean_load_imbalance": float, "max_load_imbalance": float, "num_dead_experts": int,
     "layers": [{"layer": int, "num_forwards": int, "num_tokens": int,
                 "expert_counts": [int] * E, "expert_fractions": [float] * E,
                 "load_imbalance": float (max/mean), "load_cv": float (std/mean),
                 "dead_experts": [int], "dropped_fraction": float}, ...]}

Definitions: counts are routed assignments (a token sent to k experts counts k times);
tokens are real (non-padding) tokens; ``dead_experts`` are experts with no assignments in
the window of a layer that saw at least one token (before any traffic no expert is called
dead); ``dropped_fraction`` is the token-weighted mean of the router's dropped fraction.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import InputError


@dataclass
class LayerMonitorStats:
    """One MoE layer over the monitoring window."""

    layer: int  #: transformer layer index
    num_forwards: int
    num_tokens: int
    expert_counts: List[int]
    expert_fractions: List[float]
    load_imbalance: float  #: max / mean of the counts (0 before any token)
    load_cv: float  #: std / mean of the counts
    dead_experts: List[int] = field(default_factory=list)
    dropped_fraction: float = 0.0


@dataclass
class MonitoringStats:
    """What :meth:`ExpertMonitor.get_current_stats` returns; ``to_dict()`` is the stable form."""

    layers: List[LayerMonitorStats]
    monitoring: bool  #: hooks attached right now
    window_size: Optional[int]  #: forwards per layer kept (None: all since start/reset)
    window_seconds: float  #: wall time the window spans
    num_forwards: int  #: model forwards in the window
    num_tokens: int  #: real tokens in the window (counted once per forward, not per layer)
    timestamp: float  #: unix time of the snapshot

    @property
    def mean_load_imbalance(self) -> float:
        return sum(l.load_imbalance for l in self.layers) / len(self.layers) if self.layers else 0.0

    @property
    def max_load_imbalance(self) -> float:
        return max((l.load_imbalance for l in self.layers), default=0.0)

    @property
    def dead_experts(self) -> Dict[int, List[int]]:
        """``{layer: [expert ids]}`` for layers that have dead experts."""
        return {l.layer: l.dead_experts for l in self.layers if l.dead_experts}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict; the keys are documented in :mod:`moe_lab.analytics.monitor`."""
        return {
            "monitoring": self.monitoring,
            "window_size": self.window_size,
            "window_seconds": self.window_seconds,
            "num_forwards": self.num_forwards,
            "num_tokens": self.num_tokens,
            "timestamp": self.timestamp,
            "mean_load_imbalance": self.mean_load_imbalance,
            "max_load_imbalance": self.max_load_imbalance,
            "num_dead_experts": sum(len(l.dead_experts) for l in self.layers),
            "layers": [asdict(l) for l in self.layers],
        }


class _Host:
    """Host-side counters of one layer's eager forwards (exact ints, no device op needed)."""

    __slots__ = ("tokens", "forwards")

    def __init__(self) -> None:
        self.tokens = 0
        self.forwards = 0


_NUM_MONITORS = itertools.count()


class ExpertMonitor:
    """Live per-expert load of an MoE model, from forward hooks; thread-safe.

    Args:
        model: an :class:`~moe_lab.MoEModel` (or any module containing
            :class:`~moe_lab.model.MoELayer` s).
        window_size: keep only the last N forwards of each layer (None: all since start).
        start: attach the hooks right away (same as calling :meth:`start_monitoring`).
    """

    def __init__(self, model: nn.Module, window_size: Optional[int] = None, start: bool = False) -> None:
        from ..model.moe_layer import MoELayer

        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)
                                        or window_size < 1):
            raise InputError(f"window_size must be a positive int or None, got {window_size!r}")
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if not layers:
            raise InputError(f"{type(model).__name__} has no MoE layers to monitor")
        indices = list(getattr(model, "moe_layer_indices", None) or range(len(layers)))
        if len(indices) != len(layers):
            indices = list(range(len(layers)))
        self.model = model
        self.window_size = window_size
        self._layers = list(zip(indices, layers))
        self._lock = threading.Lock()
        self._handles: List[Any] = []
        prefix = f"_moe_lab_monitor{next(_NUM_MONITORS)}_"
        names = ("counts", "tokens", "forwards", "dropped") + (("wcounts", "wtokens", "wdropped") if window_size else ())
        self._names = tuple(prefix + n for n in names)
        #: the accumulator tensors of each layer (while attached, the layer's buffers are authoritative)
        self._acc: Dict[int, Tuple[torch.Tensor, ...]] = {}
        self._host: Dict[int, _Host] = {idx: _Host() for idx, _ in self._layers}
        self._started_at = time.time()
        self._stopped_at: Optional[float] = None
        if start:
            self.start_monitoring()

    # ---- lifecycle --------------------------------------------------------------------
    @property
    def is_monitoring(self) -> bool:
        return bool(self._handles)

    def _new_acc(self, layer: nn.Module) -> Tuple[torch.Tensor, ...]:
        try:
            device = next(layer.parameters()).device
        except StopIteration:  # pragma: no cover - an MoE layer always has parameters
            device = torch.device("cpu")
        e = layer.num_experts
        fdt = torch.float32  # dropped tokens: fractional for top-k (dropped slots / k)
        acc = [torch.zeros(e, dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device),
               torch.zeros((), dtype=torch.long, device=device), torch.zeros((), dtype=fdt, device=device)]
        if self.window_size:
            n = self.window_size
            acc += [torch.zeros(n, e, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.long, device=device),
                    torch.zeros(n, dtype=fdt, device=device)]
        return tuple(acc)

    def _layer_acc(self, idx: int, layer: nn.Module) -> Tuple[torch.Tensor, ...]:
        """The live accumulators: the layer's buffers while attached (they follow ``.to()``)."""
        if self._handles and hasattr(layer, self._names[0]):
            return tuple(getattr(layer, n) for n in self._names)
        return self._acc[idx]

    def start_monitoring(self, reset: bool = True) -> "ExpertMonitor":
        """Attach the hooks (a no-op when already attached). ``reset`` clears earlier data."""
        with self._lock:
            if self._handles:
                return self
            hook = self._make_hook()
            for idx, layer in self._layers:
                if idx not in self._acc:
                    self._acc[idx] = self._new_acc(layer)
                for name, t in zip(self._names, self._acc[idx]):
                    layer.register_buffer(name, t, persistent=False)  # moves with the model, not saved
                self._handles.append(layer.register_forward_hook(hook, with_kwargs=True))
            if reset:
                self._reset_locked()
            self._stopped_at = None
        return self

    def stop_monitoring(self) -> Dict[str, Any]:
        """Detach the hooks and return the final statistics as a dict (``to_dict()`` form)."""
        with self._lock:
            for idx, layer in self._layers:
                if self._handles:
                    self._acc[idx] = self._layer_acc(idx, layer)
                for name in self._names:
                    if name in layer._buffers:
                        delattr(layer, name)
            for h in self._handles:
                h.remove()
            self._handles = []
            self._stopped_at = time.time()
        return self.get_current_stats().to_dict()

    def reset(self) -> None:
        """Forget everything counted so far (the hooks stay as they are)."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        for idx, layer in self._layers:
            if idx in self._acc:
                for t in self._layer_acc(idx, layer):
                    t.zero_()  # in place: compiled graphs keep using the same tensors
            self._host[idx] = _Host()
        self._started_at = time.time()

    def __enter__(self) -> "ExpertMonitor":
        return self.start_monitoring()

    def __exit__(self, *exc: Any) -> None:
        self.stop_monitoring()

    # ---- the hook ---------------------------------------------------------------------
    @property
    def monitored_layers(self) -> List[Tuple[int, Any]]:
        """``(transformer layer index, MoE layer)`` of every layer the monitor watches."""
        return list(self._layers)

    def make_hook(self):
        """The forward hook :meth:`start_monitoring` registers on every MoE layer (public for
        benchmarks that time it alone: call it as ``hook(layer, args, kwargs, output)``)."""
        return self._make_hook()

    def _make_hook(self):
        """One hook shared by every layer (so compiled layers share one graph); it finds the
        layer's accumulators through the layer itself."""
        names, window, lock, hosts = self._names, self.window_size, self._lock, self._host
        index_of = {id(layer): idx for idx, layer in self._layers}

        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
            info = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(info, dict) or "expert_counts" not in info or not hasattr(module, names[0]):
                return
            counts_E = info["expert_counts"].detach()
            mask = args[1] if len(args) > 1 else kwargs.get("token_mask")
            if mask is not None:
                tokens: Any = mask.detach().sum()  # stays on device: no host sync
            else:
                x = args[0] if args else kwargs.get("x_BSD")
                tokens = x.numel() // x.shape[-1]
            # a top-k router without capacity never drops: skip its (always zero) dropped fraction
            router = getattr(module, "router", None)
            never_drops = router is not None and getattr(router, "capacity_factor", 0.0) is None
            dropped = None if never_drops else info.get("dropped_fraction")
            if dropped is not None and not isinstance(dropped, torch.Tensor):
                dropped = torch.tensor(float(dropped), device=counts_E.device)
            acc = [getattr(module, n) for n in names]
            if torch.compiler.is_compiling():
                # traced into the graph (the trainer compiles decoder layers on CUDA): in-place
                # adds on the layer's buffers only, no lock, clock or Python state (no graph break)
                _accumulate(acc, window, counts_E, tokens, dropped, None)
                return
            with lock:
                _accumulate(acc, window, counts_E, tokens, dropped, hosts.get(index_of.get(id(module), -1)))

        return hook

    # ---- reading ----------------------------------------------------------------------
    def get_current_stats(self) -> MonitoringStats:
        """A snapshot of the window (one device-to-host copy). Safe to call from any thread."""
        with self._lock:
            rows = []
            for idx, layer in self._layers:
                if idx not in self._acc:
                    rows.append(None)
                    continue
                acc = self._layer_acc(idx, layer)
                if self.window_size:
                    w_counts, w_tokens, w_dropped = acc[4:]
                    vec = torch.cat([w_counts.sum(0), w_tokens.sum().reshape(1), acc[2].reshape(1)]).double()
                    rows.append(torch.cat([vec, w_dropped.sum().double().reshape(1)]))
                else:
                    vec = torch.cat([acc[0], acc[1].reshape(1), acc[2].reshape(1)]).double()
                    rows.append(torch.cat([vec, acc[3].double().reshape(1)]))
            hosts = {idx: (h.tokens, h.forwards) for idx, h in self._host.items()}
            started, stopped, monitoring = self._started_at, self._stopped_at, bool(self._handles)
        present = [r for r in rows if r is not None]
        host = None  # [L', E + 3] float64 on the host: one device-to-host copy
        if present:
            same_device = all(p.device == present[0].device for p in present)
            host = torch.stack(present).cpu() if same_device else torch.stack([p.cpu() for p in present])
        now = time.time()
        end = stopped if stopped is not None else now
        elapsed = max(0.0, end - started)
        layers: List[LayerMonitorStats] = []
        j = 0
        total_forwards = 0
        for (idx, layer), r in zip(self._layers, rows):
            e = layer.num_experts
            if r is None:
                layers.append(LayerMonitorStats(idx, 0, 0, [0] * e, [0.0] * e, 0.0, 0.0, [], 0.0))
                continue
            v = host[j]
            j += 1
            counts = v[:e]
            host_tokens, host_forwards = hosts[idx]
            tokens = int(round(float(v[e]))) + host_tokens
            forwards = int(round(float(v[e + 1]))) + host_forwards
            total_forwards = max(total_forwards, forwards)
            if self.window_size:
                forwards = min(forwards, self.window_size)
            total = float(counts.sum())
            mean = total / e
            layers.append(LayerMonitorStats(
                layer=idx,
                num_forwards=forwards,
                num_tokens=tokens,
                expert_counts=[int(round(c)) for c in counts.tolist()],
                expert_fractions=(counts / total).tolist() if total > 0 else [0.0] * e,
                load_imbalance=float(counts.max()) / mean if total > 0 else 0.0,
                load_cv=float(counts.std(unbiased=False)) / mean if total > 0 else 0.0,
                dead_experts=[i for i in range(e) if counts[i] == 0] if tokens > 0 else [],
                dropped_fraction=float(v[e + 2]) / tokens if tokens > 0 else 0.0,
            ))
        if self.window_size and total_forwards > self.window_size:
            elapsed *= self.window_size / total_forwards  # the window's share, at a steady rate
        return MonitoringStats(
            layers=layers,
            monitoring=monitoring,
            window_size=self.window_size,
            window_seconds=elapsed,
            num_forwards=max((l.num_forwards for l in layers), default=0),
            num_tokens=layers[0].num_tokens if layers else 0,
            timestamp=now,
        )


def _accumulate(acc: List[torch.Tensor], window: Optional[int], counts_E: torch.Tensor, tokens: Any,
                dropped: Optional[torch.Tensor], host: Optional[_Host]) -> None:
    """Add one forward of one layer into its accumulators (device ops; ``host``: eager counters).

    Cumulative: counts, tokens and dropped tokens are summed (tokens and the forward count
    in host ints when known on the host). Window: the forward is written into ring slot
    ``forwards % N`` (computed on the device), overwriting the forward N calls ago.
    """
    counts, tok, fwd, drop = acc[:4]
    if window:
        w_counts, w_tokens, w_dropped = acc[4:]
        slot = torch.remainder(fwd, window).reshape(1)  # [1], on device
        w_counts.index_copy_(0, slot, counts_E.unsqueeze(0).to(w_counts.dtype))
        w_tokens.index_fill_(0, slot, tokens)
        w_dropped.index_fill_(0, slot, dropped * tokens if dropped is not None else 0.0)
        fwd.add_(1)
        return
    counts.add_(counts_E)
    if isinstance(tokens, torch.Tensor) or host is None:
        tok.add_(tokens)
    else:
        host.tokens += tokens
    if host is None:
        fwd.add_(1)
    else:
        host.forwards += 1
    if dropped is not None:
        if isinstance(tokens, torch.Tensor):
            drop.add_(dropped * tokens)
        else:
            drop.add_(dropped, alpha=tokens)
