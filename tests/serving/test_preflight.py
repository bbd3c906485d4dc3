"""The driver's checkpoint check (`moe-lab serve`, `app_builder`): a broken checkpoint gives one
line and exit code 2 before anything of Ray starts; a good one passes without reading tensors."""

import json
import shutil
import time

import pytest
import torch
from typer.testing import CliRunner

from moe_lab import MoEModel
from moe_lab.checkpoint import write_checkpoint
from moe_lab.cli import app
from moe_lab.data import ByteTokenizer
from moe_lab.errors import CheckpointError
from moe_lab.serving import ServeArgs, resolve_checkpoint
from moe_lab.serving.preflight import check_servable_checkpoint, describe_exception

ray = pytest.importorskip("ray")

runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("preflight") / "good"
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = MoEModel(vocab_size=len(tok), hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     experts_per_token=2, expert_hidden_size=32, max_position_embeddings=64, dropout=0.0)
    write_checkpoint(path, model.config, model.state_dict(), tokenizer=tok)
    return path


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _flip_header(d):
    w = d / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[10] ^= 0xFF  # inside the JSON header
    w.write_bytes(bytes(raw))


def _huge_header_length(d):
    w = d / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[:8] = (2**62).to_bytes(8, "little")
    w.write_bytes(bytes(raw))


def _missing_tokenizer(d):  # the config names moe_lab's BPE tokenizer, whose own file is gone
    _edit_json(d / "tokenizer_config.json", tokenizer_class="BPETokenizer")


BROKEN = {
    "truncated weights": (_truncate, "model.safetensors"),
    "corrupt safetensors header": (_flip_header, "header"),
    "2^62 header length": (_huge_header_length, "model.safetensors"),
    "wrong shapes": (lambda d: _edit_json(d / "config.json", hidden_size=64), "hidden_size is 64 in config.json but 32"),
    "non-JSON config": (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    "invalid config": (lambda d: _edit_json(d / "config.json", num_experts="four"), "num_experts"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "missing tokenizer": (_missing_tokenizer, "tokenizer files do not load"),
}


@pytest.fixture(params=sorted(BROKEN), ids=lambda k: k.replace(" ", "-"))
def broken(request, good, tmp_path):
    damage, match = BROKEN[request.param]
    path = tmp_path / "ckpt"
    shutil.copytree(good, path)
    damage(path)
    return path, match


@pytest.fixture
def ray_init_calls(monkeypatch):
    """Every call to ray.init (each one raises: nothing may start Ray in these tests)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", spy)
    return calls


def test_good_checkpoint_passes_and_resolves(good, monkeypatch):
    monkeypatch.chdir(good.parent)
    assert check_servable_checkpoint("good") == good.resolve()
    args = resolve_checkpoint(ServeArgs(checkpoint="good", max_batch_size=3))
    assert args.checkpoint == str(good.resolve()) and args.max_batch_size == 3


def test_broken_checkpoint_is_one_line_checkpoint_error(broken):
    path, match = broken
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        check_servable_checkpoint(path)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    if match:
        assert match in message


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    # weights and config agree (200 tokens), but the saved tokenizer has 259: ids past 199
    model = MoEModel(vocab_size=200, hidden_size=16, num_layers=1, num_attention_heads=2, num_experts=2,
                     experts_per_token=1, expert_hidden_size=16, max_position_embeddings=32, dropout=0.0)
    write_checkpoint(tmp_path / "m", model.config, model.state_dict(), tokenizer=ByteTokenizer())
    with pytest.raises(CheckpointError, match="its tokenizer has 259 tokens but config.json's vocab_size is 200"):
        check_servable_checkpoint(tmp_path / "m")


def test_app_builder_refuses_before_ray(broken, ray_init_calls):
    from moe_lab.orchestration.serve import app_builder

    with pytest.raises(CheckpointError):
        app_builder(ServeArgs(checkpoint=str(broken[0])))
    assert not ray.is_initialized() and ray_init_calls == []


def test_cli_exits_2_with_one_line_before_ray(broken, ray_init_calls):
    path, match = broken
    start = time.monotonic()
    res = runner.invoke(app, ["serve", str(path), "--port", "1"])  # the port is never reached
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    if match:
        assert match in lines[0]
    assert ray_init_calls == [] and not ray.is_initialized()
    assert time.monotonic() - start < 10


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="'nope' is not a checkpoint directory"):
        check_servable_checkpoint("nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a checkpoint directory"):
        check_servable_checkpoint(tmp_path / "file")


def test_describe_exception_is_one_bounded_line():
    text = describe_exception(ValueError("first\n  second\tthird " + "x" * 500), limit=80)
    assert text.startswith("ValueError: first second third x") and len(text) == 80 and text.endswith("...")
