import base64
import json
import re
import shutil
import subprocess

import datasets
import pytest
import torch
from typer.testing import CliRunner

from moe_lab import InputError, MoEModel
from moe_lab.analytics import write_report
from moe_lab.cli import app
from moe_lab.data import ByteTokenizer, build_corpus, prepare_moe_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny byte-level model trained for a few steps: out/model (+ tokenizer) and out/metrics.jsonl."""
    from moe_lab.training import MoETrainer

    out = tmp_path_factory.mktemp("run")
    tok = ByteTokenizer()
    corpus = build_corpus(size_bytes=20_000)
    train = prepare_moe_dataset(corpus, tok, max_length=32, num_proc=None)
    torch.manual_seed(0)
    model = MoEModel(vocab_size=259, hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     experts_per_token=2, expert_hidden_size=48, max_position_embeddings=64, dropout=0.0)
    trainer = MoETrainer(model, tokenizer=tok, mixed_precision=False, progress_bar=False, tensorboard=False,
                         logging_steps=2, seed=0)
    trainer.train(train, num_epochs=1, batch_size=8, learning_rate=3e-3, warmup_steps=1, eval_steps=1000,
                  save_steps=1000, output_dir=str(out), max_steps=4)
    small = corpus.select(range(0, len(corpus), max(1, len(corpus) // 15)))
    return {"out": out, "ckpt": out / "model", "data": small}


@pytest.fixture(scope="module")
def bias_run(tmp_path_factory):
    """A tiny model trained a few steps with aux-loss-free balancing (router_bias_update_rate):
    its metrics.jsonl carries each MoE layer's router_bias."""
    from moe_lab.training import MoETrainer

    out = tmp_path_factory.mktemp("bias_run")
    tok = ByteTokenizer()
    corpus = build_corpus(size_bytes=20_000)
    train = prepare_moe_dataset(corpus, tok, max_length=32, num_proc=None)
    torch.manual_seed(0)
    model = MoEModel(vocab_size=259, hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     experts_per_token=2, expert_hidden_size=48, max_position_embeddings=64, dropout=0.0,
                     load_balancing_loss_coef=0.0, router_bias_update_rate=0.01)
    trainer = MoETrainer(model, tokenizer=tok, mixed_precision=False, progress_bar=False, tensorboard=False,
                         logging_steps=1, seed=0)
    trainer.train(train, num_epochs=1, batch_size=8, learning_rate=3e-3, warmup_steps=1, eval_steps=1000,
                  save_steps=1000, output_dir=str(out), max_steps=4)
    small = corpus.select(range(0, len(corpus), max(1, len(corpus) // 15)))
    return {"out": out, "ckpt": out / "model", "data": small}


def _images(html):
    imgs = IMG_RE.findall(html)
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == PNG_MAGIC
    return imgs


def test_report_is_self_contained_with_images_and_curves(run, tmp_path):
    path = write_report(run["ckpt"], tmp_path / "rep", data=run["data"], num_samples=32)
    assert path == tmp_path / "rep" / "report.html"
    html = path.read_text()
    assert len(_images(html)) == 4  # specialisation, utilisation, heatmap, training curves
    assert "<link" not in html and not re.search(r'src="(?!data:)', html) and "http://" not in html
    assert "Which experts handle which domains" in html and "Training curves" in html
    for domain in set(run["data"]["domain"]):
        assert domain in html
    for name in ("expert_specialization.png", "expert_utilization.png", "routing_heatmap.png", "training_curves.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == PNG_MAGIC
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["routing"]["num_sequences"] == 32 and len(rep["routing"]["layers"]) == 2
    for shares in rep["specialization"]["by_expert"].values():
        assert not shares or abs(sum(shares.values()) - 1) < 1e-9


def test_report_without_metrics_has_a_note(run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run["ckpt"], ckpt)
    path = write_report(ckpt, tmp_path / "rep", data=run["data"], num_samples=8)
    html = path.read_text()
    assert len(_images(html)) == 3 and "No training metrics found" in html
    assert not (tmp_path / "rep" / "training_curves.png").exists()


def test_report_bad_data(run, tmp_path):
    no_label = datasets.Dataset.from_dict({"text": ["1+1=2", "acgt"], "source": ["x", "y"]})
    with pytest.raises(InputError, match=r"no label column 'domain'.*\['text', 'source'\]"):
        write_report(run["ckpt"], tmp_path, data=no_label)
    with pytest.raises(InputError, match="empty"):
        write_report(run["ckpt"], tmp_path, data=datasets.Dataset.from_dict({"text": [], "domain": []}))
    assert not (tmp_path / "report.html").exists()


def test_cli_analyze(run, tmp_path):
    runner = CliRunner()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n"
                            for t, d in zip(run["data"]["text"], run["data"]["domain"])))
    res = runner.invoke(app, ["analyze", str(run["ckpt"]), "--data", str(data), "--num-samples", "16",
                              "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "report written to" in res.output and (tmp_path / "a" / "report.html").is_file()
    # default data: the built-in corpus eval split
    res = runner.invoke(app, ["analyze", str(run["ckpt"]), "--num-samples", "8", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "built-in corpus eval split" in (tmp_path / "b" / "report.html").read_text()
    # user mistakes: exit code 2, one clear line, no traceback
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1+1=2", "kind": "a"}\n')
    res = runner.invoke(app, ["analyze", str(run["ckpt"]), "--data", str(bad), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "no label column 'domain'" in res.output and "'kind'" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(app, ["analyze", str(run["ckpt"]), "--data", str(data), "--max-length", "999",
                              "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "max_length" in res.output


def test_report_renders_in_headless_chromium(run, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's `chromium` is not installed; install it with `apt-get install -y chromium` "
                    "(.ci/run installs it in CI)")
    path = write_report(run["ckpt"], tmp_path / "rep", data=run["data"], num_samples=16)
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", f"--screenshot={shot}",
           "--dump-dom", path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:2000]
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    assert loaded and total, body.group(0)
    assert int(total.group(1)) == 4 and int(loaded.group(1)) == 4
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 10_000


def test_report_plots_the_router_bias_when_training_logged_it(bias_run, tmp_path):
    path = write_report(bias_run["ckpt"], tmp_path / "rep", data=bias_run["data"], num_samples=8)
    html = path.read_text()
    assert len(_images(html)) == 5  # the four of every report and the router bias
    assert 'id="router-bias"' in html and 'href="#router-bias"' in html
    assert (tmp_path / "rep" / "router_bias.png").read_bytes()[:8] == PNG_MAGIC
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    logged = [json.loads(line) for line in (bias_run["out"] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if "loss" in r]
    assert sorted(rep["router_bias"]) == ["0", "1"]
    assert rep["router_bias"]["1"]["step"] == [r["step"] for r in train] == [1, 2, 3, 4]
    assert rep["router_bias"]["1"]["bias"][-1] == train[-1]["moe_layers"][1]["router_bias"]
    assert any(b != 0 for b in rep["router_bias"]["0"]["bias"][-1])  # it moved


def test_report_has_no_router_bias_without_a_logged_bias(run, tmp_path):
    path = write_report(run["ckpt"], tmp_path / "rep", data=run["data"], num_samples=8)
    html = path.read_text()
    assert "Training curves" in html and len(_images(html)) == 4
    assert "router-bias" not in html and "Router bias" not in html
    assert not (tmp_path / "rep" / "router_bias.png").exists()
    assert "router_bias" not in json.loads((tmp_path / "rep" / "report.json").read_text())
