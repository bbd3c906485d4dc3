"""CLI behaviour through Typer's runner, plus one real `moe-lab train` subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from moe_lab import MoEModel
from moe_lab.cli import app
from moe_lab.data import ByteTokenizer
from moe_lab.training import MoETrainer

ROOT = Path(__file__).resolve().parents[1]

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = MoEModel(vocab_size=len(tok), hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     expert_hidden_size=64, max_position_embeddings=128, dropout=0.0)
    trainer = MoETrainer(model, tokenizer=tok, mixed_precision=False, progress_bar=False, tensorboard=False, max_length=32)
    text = ["12 + 5 = 17\n3 + 4 = 7\n" * 4] * 16
    res = trainer.train(text, num_epochs=1, batch_size=4, learning_rate=3e-3, warmup_steps=1,
                        output_dir=str(out), max_steps=3)
    return res.checkpoint_path


def test_train_bad_set_key_exits_2_without_traceback():
    res = runner.invoke(app, ["train", "--set", "model.hiden_size=3"])
    assert res.exit_code == 2
    assert "model.hiden_size: unknown field" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    "args, match",
    [
        (["--set", "training.batch_size=abc"], "training.batch_size = 'abc'"),
        (["--set", "data.max_length=1"], "data.max_length = 1"),
        (["missing-job.yaml"], "job file not found: missing-job.yaml"),
        (["--set", "data.dataset=/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    ],
)
def test_train_user_errors(args, match):
    res = runner.invoke(app, ["train", *args])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output


def test_train_text_column_missing_lists_columns(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(20)))
    res = runner.invoke(app, ["train", "--set", f"data.dataset={data}", "--set", "data.label_column=null"])
    assert res.exit_code == 2
    assert "body" in res.output and "text" in res.output


def test_evaluate_prints_json(tiny_ckpt, tmp_path):
    data = tmp_path / "eval.txt"
    data.write_text("\n".join(f"{i} + 1 = {i + 1}" for i in range(200)))
    res = runner.invoke(app, ["evaluate", tiny_ckpt, "--data", str(data), "--max-length", "32", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["loss"] > 0 and out["perplexity"] > 1 and len(out["expert_counts"]) == 2


def test_generate_greedy_is_deterministic(tiny_ckpt):
    args = ["generate", tiny_ckpt, "--prompt", "12 + 5 =", "--max-new-tokens", "8", "--temperature", "0"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == 0, a.output
    assert a.output == b.output and a.output.startswith("12 + 5 =")


def test_generate_bad_values(tiny_ckpt, tmp_path):
    res = runner.invoke(app, ["generate", tiny_ckpt, "--prompt", "hi", "--top-p", "1.5"])
    assert res.exit_code == 2 and "top_p must be in (0, 1], got 1.5" in res.output
    res = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "hi"])
    assert res.exit_code == 2 and "not found" in res.output


@pytest.mark.slow
def test_real_subprocess_train(tmp_path):
    # `moe-lab train` as a user runs it (its own embedded Ray cluster), on the layout that needs
    # the most of the Ray path: jobs/train_pp.yaml at PP 2 on 2 Ray Train workers (its PP 2 x EP 2
    # is exact in tests/parallel/test_pipeline.py; the default job runs through Ray too, in
    # tests/orchestration/test_submit.py)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moe_lab", "train", "jobs/train_pp.yaml", "--set", "scaling.num_workers=2",
           "--set", "scaling.ep=1", "--set", "training.max_steps=4",
           "--set", "training.eval_steps=4", "--set", "data.corpus_size_bytes=100000", "--set", "training.eval_samples=32",
           "--set", "training.logging_steps=2", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final eval loss" in proc.stdout and "unigram baseline" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 4
    for name in ("metrics.jsonl", "loss_curve.png", "model/model.safetensors", "job.yaml"):
        assert (out / name).exists(), name
    job = yaml.safe_load((out / "job.yaml").read_text())
    assert job["scaling"]["pp"] == 2 and job["scaling"]["num_workers"] == 2
    # the checkpoint gathered both stages: the full model, every decoder layer
    from moe_lab.training import load_pretrained_moe

    assert len(load_pretrained_moe(out / "model").layers) == 4
