import matplotlib.image
import pytest
import torch
from matplotlib.figure import Figure

from moe_lab import InputError, TrainingVisualizer
from moe_lab.analytics import (
    load_metrics_history,
    plot_expert_utilization,
    plot_routing_heatmap,
    plot_specialization,
    plot_training_curves,
)
from moe_lab.analytics.monitor import LayerMonitorStats, MonitoringStats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HISTORY = {"step": [1, 2, 3, 4], "loss": [4.0, 3.0, 2.5, 2.2], "eval_step": [2, 4], "eval_loss": [3.1, 2.4],
           "load_imbalance": [1.8, 1.5, 1.3, 1.2], "dropped_fraction": [0.1, 0.05, 0.0, 0.0]}
COUNTS = [[10, 0, 30, 60], [25, 25, 25, 25]]
SPEC = {0: {"code": 0.8, "dna": 0.2}, 1: {"code": 0.1, "dna": 0.9}, 2: {}}


def _assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _monitor_stats():
    layers = [LayerMonitorStats(l, 1, 25, c, [x / sum(c) for x in c], 1.0, 0.0, [], 0.0) for l, c in enumerate(COUNTS)]
    return MonitoringStats(layers, True, None, 1.0, 1, 25, 0.0)


@pytest.mark.parametrize(
    "fn,data",
    [
        (plot_training_curves, HISTORY),
        (plot_training_curves, {"loss": [3.0, 2.0]}),
        (plot_expert_utilization, COUNTS),
        (plot_expert_utilization, {0: COUNTS[0], 2: COUNTS[1]}),
        (plot_expert_utilization, torch.tensor(COUNTS)),
        (plot_expert_utilization, _monitor_stats()),
        (plot_routing_heatmap, torch.tensor(COUNTS, dtype=torch.float) / 100),
        (plot_specialization, SPEC),
        (plot_specialization, {1: SPEC, 3: SPEC}),
    ],
)
def test_every_plot_writes_a_png_and_returns_a_figure(tmp_path, fn, data):
    path = tmp_path / "sub" / "plot.png"
    assert fn(data, save_path=str(path)) == str(path)
    _assert_png(path)
    fig = fn(data)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
    assert any(titles)
    assert any(ax.get_xlabel() for ax in fig.axes)


def test_visualizer_methods(tmp_path):
    viz = TrainingVisualizer(dpi=60)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        '{"step": 1, "loss": 3.0, "lr": 0.1, "moe_layers": [{"load_imbalance_max_mean": 2.0, "dropped_fraction": 0.0}]}\n'
        "not json\n"
        '{"step": 1, "eval_loss": 2.9}\n'
        '{"step": 2, "loss": 2.0, "lr": 0.1, "moe_layers": [{"load_imbalance_max_mean": 1.0, "dropped_fraction": 0.5}]}\n'
    )
    history = load_metrics_history(metrics)
    assert history == {"step": [1, 2], "loss": [3.0, 2.0], "lr": [0.1, 0.1], "load_imbalance": [2.0, 1.0],
                       "dropped_fraction": [0.0, 0.5], "eval_step": [1], "eval_loss": [2.9]}
    outs = [
        viz.plot_training_curves(metrics, tmp_path / "a.png", baseline=3.5),
        viz.plot_expert_utilization(COUNTS, tmp_path / "b.png"),
        viz.plot_routing_heatmap(torch.tensor(COUNTS) / 100.0, tmp_path / "c.png", layer_labels=[1, 3]),
        viz.plot_specialization(SPEC, tmp_path / "d.png", labels=["dna", "code"]),
    ]
    for p in outs:
        _assert_png(p)
    assert isinstance(viz.plot_routing_heatmap(COUNTS), Figure)


def test_bad_plot_inputs():
    with pytest.raises(InputError, match="no 'loss'"):
        plot_training_curves({"step": [1]})
    with pytest.raises(InputError, match="rectangular"):
        plot_routing_heatmap([[0.1, 0.2], [0.3]])
    with pytest.raises(InputError, match="empty"):
        plot_expert_utilization({})
    with pytest.raises(InputError, match="specialization"):
        plot_specialization([])
    with pytest.raises(InputError, match="layer_labels"):
        plot_routing_heatmap(COUNTS, layer_labels=[0])
