"""Matplotlib plots for training and routing (Agg canvas, PNG output).

    from moe_lab.analytics import TrainingVisualizer
    viz = TrainingVisualizer()
    viz.plot_training_curves(history, save_path="curves.png")        # loss (+ routing health)
    viz.plot_expert_utilization(analysis, save_path="util.png")      # share of tokens per expert
    viz.plot_routing_heatmap(analysis.heatmap, save_path="heat.png")  # [MoE layers, experts]
    viz.plot_specialization(spec, save_path="spec.png")              # experts x labels
    fig = viz.plot_routing_heatmap(analysis.heatmap)                   # no save_path: the Figure

Each function takes plain data (or the dataclasses of :mod:`moe_lab.analytics`), draws one
figure with a title and labelled axes, and either saves it as PNG to ``save_path``
(returning the path as a string) or returns the :class:`matplotlib.figure.Figure`.

Figures are built with the object API on an Agg canvas, never through ``pyplot``: nothing
here changes the process-wide matplotlib backend or keeps figures alive in pyplot's registry,
so the functions are safe in notebooks, servers and threads. matplotlib is imported on first
use, so ``import moe_lab`` stays light.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

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
    except TypeError:
        raise InputError(f"{name} must be 2-D (rows of numbers), got {type(data).__name__}") from None
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


def plot_training_curves(
    history: Dict[str, List[float]], save_path: Optional[str] = None, baseline: Optional[float] = None
) -> Any:
    """Train (and eval) loss against step; optional horizontal baseline (e.g. unigram entropy).

    ``history`` holds lists: ``step`` + ``loss`` (+ ``eval_step`` + ``eval_loss``,
    ``load_imbalance``, ``dropped_fraction``, ``lr``). With ``load_imbalance`` a second panel
    shows routing health. :func:`load_metrics_history` builds it from ``metrics.jsonl``.
    """
    if not isinstance(history, Mapping):
        raise InputError(f"history must be a dict of lists (step, loss, ...), got {type(history).__name__}")
    if not history.get("loss") and not history.get("eval_loss"):
        raise InputError(f"history has no 'loss' or 'eval_loss' values; its keys are {sorted(history)}")
    steps = history.get("step") or list(range(1, len(history.get("loss", [])) + 1))
    has_routing = bool(history.get("load_imbalance"))
    fig = _new_figure(11 if has_routing else 6.5, 4.2)
    axes = fig.subplots(1, 2) if has_routing else [fig.subplots(1, 1)]
    ax = axes[0]
    if history.get("loss"):
        ax.plot(steps, history["loss"], label="train loss", color="tab:blue")
    if history.get("eval_loss"):
        ax.plot(history.get("eval_step", steps[: len(history["eval_loss"])]), history["eval_loss"], "o-",
                label="eval loss", color="tab:orange")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_routing:
        ax2 = axes[1]
        ax2.plot(steps[: len(history["load_imbalance"])], history["load_imbalance"], color="tab:red",
                 label="expert load max/mean")
        if history.get("dropped_fraction"):
            ax2.plot(steps[: len(history["dropped_fraction"])], history["dropped_fraction"], color="tab:purple",
                     label="dropped fraction")
        ax2.axhline(1.0, ls=":", color="gray")
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("ratio")
        ax2.set_title("Routing health (mean over MoE layers)")
        ax2.grid(alpha=0.3)
        ax2.legend()
    return _finish(fig, save_path)


# ---------------------------------------------------------------------------------------
# expert utilisation
# ---------------------------------------------------------------------------------------


def _utilization_rows(data: Any) -> Dict[str, List[float]]:
    """``{layer name: expert counts or fractions}`` from any accepted utilisation input."""
    if hasattr(data, "to_dict") and not isinstance(data, Mapping):
        data = data.to_dict()
    if isinstance(data, Mapping) and "layers" in data and isinstance(data["layers"], list):
        rows = {}
        for lay in data["layers"]:
            values = lay.get("expert_counts") or lay.get("expert_fractions")
            if values is None:
                raise InputError(f"utilization layer entry has no 'expert_counts'; keys: {sorted(lay)}")
            rows[f"layer {lay.get('layer', len(rows))}"] = [float(v) for v in values]
        if not rows:
            raise InputError("utilization data has no layers")
        return rows
    if isinstance(data, Mapping):
        if not data:
            raise InputError("utilization data is empty")
        return {(f"layer {k}" if isinstance(k, int) else str(k)): [float(v) for v in _flat(vals)]
                for k, vals in data.items()}
    matrix = _as_matrix(data, "utilization_data")
    return {f"MoE layer {i}": row for i, row in enumerate(matrix)}


def _flat(values: Any) -> List[float]:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().tolist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise InputError(f"expected a list of per-expert numbers, got {type(values).__name__}")
    return [float(v) for v in values]


def plot_expert_utilization(
    utilization_data: Any,
    save_path: Optional[PathLike] = None,
    title: str = "Expert utilisation (share of routed tokens)",
    overload_factor: float = OVERLOAD_FACTOR,
) -> Any:
    """One bar panel per MoE layer: each expert's share of the layer's routed tokens.

    A dashed line marks the uniform share ``1/E``; overloaded experts (share above
    ``overload_factor / E``) are red, dead experts (no tokens) get a grey "dead" mark.

    Args:
        utilization_data: a :class:`RoutingAnalysis` or :class:`MonitoringStats` (or their
            ``to_dict()``), ``{layer: [count per expert]}``, or a [layers, experts] tensor /
            nested list of counts or fractions (each row is normalised).
        save_path: PNG path; None returns the figure.
    """
    rows = _utilization_rows(utilization_data)
    num_layers = len(rows)
    cols = min(num_layers, 4)
    nrows = math.ceil(num_layers / cols)
    num_experts = max(len(v) for v in rows.values())
    fig = _new_figure(max(4.2 * cols, 0.35 * num_experts * cols + 1), 3.1 * nrows + 0.4)
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    for ax in axes.flat[num_layers:]:
        ax.set_visible(False)
    for ax, (name, values) in zip(axes.flat, rows.items()):
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
        """Loss curves (+ routing health). ``history``: dict of lists or a metrics.jsonl path."""
        if isinstance(history, (str, os.PathLike)):
            history = load_metrics_history(history)
        return self._save(plot_training_curves(history, None, baseline=baseline), save_path)

    def plot_expert_utilization(self, utilization_data: Any, save_path: Optional[PathLike] = None, **kwargs: Any) -> Any:
        """Share of routed tokens per expert, one panel per layer (see :func:`plot_expert_utilization`)."""
        return self._save(plot_expert_utilization(utilization_data, None, **kwargs), save_path)

    def plot_routing_heatmap(self, heatmap: Any, save_path: Optional[PathLike] = None, **kwargs: Any) -> Any:
        """[MoE layers, experts] token shares (see :func:`plot_routing_heatmap`)."""
        return self._save(plot_routing_heatmap(heatmap, None, **kwargs), save_path)

    def plot_specialization(self, specialization: Any, save_path: Optional[PathLike] = None, **kwargs: Any) -> Any:
        """Experts x labels share matrices (see :func:`plot_specialization`)."""
        return self._save(plot_specialization(specialization, None, **kwargs), save_path)
