"""Prometheus metrics of one serving replica (prometheus_client; no Ray, no FastAPI).

    metrics = ServeMetrics(engine_stats=lambda: engine.stats(), cache_stats=loader.stats)
    metrics.observe(req)                  # once per finished engine request
    body, content_type = metrics.render() # the text of GET /metrics

Each replica has its own registry, so one scrape of ``/metrics`` reads the replica that
answered it (with several replicas, scrape each one, or read Ray Serve's own request metrics
from Ray's metrics endpoint, which aggregates them). Names:

- ``moe_lab_time_to_first_token_seconds`` (histogram): submit to first generated token;
- ``moe_lab_inter_token_latency_seconds`` (histogram): per request, the mean time between
  its generated tokens (first to last);
- ``moe_lab_request_duration_seconds`` (histogram): submit to finish;
- ``moe_lab_requests_finished_total{finish_reason}`` (counter): stop, length or cancelled;
- ``moe_lab_queue_depth``, ``moe_lab_running_requests``, ``moe_lab_prefilling_requests``
  (gauges): the engine's waiting, decoding and prefilling requests now;
- ``moe_lab_mean_batch_size`` (gauge): running requests per decode step since start-up;
- ``moe_lab_generated_tokens_total`` (counter; tokens/s is ``rate()`` of it) and
  ``moe_lab_prompt_tokens_total`` (counter: prefilled tokens);
- ``moe_lab_expert_cache_hits_total``, ``..._misses_total`` (counters) and
  ``moe_lab_expert_cache_hit_rate`` (gauge, since start-up).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: latency buckets in seconds: 1 ms to 30 s
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector(Collector):
    """Reads the engine's and the expert cache's counters at scrape time."""

    def __init__(self, engine_stats: Callable[[], Mapping[str, Any]],
                 cache_stats: Callable[[], Mapping[str, Any]]) -> None:
        self.engine_stats, self.cache_stats = engine_stats, cache_stats

    def collect(self) -> Iterator[Metric]:
        e: Mapping[str, Any] = self.engine_stats()
        c: Mapping[str, Any] = self.cache_stats()
        gauges = (("queue_depth", "requests waiting for a slot", e.get("waiting", 0)),
                  ("running_requests", "requests decoding now", e.get("running", 0)),
                  ("prefilling_requests", "requests prefilling now", e.get("prefilling", 0)),
                  ("mean_batch_size", "running requests per decode step since start-up", e.get("mean_batch", 0.0)),
                  ("expert_cache_hit_rate", "expert-cache hits / lookups since start-up", c.get("hit_rate", 0.0)))
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"moe_lab_{name}", doc, value=float(value))
        counters = (("generated_tokens", "tokens generated", e.get("generated_tokens", 0)),
                    ("prompt_tokens", "prompt tokens prefilled", e.get("prefill_tokens", 0)),
                    ("expert_cache_hits", "expert-cache hits", c.get("hits", 0)),
                    ("expert_cache_misses", "expert-cache misses", c.get("misses", 0)))
        for name, doc, value in counters:
            yield CounterMetricFamily(f"moe_lab_{name}", doc, value=float(value))


class ServeMetrics:
    """The metrics of one replica: latency histograms fed by :meth:`observe`, and the
    engine's and expert cache's counters read at each scrape."""

    def __init__(self, engine_stats: Callable[[], Mapping[str, Any]],
                 cache_stats: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("moe_lab_time_to_first_token_seconds", "submit to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("moe_lab_inter_token_latency_seconds",
                             "mean time between a request's generated tokens", buckets=LATENCY_BUCKETS,
                             registry=self.registry)
        self.duration = Histogram("moe_lab_request_duration_seconds", "submit to finish", buckets=LATENCY_BUCKETS,
                                  registry=self.registry)
        self.finished = Counter("moe_lab_requests_finished", "engine requests finished", ["finish_reason"],
                                registry=self.registry)
        self.registry.register(_EngineCollector(engine_stats, cache_stats))

    def observe(self, req: Any) -> None:
        """Record a finished engine request (its ``submitted_at``, ``first_token_at``,
        ``finished_at``, ``num_generated`` and ``finish_reason``)."""
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.submitted_at)
            if req.num_generated > 1 and req.finished_at is not None:
                self.itl.observe((req.finished_at - req.first_token_at) / (req.num_generated - 1))
        if req.finished_at is not None:
            self.duration.observe(req.finished_at - req.submitted_at)
        self.finished.labels(finish_reason=req.finish_reason or "unknown").inc()

    def render(self) -> Tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def parse_metrics(text: str) -> Dict[str, float]:
    """``{sample name with labels: value}`` of a Prometheus text exposition (for tests and
    tools; uses prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
