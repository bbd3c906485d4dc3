"""Matplotlib plots for training and routing (Agg canvas, PNG output).

    from moe_lab.analytics import TrainingVisualizer
    viz = TrainingVisualizer()
    viz.plot_training_curves(history, save_path="curves.png")        # loss (+ routing health)
    viz.plot_training_curves({"train_loss": [3.0, 2.5, 2.0], "eval_loss": [2.8, 2.4],
                              "accuracy": [0.1, 0.3, 0.4]})           # any {name: [numbers]}
    viz.plot_expert_utilization(analysis, save_path="util.png")      # share of tokens per expert
    viz.plot_expert_utilization({0: 0.5, 1: 0.25, 3: 0.25})          # one layer: {expert_id: share}
    viz.plot_routing_heatmap(analysis.heatmap, save_path="heat.png")  # [MoE layers, experts]
    viz.plot_specialization(spec, save_path="spec.png")              # experts x labels
    viz.plot_router_bias("out/metrics.jsonl", save_path="bias.png")  # aux-loss-free bias per layer
    fig = viz.plot_routing_heatmap(analysis.heatmap)                   # no save_path: the Figure

Each function takes plain data (or the dataclasses of :mod:`moe_lab.analytics`), draws one
figure with a title and labelled axes, and either saves it as PNG to ``save_path``
(returning the path as a string) or returns the :class:`matplotlib.figure.Figure`. Input it
cannot plot raises :class:`~moe_lab.errors.InputError` naming the bad key or value.

Training curves: every series whose name contains ``loss`` shares one panel, other metrics
get a panel each; ``P_*`` series are drawn against ``P_step`` / ``step`` when the history has
it (as ``metrics.jsonl`` does), else spread over the same x range (see
:func:`plot_training_curves`).

Figures are built with the object API on an Agg canvas, never through ``pyplot``: nothing
here changes the process-wide matplotlib backend or keeps figures alive in pyplot's registry,
so the functions are safe in notebooks, servers and threads. matplotlib is imported on first
use, so ``import moe_lab`` stays light.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

#: share of tokens above ``OVERLOAD_FACTOR / num_experts`` marks an expert as overloaded
OVERLOAD_FACTOR = 2.0
DPI = 110


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Any, save_path: Optional[PathLike], dpi: int = DPI) -> Any:
    """Save ``fig`` as PNG to ``save_path`` (returning the path) or return the figure."""
    if save_path is None:
        return fig
    path = Path(save_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=dpi, format="png")
    return str(save_path)


def _as_matrix(data: Any, name: str) -> List[List[float]]:
    """A 2-D nested list of floats from a tensor, an array or nested sequences."""
    if hasattr(data, "detach"):
        data = data.detach().cpu().double().tolist()
    elif hasattr(data, "tolist"):
        data = data.tolist()
    try:
        rows = [[float(x) for x in row] for row in data]
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 2-D (rows of numbers), got {type(data).__name__}: {data!r:.60}") from None
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise InputError(f"{name} must be a non-empty rectangular 2-D array, got row lengths {[len(r) for r in rows]}")
    return rows


# ---------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------


def load_metrics_history(metrics_path: PathLike) -> Dict[str, List[float]]:
    """Read a trainer's ``metrics.jsonl`` into the ``history`` dict that
    :func:`plot_training_curves` takes (``step``, ``loss``, ``lr``, ``load_imbalance``,
    ``dropped_fraction``, ``eval_step``, ``eval_loss``). Unreadable lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    history: Dict[str, List[float]] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            if "loss" in rec:
                history.setdefault("step", []).append(rec["step"])
                history.setdefault("loss", []).append(rec["loss"])
                if "lr" in rec:
                    history.setdefault("lr", []).append(rec["lr"])
                layers = rec.get("moe_layers") or []
                if layers:
                    history.setdefault("load_imbalance", []).append(
                        sum(lay["load_imbalance_max_mean"] for lay in layers) / len(layers))
                    history.setdefault("dropped_fraction", []).append(
                        sum(lay["dropped_fraction"] for lay in layers) / len(layers))
            elif "eval_loss" in rec:
                history.setdefault("eval_step", []).append(rec["step"])
                history.setdefault("eval_loss", []).append(rec["eval_loss"])
    return history


