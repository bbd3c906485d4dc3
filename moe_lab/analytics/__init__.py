"""Router analytics, live expert monitoring and plots (pure PyTorch + matplotlib, no Ray).

    from moe_lab.analytics import RouterAnalyzer, ExpertMonitor, TrainingVisualizer, write_report

    analysis = RouterAnalyzer(model).analyze_routing(ids, return_heatmap=True)   # per-layer stats
    spec = RouterAnalyzer(model).compute_expert_specialization(eval_ds)          # {expert: {domain: share}}
    with ExpertMonitor(model) as monitor: ...                                    # live load, thread-safe
    TrainingVisualizer().plot_routing_heatmap(analysis.heatmap, "heat.png")
    write_report("outputs/demo/model", "outputs/demo")                            # report.html

See :mod:`moe_lab.analytics.router_analyzer`, :mod:`moe_lab.analytics.monitor`,
:mod:`moe_lab.analytics.plots` and :mod:`moe_lab.analytics.report` for the definitions.
"""

from .monitor import ExpertMonitor, LayerMonitorStats, MonitoringStats
from .plots import (
    TrainingVisualizer,
    load_metrics_history,
    load_router_bias_history,
    plot_expert_utilization,
    plot_router_bias,
    plot_routing_heatmap,
    plot_specialization,
    plot_training_curves,
)
from .report import write_report
from .router_analyzer import (
    LayerRoutingStats,
    RouterAnalyzer,
    RoutingAnalysis,
    SpecializationAnalysis,
)

__all__ = [
    "ExpertMonitor",
    "LayerMonitorStats",
    "LayerRoutingStats",
    "MonitoringStats",
    "RouterAnalyzer",
    "RoutingAnalysis",
    "SpecializationAnalysis",
    "TrainingVisualizer",
    "load_metrics_history",
    "load_router_bias_history",
    "plot_expert_utilization",
    "plot_router_bias",
    "plot_routing_heatmap",
    "plot_specialization",
    "plot_training_curves",
    "write_report",
]
