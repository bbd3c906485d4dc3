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


# --- training curves: any {name: [numbers]} ----------------------------------------------


def _axis(fig, title):
    axes = [ax for ax in fig.axes if ax.get_title() == title]
    assert len(axes) == 1, f"no single axis titled {title!r}: {[ax.get_title() for ax in fig.axes]}"
    return axes[0]


def _lines(ax):
    """{label: (x, y)} of the data lines of ``ax`` (horizontal reference lines left out)."""
    return {l.get_label(): (list(l.get_xdata()), list(l.get_ydata()))
            for l in ax.get_lines() if not l.get_label().startswith(("_", "unigram"))}


def test_training_curves_of_different_lengths_share_the_loss_panel(tmp_path):
    history = {"train_loss": [3.0, 2.5, 2.0], "eval_loss": [2.8, 2.4]}
    path = tmp_path / "curves.png"
    assert plot_training_curves(history, save_path=str(path)) == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert TrainingVisualizer(dpi=60).plot_training_curves(history, tmp_path / "v.png") == str(tmp_path / "v.png")
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
    fig = plot_training_curves(history)
    assert len(fig.axes) == 1
    lines = _lines(_axis(fig, "Training curves"))
    assert sorted(lines) == ["eval loss", "train loss"]
    assert lines["train loss"] == ([0, 1, 2], [3.0, 2.5, 2.0])
    # no step keys: the shorter series is spread over the same range (first and last points aligned)
    assert lines["eval loss"] == ([0, 2], [2.8, 2.4])


def test_every_loss_named_series_shares_one_panel_and_other_metrics_get_their_own():
    history = {"step": [10, 20, 30, 40], "loss": [4.0, 3.0, 2.5, 2.2], "lm_loss": [3.9, 2.9, 2.4, 2.1],
               "aux_loss": [0.1, 0.1, 0.1, 0.1], "lr": [1e-3, 1e-3, 5e-4, 1e-4],
               "eval_step": [20, 40], "eval_loss": [3.1, 2.4], "accuracy": [0.1, 0.2, 0.3, 0.4]}
    fig = plot_training_curves(history)
    assert sorted(ax.get_title() for ax in fig.axes) == ["Training curves", "accuracy", "lr"]
    lines = _lines(_axis(fig, "Training curves"))
    assert sorted(lines) == ["aux loss", "eval loss", "lm loss", "train loss"]  # step keys are not curves
    assert lines["aux loss"] == ([10, 20, 30, 40], history["aux_loss"])
    assert lines["eval loss"] == ([20, 40], history["eval_loss"])  # eval_* against eval_step
    assert _lines(_axis(fig, "accuracy")) == {"accuracy": ([10, 20, 30, 40], history["accuracy"])}
    assert _lines(_axis(fig, "lr")) == {"lr": ([10, 20, 30, 40], history["lr"])}


def test_unknown_metric_alone_gets_its_own_axis():
    fig = plot_training_curves({"accuracy": [0.5, 0.6, 0.7]})
    assert len(fig.axes) == 1
    assert _lines(_axis(fig, "accuracy")) == {"accuracy": ([0, 1, 2], [0.5, 0.6, 0.7])}
    assert fig.axes[0].get_ylabel() == "accuracy"


def test_eval_series_without_eval_step_is_spread_over_the_train_steps():
    fig = plot_training_curves({"step": [10, 20, 30], "loss": [3.0, 2.0, 1.5], "eval_loss": [2.5, 1.8],
                                "grad_norm": [1.0, 0.5]})  # grad_norm: 2 values for 3 steps
    lines = _lines(_axis(fig, "Training curves"))
    assert lines["train loss"] == ([10, 20, 30], [3.0, 2.0, 1.5])
    assert lines["eval loss"] == ([10, 30], [2.5, 1.8])  # not the first two train steps
    assert _lines(_axis(fig, "grad norm")) == {"grad norm": ([10, 30], [1.0, 0.5])}