#: x-axis keys of a history (never plotted as metrics): ``step`` for train series and
#: ``<prefix>_step`` (e.g. ``eval_step``) for the series named ``<prefix>_*``
STEP_KEY = "step"
#: series with these prefixes are never drawn against the train ``step`` key
EVAL_PREFIXES = ("eval_", "val_", "valid_", "test_")
#: series drawn together on the "Routing health" panel (as the trainer logs them)
ROUTING_KEYS = ("load_imbalance", "dropped_fraction")
_ROUTING_STYLE = {"load_imbalance": ("tab:red", "expert load max/mean"),
                  "dropped_fraction": ("tab:purple", "dropped fraction")}
#: loss series whose unit is nats/token (the loss panel's y label says so when only these appear)
_NATS_LOSSES = {"loss", "train_loss", "eval_loss", "lm_loss", "val_loss", "test_loss"}


def _number(v: Any) -> Optional[float]:
    """``float(v)`` for a real number (Python, numpy or a one-element tensor), else None (bools too)."""
    if hasattr(v, "ndim") and hasattr(v, "item") and v.ndim == 0:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    return float(v)


def _as_series(values: Any, key: str) -> List[float]:
    """A list of floats from a list / tuple / 1-D array or tensor; ``None`` entries become NaN (gaps)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().tolist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InputError(f"history[{key!r}] must be a list of numbers, got {type(values).__name__}: {values!r:.60}")
    out = []
    for i, v in enumerate(values):
        x = math.nan if v is None else _number(v)
        if x is None:
            raise InputError(f"history[{key!r}] must be a list of numbers, but item {i} is {type(v).__name__} {v!r:.40}")
        out.append(x)
    return out


def _step_keys(history: Mapping[str, Any]) -> List[str]:
    """The keys that are x axes: ``step``, ``eval_step`` and any ``P_step`` with a ``P_*`` series."""
    keys = []
    for k in history:
        if k in (STEP_KEY, "eval_step"):
            keys.append(k)
        elif k.endswith("_step") and any(o != k and o.startswith(k[:-4]) for o in history):
            keys.append(k)
    return keys


def _x_key(name: str, step_keys: Sequence[str]) -> Optional[str]:
    """The step key of series ``name``: the longest matching ``P_step``, else ``step`` (not for eval series)."""
    prefixed = [k for k in step_keys if k != STEP_KEY and name.startswith(k[:-4])]
    if prefixed:
        return max(prefixed, key=len)
    if name.startswith(EVAL_PREFIXES) or STEP_KEY not in step_keys:
        return None
    return STEP_KEY


def _curve_label(name: str) -> str:
    return "train loss" if name == "loss" else name.replace("_", " ")


def plot_training_curves(
    history: Dict[str, List[float]], save_path: Optional[str] = None, baseline: Optional[float] = None
) -> Any:
    """Every series of ``history`` against step: losses on one panel, each other metric on its own.

    Panels: every series whose name contains ``loss`` (``loss``, ``train_loss``, ``eval_loss``,
    ``aux_loss``...) shares the first panel, with the optional horizontal ``baseline`` (e.g.
    the unigram entropy); ``load_imbalance`` and ``dropped_fraction`` share a "Routing health"
    panel; any other key (``lr``, ``accuracy``...) gets a panel of its own. Empty series are
    skipped.

    x axis: a series ``P_name`` is drawn against ``P_step`` when the history has it (e.g.
    ``eval_loss`` against ``eval_step``), any other series against ``step``, as the trainer and
    :func:`load_metrics_history` write them; ``eval_*`` (``val_*``, ``test_*``) series never
    use ``step``. A series without such a key (or whose step key has a different length) is
    spread evenly over the x range of the others (first and last points aligned; one value
    sits at the end), so curves of different lengths, e.g. ``{"train_loss": [3, 2.5, 2],
    "eval_loss": [2.8, 2.4]}``, cover the same span. With no step keys at all that range is
    the index ``0..n-1`` of the longest series.

    Args:
        history: ``{name: [numbers]}`` (lists, tuples, 1-D arrays or tensors; ``None`` items
            are gaps), e.g. from :func:`load_metrics_history` or ``TrainingResult.history``.
        save_path: PNG path; None returns the figure.
        baseline: a loss drawn as a dashed horizontal line on the loss panel.

    Raises:
        InputError: ``history`` is not a dict, has no non-empty series besides step keys, has
            a non-string key or a series that is not a list of numbers (the message names it).
    """
    if not isinstance(history, Mapping):
        raise InputError(f"history must be a dict of lists (step, loss, ...), got {type(history).__name__}")
    for k in history:
        if not isinstance(k, str):
            raise InputError(f"history keys must be metric names (str), got {type(k).__name__} {k!r}")
    if baseline is not None:
        if _number(baseline) is None:
            raise InputError(f"baseline must be a number (a loss), got {type(baseline).__name__} {baseline!r}")
        baseline = _number(baseline)
    if not history:
        raise InputError("history is empty; expected {name: [numbers]}, e.g. {'loss': [3.0, 2.5]}")
    data = {k: _as_series(v, k) for k, v in history.items()}
    step_keys = _step_keys(history)
    series = {k: v for k, v in data.items() if k not in step_keys and v}
    if not series:
        only_x = f" (step keys {step_keys} are only x axes)" if step_keys else ""
        raise InputError(f"history has no 'loss' or other non-empty metric series to plot{only_x}; expected "
                         f"{{name: [numbers]}}, its keys are {sorted(history)}")

    xs: Dict[str, Optional[List[float]]] = {}
    for name, ys in series.items():
        key = _x_key(name, step_keys)
        xs[name] = data[key] if key is not None and len(data[key]) == len(ys) else None
    aligned = [x for v in xs.values() if v is not None for x in v if not math.isnan(x)]
    lo, hi = (min(aligned), max(aligned)) if aligned else (0.0, float(max(len(v) for v in series.values()) - 1))
    for name, ys in series.items():
        if xs[name] is None:
            n = len(ys)
            xs[name] = [hi] if n == 1 else [lo + i * (hi - lo) / (n - 1) for i in range(n)]

    losses = [k for k in series if "loss" in k.lower()]
    routing = [k for k in ROUTING_KEYS if k in series]
    others = [k for k in series if k not in losses and k not in routing]
    panels = ([("loss", losses)] if losses else []) + ([("routing", routing)] if routing else []) \
        + [("metric", [k]) for k in others]
    cols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / cols)
    fig = _new_figure(6.5 if cols == 1 else 5.5 * cols, 4.2 * nrows)
    if aligned:
        xlabel = "optimizer step"
    else:
        same = len({len(v) for v in series.values()}) == 1
        xlabel = "index" if same else "index (shorter series spread over the same range)"
    for i, (kind, names) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        if kind == "loss":
            for name in names:
                style = "o-" if name.startswith(EVAL_PREFIXES) or len(series[name]) == 1 else "-"
                ax.plot(xs[name], series[name], style, label=_curve_label(name))
            if baseline is not None:
                ax.axhline(baseline, ls="--", color="gray", label=f"unigram baseline ({baseline:.2f})")
            ax.set_ylabel("loss (nats/token)" if set(losses) <= _NATS_LOSSES else "loss")
            ax.set_title("Training curves")
        elif kind == "routing":
            for name in names:
                color, label = _ROUTING_STYLE[name]
                ax.plot(xs[name], series[name], "o-" if len(series[name]) == 1 else "-", color=color, label=label)
            ax.axhline(1.0, ls=":", color="gray")
            ax.set_ylabel("ratio")
            ax.set_title("Routing health (mean over MoE layers)")
        else:
            name = names[0]
            style = "o-" if name.startswith(EVAL_PREFIXES) or len(series[name]) == 1 else "-"
            ax.plot(xs[name], series[name], style, label=_curve_label(name))
            ax.set_ylabel(name)
            ax.set_title(_curve_label(name))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if kind != "metric":
            ax.legend()
    return _finish(fig, save_path)


# ---------------------------------------------------------------------------------------
# router bias (aux-loss-free balancing)
# ---------------------------------------------------------------------------------------


def load_router_bias_history(metrics_path: PathLike) -> Dict[int, Dict[str, List[Any]]]:
    """The aux-loss-free balancing bias over training from a trainer's ``metrics.jsonl``:
    ``{layer: {"step": [s, ...], "bias": [[b_0 .. b_E-1], ...]}}`` for each MoE layer whose
    train records carry ``router_bias`` (the trainer logs it when
    ``router_bias_update_rate`` is set); ``{}`` when none does. A step logged twice (a
    resumed run) keeps its last record; unreadable lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    by_step: Dict[int, Dict[int, List[float]]] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "step" not in rec or "eval_loss" in rec:
                continue
            biases = {int(lay["layer"]): [float(b) for b in lay["router_bias"]]
                      for lay in rec.get("moe_layers") or [] if lay.get("router_bias") is not None}
            if biases:
                by_step[int(rec["step"])] = biases
    out: Dict[int, Dict[str, List[Any]]] = {}
    for step in sorted(by_step):
        for layer, bias_E in by_step[step].items():
            entry = out.setdefault(layer, {"step": [], "bias": []})
            entry["step"].append(step)
            entry["bias"].append(bias_E)
    return dict(sorted(out.items()))


