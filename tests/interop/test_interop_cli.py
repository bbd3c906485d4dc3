"""``moe-lab export`` and ``moe-lab upcycle`` through Typer's runner."""

import json

import pytest
import torch
from helpers import tiny_config
from typer.testing import CliRunner

from moe_lab import MoEModel
from moe_lab.cli import app
from moe_lab.data import ByteTokenizer
from moe_lab.checkpoint import load_pretrained_moe, save_moe_checkpoint

runner = CliRunner()


def _ckpt(tmp_path, name="ckpt", **overrides):
    model = MoEModel(config=tiny_config(vocab_size=259, **overrides))
    return save_moe_checkpoint(model, None, None, tmp_path / name, tokenizer=ByteTokenizer()), model


def test_export_writes_a_mixtral_directory(tmp_path):
    ckpt, model = _ckpt(tmp_path)
    res = runner.invoke(app, ["export", str(ckpt), "--format", "hf-mixtral", "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    back = load_pretrained_moe(tmp_path / "hf")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    # a second export into the same directory needs --overwrite
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "hf"), "--overwrite", "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_accepts_a_job_output_directory(tmp_path):
    _ckpt(tmp_path / "job", name="model")
    res = runner.invoke(app, ["export", str(tmp_path / "job"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_unknown_format_exits_2_listing_formats(tmp_path):
    ckpt, _ = _ckpt(tmp_path)
    res = runner.invoke(app, ["export", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "unknown --format 'gguf'" in res.output
    for name in ("hf-mixtral", "hf-qwen2-moe", "hf-qwen3-moe"):
        assert name in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x").exists()


def test_unsupported_config_exits_2_listing_every_reason(tmp_path):
    ckpt, _ = _ckpt(tmp_path, num_layers=4, moe_layer_frequency=2, router_bias=True)
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 2
    assert "cannot be exported as Mixtral" in res.output
    assert "layers [0, 2] dense" in res.output and "router_bias=True" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "fmt, overrides, arch",
    [
        ("hf-qwen2-moe", {"num_shared_experts": 1, "shared_expert_gate": True}, "Qwen2MoeForCausalLM"),
        ("hf-qwen3-moe", {"qk_norm": True}, "Qwen3MoeForCausalLM"),
    ],
)
def test_export_writes_a_qwen_directory(tmp_path, fmt, overrides, arch):
    ckpt, model = _ckpt(tmp_path, **overrides)
    res = runner.invoke(app, ["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [arch]
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    back = load_pretrained_moe(tmp_path / "hf")
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_qwen_refusal_exits_2_listing_every_reason(tmp_path):
    ckpt, _ = _ckpt(tmp_path, router_bias=True)
    res = runner.invoke(app, ["export", str(ckpt), "--format", "hf-qwen3-moe", "--out", str(tmp_path / "hf")])
    assert res.exit_code == 2 and "cannot be exported as Qwen3-MoE" in res.output
    assert "router_bias=True" in res.output and "qk_norm=False" in res.output and "Traceback" not in res.output


def test_missing_checkpoint_exits_2(tmp_path):
    res = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 2 and "not found" in res.output and "Traceback" not in res.output


def test_upcycle_command(tmp_path):
    ckpt, dense = _ckpt(tmp_path, num_layers=2, moe_layer_frequency=3)
    res = runner.invoke(app, ["upcycle", str(ckpt), "--num-experts", "4", "--experts-per-token", "2",
                              "--out", str(tmp_path / "moe")])
    assert res.exit_code == 0, res.output
    assert "2 MoE layers x 4 experts" in res.output
    moe = load_pretrained_moe(tmp_path / "moe")
    ids = torch.randint(0, 259, (2, 8))
    with torch.no_grad():
        assert (dense.eval()(ids) - moe.eval()(ids)).abs().max() < 1e-5
    # the upcycled model is all-MoE and exports to Mixtral
    res = runner.invoke(app, ["export", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--num-experts", "4", "--experts-per-token", "8"], "experts_per_token (8) must be <= num_experts (4)"),
        (["--num-experts", "0", "--experts-per-token", "1"], "num_experts must be an int"),
    ],
)
def test_upcycle_bad_counts_exit_2(tmp_path, args, needle):
    ckpt, _ = _ckpt(tmp_path, num_layers=2, moe_layer_frequency=3)
    res = runner.invoke(app, ["upcycle", str(ckpt), *args, "--out", str(tmp_path / "moe")])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output


def test_upcycle_of_an_all_moe_model_exits_2(tmp_path):
    ckpt, _ = _ckpt(tmp_path)
    res = runner.invoke(app, ["upcycle", str(ckpt), "--num-experts", "4", "--experts-per-token", "2",
                              "--out", str(tmp_path / "moe")])
    assert res.exit_code == 2 and "no dense layers" in res.output
