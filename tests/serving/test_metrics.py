"""A replica's Prometheus metrics without Ray: real engine requests, the text format parsed back."""

import torch

from moe_lab import MoEModel
from moe_lab.inference.engine import InferenceEngine, SamplingParams
from moe_lab.serving.metrics import ServeMetrics, parse_metrics


def test_metrics_from_real_engine_requests():
    torch.manual_seed(0)
    model = MoEModel(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     experts_per_token=2, expert_hidden_size=32, max_position_embeddings=64, dropout=0.0)
    engine = InferenceEngine(model, max_batch_size=2)
    cache = {"hits": 6, "misses": 2, "hit_rate": 0.75}
    metrics = ServeMetrics(engine.stats, lambda: cache)
    done = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=5, temperature=0))
    waiting = engine.submit([7], SamplingParams(max_new_tokens=3))  # queued, never stepped
    engine.cancel(done[0])  # already finished: no effect
    for req in done:
        metrics.observe(req)
    m = parse_metrics(metrics.render()[0].decode())
    assert m["moe_lab_time_to_first_token_seconds_count"] == 2
    assert m["moe_lab_inter_token_latency_seconds_count"] == 2  # both made more than one token
    assert 0 < m["moe_lab_time_to_first_token_seconds_sum"] < m["moe_lab_request_duration_seconds_sum"]
    assert m['moe_lab_requests_finished_total{finish_reason="length"}'] == 2
    assert m["moe_lab_generated_tokens_total"] == 10 and m["moe_lab_prompt_tokens_total"] == 5
    assert m["moe_lab_queue_depth"] == 1 and m["moe_lab_running_requests"] == 0
    assert m["moe_lab_mean_batch_size"] > 1  # the two requests decoded together
    assert (m["moe_lab_expert_cache_hit_rate"], m["moe_lab_expert_cache_hits_total"],
            m["moe_lab_expert_cache_misses_total"]) == (0.75, 6, 2)
    engine.cancel(waiting)
    engine.run_until_done([waiting])
    metrics.observe(waiting)
    m = parse_metrics(metrics.render()[0].decode())
    assert m['moe_lab_requests_finished_total{finish_reason="cancelled"}'] == 1 and m["moe_lab_queue_depth"] == 0
    assert m["moe_lab_time_to_first_token_seconds_count"] == 2  # a request with no token has no TTFT