def plot_router_bias(history: Mapping[Any, Mapping[str, Any]], save_path: Optional[PathLike] = None) -> Any:
    """The per-expert router bias against step, one panel per MoE layer, one line per expert
    (the aux-loss-free balancing bias: it rises for under-loaded experts, falls for
    over-loaded ones).

    Args:
        history: ``{layer: {"step": [steps], "bias": [[per-expert bias] per step]}}`` as
            :func:`load_router_bias_history` returns it.
        save_path: PNG path; None returns the figure.

    Raises:
        InputError: ``history`` is empty or not shaped like that (the message names the layer).
    """
    if not isinstance(history, Mapping) or not history:
        raise InputError("router bias history is empty; expected {layer: {'step': [...], 'bias': [[...], ...]}} "
                         "(the trainer logs router_bias when model.router_bias_update_rate is set)")
    panels = []
    for layer, entry in history.items():
        if not isinstance(entry, Mapping) or "step" not in entry or "bias" not in entry:
            raise InputError(f"router bias history of layer {layer!r} must have 'step' and 'bias', "
                             f"got {type(entry).__name__} {entry!r:.60}")
        steps = _as_series(entry["step"], f"layer {layer} step")
        bias = _as_matrix(entry["bias"], f"layer {layer} bias")  # [steps, experts]
        if len(steps) != len(bias):
            raise InputError(f"layer {layer!r}: {len(steps)} steps but {len(bias)} bias rows")
        panels.append((layer, steps, bias))
    cols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / cols)
    fig = _new_figure(6.5 * cols, 4.0 * nrows)
    for i, (layer, steps, bias) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        num_experts = len(bias[0])
        for e in range(num_experts):
            ax.plot(steps, [row[e] for row in bias], "o-" if len(steps) == 1 else "-", lw=1.2,
                    color=f"C{e % 10}", label=f"expert {e}")
        ax.axhline(0.0, ls=":", color="gray")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("bias (added to scores for selection)")
        ax.set_title(f"Router bias, layer {layer}")
        ax.grid(alpha=0.3)
        if num_experts <= 16:
            ax.legend(fontsize=7, ncols=2)
    return _finish(fig, save_path)