def test_metrics_jsonl_history_keeps_its_loss_and_routing_panels():
    fig = plot_training_curves(HISTORY, baseline=3.5)
    assert sorted(ax.get_title() for ax in fig.axes) == ["Routing health (mean over MoE layers)", "Training curves"]
    loss_ax = _axis(fig, "Training curves")
    assert _lines(loss_ax) == {"train loss": ([1, 2, 3, 4], HISTORY["loss"]),
                               "eval loss": ([2, 4], HISTORY["eval_loss"])}
    assert any(l.get_label() == "unigram baseline (3.50)" for l in loss_ax.get_lines())
    assert loss_ax.get_xlabel() == "optimizer step"
    assert _lines(_axis(fig, "Routing health (mean over MoE layers)")) == {
        "expert load max/mean": ([1, 2, 3, 4], HISTORY["load_imbalance"]),
        "dropped fraction": ([1, 2, 3, 4], HISTORY["dropped_fraction"]),
    }


@pytest.mark.parametrize(
    "history,kwargs,match",
    [
        ({}, {}, "empty"),
        ([3.0, 2.0], {}, "dict"),
        ({"loss": "abc"}, {}, r"history\['loss'\] must be a list of numbers, got str"),
        ({"accuracy": 0.9}, {}, r"history\['accuracy'\] must be a list of numbers, got float"),
        ({"loss": [3.0, "nan?"]}, {}, r"history\['loss'\].*item 1 is str"),
        ({"step": ["a"], "loss": [1.0]}, {}, r"history\['step'\]"),
        ({1: [1.0]}, {}, "metric names"),
        ({"loss": []}, {}, "no 'loss'"),
        ({"loss": [1.0, 2.0]}, {"baseline": "low"}, "baseline must be a number"),
    ],
)
def test_bad_history_raises_input_error_naming_the_key(history, kwargs, match):
    with pytest.raises(InputError, match=match):
        plot_training_curves(history, **kwargs)


# --- expert utilisation: {expert_id: share} -----------------------------------------------


