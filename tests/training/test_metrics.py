"""Metric sinks: one protocol, the same records everywhere (history, jsonl, callbacks, MLflow)."""

import json

import pytest
import torch
from helpers import tiny_config

from moe_lab import MoEModel
from moe_lab.training import MoETrainer
from moe_lab.training import metrics as M


def _rows(n=16):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 97, (12,), generator=g).tolist()} for _ in range(n)]


class Collect:
    def __init__(self):
        self.records, self.closed = [], False

    def write(self, record):
        self.records.append(record)

    def close(self):
        self.closed = True


def test_every_sink_sees_the_same_records(tmp_path):
    extra = Collect()
    assert isinstance(extra, M.MetricsSink)
    trainer = MoETrainer(MoEModel.from_config(tiny_config()), progress_bar=False, mixed_precision=False,
                         logging_steps=1, sinks=[extra])
    res = trainer.train(_rows(), _rows(8), batch_size=4, max_steps=3, eval_steps=2, output_dir=str(tmp_path),
                        warmup_steps=1)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == extra.records and extra.closed
    train = [r for r in lines if not M.is_eval_record(r)]
    evals = [r for r in lines if M.is_eval_record(r)]
    assert [r[M.STEP] for r in train] == [1, 2, 3] and [r[M.STEP] for r in evals] == [2, 3]
    assert res.history[M.LOSS] == [r[M.LOSS] for r in train]
    assert res.history[M.EVAL_LOSS] == [r[M.EVAL_LOSS] for r in evals] and res.history[M.EVAL_STEP] == [2, 3]
    layer = train[0][M.MOE_LAYERS][0]
    assert set(M.SCALAR_LAYER_KEYS) <= set(layer) and sum(layer[M.EXPERT_COUNTS]) > 0
    assert (tmp_path / "tensorboard").is_dir()


def test_load_stats():
    imbalance, cv = M.load_stats(torch.tensor([[1.0, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0]]))
    assert imbalance == pytest.approx([1.0, 4.0, 0.0]) and cv == pytest.approx([0.0, 3 ** 0.5, 0.0])


def test_mlflow_sink_logs_to_a_local_file_store(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow-skinny is a test extra: make test installs it")
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    trainer = MoETrainer(MoEModel.from_config(tiny_config()), progress_bar=False, mixed_precision=False,
                         logging_steps=1, tensorboard=False, mlflow_tracking_uri=uri, mlflow_experiment="t")
    trainer.train(_rows(), _rows(8), batch_size=4, max_steps=2, eval_steps=2, output_dir=str(tmp_path / "o"),
                  warmup_steps=1)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    losses = [m.value for m in client.get_metric_history(run.info.run_id, M.LOSS)]
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([r[M.LOSS] for r in lines if not M.is_eval_record(r)])
    assert client.get_metric_history(run.info.run_id, M.EVAL_LOSS)[0].step == 2
    assert run.data.params["learning_rate"] == "0.0001" and run.info.status == "FINISHED"


def test_mlflow_uri_without_mlflow_is_a_config_error(monkeypatch):
    from moe_lab import ConfigError

    monkeypatch.setattr(M, "mlflow_available", lambda: False)
    with pytest.raises(ConfigError, match="mlflow is not installed"):
        MoETrainer(MoEModel.from_config(tiny_config()), mlflow_tracking_uri="file:/tmp/x")
