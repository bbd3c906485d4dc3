import json
import threading

import pytest
import torch
from helpers import tiny_config

from moe_lab import ExpertMonitor, InputError, MoEModel, MonitoringStats
from moe_lab.data import ByteTokenizer


def _model(**kw):
    torch.manual_seed(0)
    return MoEModel.from_config(tiny_config(**kw))


def test_counts_equal_routing_info_in_training():
    model = _model()
    monitor = ExpertMonitor(model)
    assert monitor.get_current_stats().layers[0].dead_experts == []  # no traffic yet: nothing is dead
    monitor.start_monitoring()
    expected = torch.zeros(2, 4, dtype=torch.long)
    tokens = 0
    for seq in (5, 9, 12):
        ids = torch.randint(0, 97, (2, seq))
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 2 :] = 0
        logits, info = model(ids, attention_mask=mask, return_routing_info=True)
        (logits.float().mean() + info["aux_loss"]).backward()  # hooks do not disturb autograd
        expected += info["expert_counts"]
        tokens += int(mask.sum())
    stats = monitor.get_current_stats()
    assert isinstance(stats, MonitoringStats) and stats.monitoring
    assert [l.expert_counts for l in stats.layers] == expected.tolist()
    assert stats.num_tokens == tokens and stats.num_forwards == 3
    assert [l.layer for l in stats.layers] == model.moe_layer_indices
    for lay, c in zip(stats.layers, expected.double()):
        assert lay.expert_fractions == pytest.approx((c / c.sum()).tolist())
        assert lay.load_imbalance == pytest.approx(float(c.max() / c.mean()))
        assert lay.load_cv == pytest.approx(float(c.std(unbiased=False) / c.mean()))
    summary = monitor.stop_monitoring()
    json.dumps(summary)
    assert summary["layers"][0]["expert_counts"] == expected[0].tolist() and summary["monitoring"] is False
    model(torch.randint(0, 97, (1, 4)))  # detached: no longer counted
    assert monitor.get_current_stats().num_forwards == 3


@pytest.mark.parametrize("window_size", [None, 10_000])
def test_concurrent_forwards_from_threads_are_all_counted(rigged, window_size):
    model = rigged.model(experts_per_token=2, num_layers=2)
    tok = ByteTokenizer()
    texts, _ = rigged.rows(8)
    inputs = [torch.tensor([tok.encode(t)[:6]] * (1 + i % 3)) for i, t in enumerate(texts)]  # [b, 6]
    expected = torch.zeros(2, 4, dtype=torch.long)
    with torch.no_grad():
        for ids in inputs:
            expected += model(ids, return_routing_info=True)[1]["expert_counts"]
    rounds = 6
    monitor = ExpertMonitor(model, window_size=window_size).start_monitoring()
    errors = []
    stop = threading.Event()

    def work(ids):
        try:
            with torch.no_grad():
                for _ in range(rounds):
                    model(ids)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def read():
        while not stop.is_set():
            try:
                monitor.get_current_stats().to_dict()
            except Exception as exc:  # pragma: no cover
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=work, args=(ids,)) for ids in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert not errors
    stats = monitor.get_current_stats()
    assert [l.expert_counts for l in stats.layers] == (expected * rounds).tolist()
    assert stats.num_forwards == rounds * len(inputs)
    assert stats.num_tokens == rounds * sum(ids.numel() for ids in inputs)
    # digits go to expert 0, DNA letters to 1 (top-2 also uses a second expert); none of the counts is lost
    assert sum(stats.layers[0].expert_counts) == 2 * stats.num_tokens


def test_window_keeps_the_last_forwards_and_dead_experts(rigged):
    model = rigged.model(experts_per_token=1)
    tok = ByteTokenizer()
    monitor = ExpertMonitor(model, window_size=2)
    with monitor:
        with torch.no_grad():
            model(torch.tensor([tok.encode("acgtacgt")]))  # expert 1 (forgotten below)
            model(torch.tensor([tok.encode("12+3=15")]))  # expert 0
            model(torch.tensor([tok.encode("4+4=8"), tok.encode("9+1=1")]))  # expert 0
        stats = monitor.get_current_stats()
        assert stats.window_size == 2 and stats.num_forwards == 2
        assert stats.layers[0].expert_counts == [7 + 10, 0, 0, 0]
        assert stats.layers[0].dead_experts == [1, 2, 3]
        assert stats.num_tokens == 17 and stats.window_seconds >= 0
        d = stats.to_dict()
        assert d["num_dead_experts"] == 3 and d["max_load_imbalance"] == pytest.approx(4.0)
        monitor.reset()
        assert monitor.get_current_stats().num_forwards == 0
    assert not monitor.is_monitoring