# ---------------------------------------------------------------------------------------
# expert utilisation
# ---------------------------------------------------------------------------------------


def _utilization_rows(data: Any) -> Dict[str, Tuple[List[str], List[float]]]:
    """``{panel name: (expert tick labels, counts or shares)}`` from any accepted utilisation input."""
    if hasattr(data, "to_dict") and not isinstance(data, Mapping):
        data = data.to_dict()
    if isinstance(data, Mapping) and "layers" in data and isinstance(data["layers"], list):
        rows = {}
        for lay in data["layers"]:
            values = lay.get("expert_counts") or lay.get("expert_fractions")
            if values is None:
                raise InputError(f"utilization layer entry has no 'expert_counts'; keys: {sorted(lay)}")
            name = f"layer {lay.get('layer', len(rows))}"
            rows[name] = _numbered(_flat(values, name))
        if not rows:
            raise InputError("utilization data has no layers")
        return rows
    if isinstance(data, Mapping):
        if not data:
            raise InputError("utilization data is empty; expected {expert_id: share} or {layer: [count per expert]}")
        scalar = [k for k, v in data.items() if _number(v) is not None]
        if len(scalar) == len(data):
            return {"": _single_layer(data)}
        if scalar:
            lists = [k for k in data if k not in scalar]
            raise InputError(
                f"utilization_data mixes per-expert numbers (key {scalar[0]!r}: {data[scalar[0]]!r}) and per-layer "
                f"lists (key {lists[0]!r}); expected {{expert_id: share}} (one layer) or {{layer: [count per expert]}}")
        return {(f"layer {k}" if isinstance(k, int) else str(k)): _numbered(_flat(vals, f"layer {k!r}"))
                for k, vals in data.items()}
    if hasattr(data, "detach"):
        data = data.detach().cpu().double().tolist()
    elif hasattr(data, "tolist"):
        data = data.tolist()
    if isinstance(data, Sequence) and data and all(_number(v) is not None for v in data):
        return {"": _numbered(_flat(data, "utilization_data"))}  # one layer: [count per expert]
    matrix = _as_matrix(data, "utilization_data")
    return {f"MoE layer {i}": _numbered(_flat(row, f"row {i}")) for i, row in enumerate(matrix)}