def _bar_panels(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def _bars(ax):
    return [p.get_height() for p in ax.patches], [t.get_text() for t in ax.get_xticklabels()]


def test_utilization_dict_of_expert_shares_is_one_layer_labelled_by_id(tmp_path):
    data = {0: 0.5, 1: 0.25, 3: 0.25}
    path = tmp_path / "util.png"
    assert TrainingVisualizer(dpi=60).plot_expert_utilization(data, path) == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    fig = plot_expert_utilization(data)
    (ax,) = _bar_panels(fig)
    heights, ticks = _bars(ax)
    assert heights == pytest.approx([0.5, 0.25, 0.25])
    assert ticks == ["0", "1", "3"]
    uniform = [l.get_ydata()[0] for l in ax.get_lines()]
    assert uniform == pytest.approx([1 / 3])


def test_utilization_counts_are_normalised_and_sorted_by_expert_id():
    heights, ticks = _bars(_bar_panels(plot_expert_utilization({7: 20, 0: 50, 3: 30}))[0])
    assert ticks == ["0", "3", "7"]
    assert heights == pytest.approx([0.5, 0.3, 0.2])
    heights, _ = _bars(_bar_panels(plot_expert_utilization({0: torch.tensor(3.0), 1: torch.tensor(1.0)}))[0])
    assert heights == pytest.approx([0.75, 0.25])


def test_utilization_per_layer_forms_still_give_one_panel_per_layer():
    for data in (COUNTS, torch.tensor(COUNTS), {0: COUNTS[0], 2: COUNTS[1]}, _monitor_stats()):
        panels = _bar_panels(plot_expert_utilization(data))
        assert len(panels) == 2
        heights, ticks = _bars(panels[0])
        assert heights == pytest.approx([0.1, 0.0, 0.3, 0.6]) and ticks == ["0", "1", "2", "3"]
    assert [ax.get_title() for ax in _bar_panels(plot_expert_utilization({0: COUNTS[0], 2: COUNTS[1]}))] == \
        ["layer 0", "layer 2"]


@pytest.mark.parametrize(
    "data,match",
    [
        ({0: 0.5, 1: [1, 2]}, "mixes per-expert numbers"),
        ({"a": 0.5, "b": 0.5}, "int expert ids, got str 'a'"),
        ({0: 0.5, 2: -0.1}, "expert 2 has -0.1"),
        ({0: [1, "x"]}, "layer 0: expert 1 has 'x'"),
        ({0: []}, "empty list"),
    ],
)
def test_bad_utilization_raises_input_error_naming_the_expert(data, match):
    with pytest.raises(InputError, match=match):
        plot_expert_utilization(data)


# ---------------------------------------------------------------------------------------
# router bias (aux-loss-free balancing)
# ---------------------------------------------------------------------------------------


def _bias_metrics(path):
    """A trainer-shaped metrics.jsonl: layer 1 carries router_bias, layer 3 does not; step 4 is
    logged twice (a resumed run) and there is an eval record and a broken line."""
    import json

    def rec(step, b):
        return {"step": step, "loss": 3.0, "moe_layers": [
            {"layer": 1, "load_imbalance_max_mean": 1.2, "dropped_fraction": 0.0, "router_bias": b},
            {"layer": 3, "load_imbalance_max_mean": 1.1, "dropped_fraction": 0.0}]}

    lines = [rec(2, [0.01, -0.01, 0.01]), {"step": 2, "eval_loss": 3.1, "eval_perplexity": 22.0},
             rec(4, [0.0, 0.0, 0.0]), rec(4, [0.02, -0.02, 0.0]), rec(6, [0.03, -0.01, -0.02])]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{broken\n", encoding="utf-8")
    return path


def test_router_bias_history_reads_each_layers_bias_per_step(tmp_path):
    from moe_lab.analytics import load_router_bias_history

    history = load_router_bias_history(_bias_metrics(tmp_path / "metrics.jsonl"))
    assert list(history) == [1]  # layer 3 has no bias
    assert history[1]["step"] == [2, 4, 6]
    assert history[1]["bias"] == [[0.01, -0.01, 0.01], [0.02, -0.02, 0.0], [0.03, -0.01, -0.02]]  # last record of 4
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"step": 1, "loss": 3.0, "moe_layers": [{"layer": 0, "load_imbalance_max_mean": 1.0, '
                     '"dropped_fraction": 0.0}]}\n')
    assert load_router_bias_history(plain) == {}


def test_router_bias_plot_has_one_panel_per_layer_and_one_line_per_expert(tmp_path):
    from moe_lab.analytics import load_router_bias_history, plot_router_bias

    history = load_router_bias_history(_bias_metrics(tmp_path / "metrics.jsonl"))
    history[5] = {"step": [2, 4], "bias": [[0.0, 0.1, -0.1], [0.1, 0.0, -0.1]]}
    fig = plot_router_bias(history)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.get_title() == "Router bias, layer 1"
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("expert")]
    assert [ln.get_label() for ln in lines] == ["expert 0", "expert 1", "expert 2"]
    assert list(lines[1].get_xdata()) == [2, 4, 6] and list(lines[1].get_ydata()) == [-0.01, -0.02, -0.01]
    path = TrainingVisualizer().plot_router_bias(tmp_path / "metrics.jsonl", save_path=tmp_path / "bias.png")
    _assert_png(path)


@pytest.mark.parametrize("history,match", [
    ({}, r"router bias history is empty.*router_bias_update_rate"),
    ({0: {"step": [1, 2]}}, r"layer 0 must have 'step' and 'bias'"),
    ({0: {"step": [1, 2], "bias": [[0.0, 0.1]]}}, r"layer 0: 2 steps but 1 bias rows"),
    ({2: {"step": [1], "bias": [[0.0], [0.1, 0.2]]}}, r"layer 2 bias must be a non-empty rectangular"),
])
def test_bad_router_bias_history_names_the_layer(history, match):
    from moe_lab.analytics import plot_router_bias

    with pytest.raises(InputError, match=match):
        plot_router_bias(history)