def test_trainer_logs_monitor_to_metrics_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moe_lab.training import MoETrainer

    model = _model()
    monitor = ExpertMonitor(model).start_monitoring()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 97, (12,), generator=g).tolist()} for _ in range(32)]
    trainer = MoETrainer(model, monitor=monitor, mixed_precision=False, progress_bar=False, tensorboard=True,
                         seed=0, logging_steps=2)
    trainer.train(rows, num_epochs=1, batch_size=8, learning_rate=1e-2, warmup_steps=1, eval_steps=1000,
                  save_steps=1000, output_dir=str(tmp_path))
    monitor.stop_monitoring()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert [l["step"] for l in lines] == [2, 4]
    running = torch.zeros(2, 4, dtype=torch.long)
    for rec in lines:  # the monitor counts every training forward since start: the sum of the windows
        running += torch.tensor([lay["expert_counts"] for lay in rec["moe_layers"]])
        assert [lay["expert_counts"] for lay in rec["monitor"]["layers"]] == running.tolist()
        assert rec["monitor"]["num_tokens"] == rec["step"] * 8 * 12
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("monitor/layer0/load_imbalance", "monitor/layer1/load_cv", "monitor/layer0/dead_experts",
                "monitor/mean_load_imbalance", "monitor/num_dead_experts"):
        assert tag in tags, sorted(tags)


def test_bad_arguments():
    with pytest.raises(InputError, match="no MoE layers"):
        ExpertMonitor(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="window_size"):
        ExpertMonitor(_model(), window_size=0)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("window_size", [None, 5])
def test_dropped_fraction_is_token_weighted(masked, window_size):
    model = _model(router_type="switch", experts_per_token=1, capacity_factor=0.5)  # drops in training
    monitor = ExpertMonitor(model, window_size=window_size).start_monitoring()
    dropped_tokens = torch.zeros(2, dtype=torch.float64)
    tokens = 0
    for seq in (6, 10):
        ids = torch.randint(0, 97, (2, seq))
        mask = torch.ones(2, seq, dtype=torch.long)
        if masked:
            mask[0, -3:] = 0
        _, info = model(ids, attention_mask=mask if masked else None, return_routing_info=True)
        n = int(mask.sum())
        dropped_tokens += info["dropped_fraction"].double() * n
        tokens += n
    stats = monitor.get_current_stats()
    assert stats.num_tokens == tokens
    assert dropped_tokens.min() > 0
    assert [l.dropped_fraction for l in stats.layers] == pytest.approx((dropped_tokens / tokens).tolist(), rel=1e-5)


def _compiled_run(monitored):
    import torch._dynamo

    model = _model()
    monitor = ExpertMonitor(model).start_monitoring() if monitored else None
    for layer in model.layers:  # as the trainer's CUDA fast path does (dynamo only here: fast on CPU)
        layer.compile(backend="eager", dynamic=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    expected = torch.zeros(2, 4, dtype=torch.long)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        logits, info = model(ids, return_routing_info=True)
        (logits.float().mean() + info["aux_loss"]).backward()
        expected += info["expert_counts"]
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    torch._dynamo.reset()
    return monitor, expected, breaks


def test_compiled_layers_are_counted_without_extra_graph_breaks():
    _, _, baseline_breaks = _compiled_run(monitored=False)  # the CPU dispatch has its own breaks
    monitor, expected, breaks = _compiled_run(monitored=True)
    assert breaks == baseline_breaks  # the hook is traced into the graph
    stats = monitor.get_current_stats()
    assert [l.expert_counts for l in stats.layers] == expected.tolist()
    assert stats.num_forwards == 3 and stats.num_tokens == 3 * 16
    monitor.stop_monitoring()


def test_accumulators_are_non_persistent_buffers_removed_on_stop():
    model = _model()
    before = set(model.state_dict())
    monitor = ExpertMonitor(model, window_size=3).start_monitoring()
    assert set(model.state_dict()) == before  # never saved in checkpoints
    assert any("_moe_lab_monitor" in name for name, _ in model.named_buffers())
    model.to(torch.float64)  # buffers follow the model; counts stay exact ints
    model(torch.randint(0, 97, (1, 5)))
    monitor.stop_monitoring()
    assert not any("_moe_lab_monitor" in name for name, _ in model.named_buffers())
    assert sum(monitor.get_current_stats().layers[0].expert_counts) == 5 * 2