def _numbered(values: List[float]) -> Tuple[List[str], List[float]]:
    """Tick labels ``0..E-1`` for a list of per-expert values."""
    return [str(i) for i in range(len(values))], values


def _single_layer(data: Mapping[Any, Any]) -> Tuple[List[str], List[float]]:
    """``{expert_id: count or share}`` -> (ids as tick labels, values), sorted by expert id."""
    for k in data:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise InputError(f"utilization_data {{expert_id: share}} needs int expert ids, got {type(k).__name__} {k!r}")
    ids = sorted(data, key=int)
    return [str(int(e)) for e in ids], _flat([data[e] for e in ids], "utilization_data", ids=ids)


def _flat(values: Any, where: str, ids: Optional[Sequence[Any]] = None) -> List[float]:
    """Per-expert counts or shares of ``where`` as floats; each must be a finite number >= 0."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().tolist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise InputError(f"{where}: expected a list of per-expert numbers, got {type(values).__name__}")
    if not values:
        raise InputError(f"{where}: expected a list of per-expert numbers, got an empty list")
    out = []
    for i, v in enumerate(values):
        x = _number(v)
        if x is None or not math.isfinite(x) or x < 0:
            expert = ids[i] if ids is not None else i
            raise InputError(f"{where}: expert {expert} has {v!r}; expected a token count or share (a finite number >= 0)")
        out.append(x)
    return out


def plot_expert_utilization(
    utilization_data: Any,
    save_path: Optional[PathLike] = None,
    title: str = "Expert utilisation (share of routed tokens)",
    overload_factor: float = OVERLOAD_FACTOR,
) -> Any:
    """One bar panel per MoE layer: each expert's share of the layer's routed tokens.

    Values may be token counts or shares: each panel is normalised to sum to 1, so
    ``{0: 50, 1: 25, 3: 25}`` and ``{0: 0.5, 1: 0.25, 3: 0.25}`` draw the same bars. A dashed
    line marks the uniform share ``1/E`` (``E``: the experts drawn); overloaded experts (share
    above ``overload_factor / E``) are red, dead experts (no tokens) get a grey "dead" mark.

    Args:
        utilization_data: ``{expert_id: share or count}`` (one layer; ids need not be
            contiguous and label the bars), a list / 1-D tensor of counts (one layer), a
            :class:`RoutingAnalysis` or :class:`MonitoringStats` (or their ``to_dict()``),
            ``{layer: [count per expert]}``, or a [layers, experts] tensor / nested list of
            counts or fractions.
        save_path: PNG path; None returns the figure.

    Raises:
        InputError: empty data, non-int expert ids, a mix of numbers and lists, or a value that
            is not a finite number >= 0 (the message names the layer and expert).
    """
    rows = _utilization_rows(utilization_data)
    num_layers = len(rows)
    cols = min(num_layers, 4)
    nrows = math.ceil(num_layers / cols)
    num_experts = max(len(v) for _, v in rows.values())
    fig = _new_figure(max(4.2 * cols, 0.35 * num_experts * cols + 1), 3.1 * nrows + 0.4)
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    for ax in axes.flat[num_layers:]:
        ax.set_visible(False)
    for ax, (name, (ids, values)) in zip(axes.flat, rows.items()):
        total = sum(values)
        shares = [v / total if total > 0 else 0.0 for v in values]
        e = len(values)
        uniform = 1.0 / e
        colors = ["tab:red" if s > overload_factor * uniform else "tab:blue" for s in shares]
        ax.bar(range(e), shares, color=colors)
        ax.axhline(uniform, ls="--", color="gray", lw=1, label=f"uniform (1/{e})")
        for i, v in enumerate(values):
            if v == 0:
                ax.text(i, 0.0, "dead", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgray")
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_xticks(range(e))
        ax.set_xticklabels(ids)
        ax.grid(axis="y", alpha=0.3)
    for r in range(nrows):
        axes[r][0].set_ylabel("share of routed tokens")
    from matplotlib.patches import Patch

    handles, names = axes.flat[0].get_legend_handles_labels()
    handles.append(Patch(color="tab:red"))
    names.append(f"overloaded (> {overload_factor:g}x uniform)")
    fig.legend(handles, names, fontsize=8, loc="outside lower center", ncols=2)
    fig.suptitle(title)
    return _finish(fig, save_path)


# ---------------------------------------------------------------------------------------
# routing heatmap
# ---------------------------------------------------------------------------------------


def plot_routing_heatmap(
    heatmap: Any,
    save_path: Optional[PathLike] = None,
    layer_labels: Optional[Sequence[Any]] = None,
    title: str = "Routing heatmap: share of each layer's tokens per expert",
) -> Any:
    """A [MoE layers, experts] matrix of token shares (rows sum to 1), annotated when small.

    Args:
        heatmap: [L, E] tensor or nested list (e.g. ``RoutingAnalysis.heatmap``); a
            :class:`RoutingAnalysis` is accepted too.
        layer_labels: the transformer layer index of each row (default 0..L-1).
        save_path: PNG path; None returns the figure.
    """
    if hasattr(heatmap, "heatmap_matrix"):
        layer_labels = layer_labels if layer_labels is not None else heatmap.moe_layer_indices
        heatmap = heatmap.heatmap_matrix()
    matrix = _as_matrix(heatmap, "heatmap")
    num_layers, num_experts = len(matrix), len(matrix[0])
    labels = list(layer_labels) if layer_labels is not None else list(range(num_layers))
    if len(labels) != num_layers:
        raise InputError(f"layer_labels has {len(labels)} entries but the heatmap has {num_layers} rows")
    fig = _new_figure(min(2.5 + 0.6 * num_experts, 18), min(1.6 + 0.5 * num_layers, 14))
    ax = fig.subplots(1, 1)
    vmax = max(max(r) for r in matrix) or 1.0
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
    if num_layers * num_experts <= 400:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * vmax else "black")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers))
    ax.set_yticklabels([f"layer {l}" for l in labels])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title + (" (numbers: %)" if num_layers * num_experts <= 400 else ""))
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    return _finish(fig, save_path)


# ---------------------------------------------------------------------------------------
# specialisation
# ---------------------------------------------------------------------------------------


def _spec_panels(specialization: Any, labels: Optional[Sequence[Any]]) -> tuple:
    """(panels {title: {expert: {label: share}}}, labels, base rates {label: share} or None)."""
    base = None
    if hasattr(specialization, "by_layer") and hasattr(specialization, "labels"):
        labels = list(labels) if labels is not None else list(specialization.labels)
        base = specialization.label_shares()
        panels = {f"layer {l}": d for l, d in specialization.by_layer().items()}
        return panels, labels, base
    if not isinstance(specialization, Mapping) or not specialization:
        raise InputError(
            "specialization must be {expert_id: {label: share}}, {layer: {expert_id: {label: share}}} "
            f"or a SpecializationAnalysis, got {type(specialization).__name__}"
        )
    first = next(iter(specialization.values()))
    nested = isinstance(first, Mapping) and any(isinstance(v, Mapping) for v in first.values())
    panels = ({f"layer {k}": v for k, v in specialization.items()} if nested
              else {"all MoE layers": specialization})
    if labels is None:
        seen: Dict[Any, None] = {}
        for panel in panels.values():
            for shares in panel.values():
                for label in shares:
                    seen.setdefault(label, None)
        labels = list(seen)
    if not labels:
        raise InputError("specialization has no labels (every expert's dict is empty)")
    return panels, list(labels), base


def plot_specialization(
    specialization: Any,
    save_path: Optional[PathLike] = None,
    labels: Optional[Sequence[Any]] = None,
    title: str = "Expert specialisation: share of each expert's tokens by label",
    max_panels: int = 12,
) -> Any:
    """Experts x labels matrices: cell (e, d) is the share of expert e's routed tokens that
    came from label d (each row sums to 100%). One panel per MoE layer.

    With a :class:`SpecializationAnalysis`, a top row ``all tokens`` shows each label's share
    of all routed tokens: an expert whose row differs from it is specialised. Experts that got
    no tokens show an empty (white) row marked "no tokens".

    Args:
        specialization: ``{expert_id: {label: share}}`` (one panel), ``{layer: {expert_id:
            {label: share}}}`` (a panel per layer) or a :class:`SpecializationAnalysis`.
        labels: label order of the columns (default: order of first appearance).
        save_path: PNG path; None returns the figure.
    """
    import numpy as np

    panels, labels, base = _spec_panels(specialization, labels)
    names = list(panels)[:max_panels]
    num_experts = max(
        (max((int(e) for e in panels[n]), default=-1) + 1 for n in names), default=0
    )
    if num_experts == 0:
        raise InputError("specialization has no experts")
    num_labels = len(labels)
    cols = min(len(names), 2 if len(names) <= 4 else 3)
    nrows = math.ceil(len(names) / cols)
    extra = 1 if base is not None else 0
    fig = _new_figure(max(3.0 + 0.85 * num_labels, 4.0) * cols, (1.4 + 0.34 * (num_experts + extra)) * nrows + 0.5)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    im = None
    for ax, name in zip(axes.flat, names):
        panel = {int(e): v for e, v in panels[name].items()}
        m = np.full((num_experts + extra, num_labels), np.nan)
        if base is not None:
            m[0] = [base.get(l, 0.0) for l in labels]
        for e in range(num_experts):
            shares = panel.get(e) or {}
            if shares:
                m[e + extra] = [shares.get(l, 0.0) for l in labels]
        im = ax.imshow(m, aspect="auto", cmap="magma_r", vmin=0.0, vmax=1.0)
        for i in range(m.shape[0]):
            for j in range(num_labels):
                v = m[i, j]
                if not np.isnan(v):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.55 else "black")
            if np.isnan(m[i]).all():
                ax.text((num_labels - 1) / 2, i, "no tokens", ha="center", va="center", fontsize=7, color="gray")
        if base is not None:
            ax.axhline(0.5, color="tab:blue", lw=2)
        ax.set_xticks(range(num_labels))
        ax.set_xticklabels([str(l) for l in labels], rotation=30, ha="right")
        ax.set_yticks(range(num_experts + extra))
        ax.set_yticklabels((["all tokens"] if base is not None else []) + [f"expert {e}" for e in range(num_experts)])
        ax.set_title(name)
        ax.set_xlabel("label")
    if im is not None:
        fig.colorbar(im, ax=axes, label="share of the expert's tokens", shrink=0.6)
    fig.suptitle(title + " (numbers: %)")
    return _finish(fig, save_path)


# ---------------------------------------------------------------------------------------
# the facade
# ---------------------------------------------------------------------------------------


class TrainingVisualizer:
    """All moe_lab plots behind one object (PNG via the Agg canvas; no pyplot state).

    Every method takes ``save_path=None``: with a path it writes a PNG and returns the path,
    without one it returns the :class:`matplotlib.figure.Figure`.

    Args:
        dpi: resolution of saved PNGs.
    """

    def __init__(self, dpi: int = DPI) -> None:
        if not isinstance(dpi, int) or dpi < 10:
            raise InputError(f"dpi must be an int >= 10, got {dpi!r}")
        self.dpi = dpi

    def _save(self, fig: Any, save_path: Optional[PathLike]) -> Any:
        if save_path is None:
            return fig
        path = Path(save_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=self.dpi, format="png", bbox_inches="tight")
        return str(save_path)

    @staticmethod
    def load_history(metrics_path: PathLike) -> Dict[str, List[float]]:
        """``metrics.jsonl`` -> history dict (see :func:`load_metrics_history`)."""
        return load_metrics_history(metrics_path)

    def plot_training_curves(
        self, history: Any, save_path: Optional[PathLike] = None, baseline: Optional[float] = None
    ) -> Any:
        """Loss panel + a panel per other metric; ``history``: ``{name: [numbers]}`` or a metrics.jsonl path."""
        if isinstance(history, (str, os.PathLike)):
            history = load_metrics_history(history)
        return self._save(plot_training_curves(history, None, baseline=baseline), save_path)

    def plot_router_bias(self, history: Any, save_path: Optional[PathLike] = None) -> Any:
        """Per-expert router bias against step, a panel per MoE layer; ``history``: a
        metrics.jsonl path or :func:`load_router_bias_history`'s dict."""
        if isinstance(history, (str, os.PathLike)):
            history = load_router_bias_history(history)
        return self._save(plot_router_bias(history, None), save_path)

    def plot_expert_utilization(self, utilization_data: Any, save_path: Optional[PathLike] = None, **kwargs: Any) -> Any:
        """Share of routed tokens per expert, a panel per layer; ``{expert_id: share}`` is one layer."""
        return self._save(plot_expert_utilization(utilization_data, None, **kwargs), save_path)

    def plot_routing_heatmap(self, heatmap: Any, save_path: Optional[PathLike] = None, **kwargs: Any) -> Any:
        """[MoE layers, experts] token shares (see :func:`plot_routing_heatmap`)."""
        return self._save(plot_routing_heatmap(heatmap, None, **kwargs), save_path)

    def plot_specialization(self, specialization: Any, save_path: Optional[PathLike] = None, **kwargs: Any) -> Any:
        """Experts x labels share matrices (see :func:`plot_specialization`)."""
        return self._save(plot_specialization(specialization, None, **kwargs), save_path)
