"""Matplotlib plots (Agg backend, PNG output).

Each function takes plain data, draws one figure with readable axes and a title, and either
saves it to ``save_path`` (returning the path) or returns the figure.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finish(fig: Any, save_path: Optional[str]) -> Any:
    fig.tight_layout()
    if save_path is None:
        return fig
    fig.savefig(save_path, dpi=110)
    plt.close(fig)
    return save_path


def plot_training_curves(
    history: Dict[str, List[float]], save_path: Optional[str] = None, baseline: Optional[float] = None
) -> Any:
    """Train (and eval) loss against step; optional horizontal baseline (e.g. unigram entropy).

    ``history`` holds lists: ``step`` + ``loss`` (+ ``eval_step`` + ``eval_loss``,
    ``load_imbalance``, ``lr``).
    """
    steps = history.get("step") or list(range(1, len(history.get("loss", [])) + 1))
    has_routing = bool(history.get("load_imbalance"))
    fig, axes = plt.subplots(1, 2 if has_routing else 1, figsize=(11 if has_routing else 6.5, 4.2))
    ax = axes[0] if has_routing else axes
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
