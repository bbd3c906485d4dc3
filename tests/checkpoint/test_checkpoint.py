import json
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from torch import nn

from moe_lab import CheckpointError, MoEModel
from moe_lab.data import ByteTokenizer
from moe_lab.training import latest_checkpoint, load_pretrained_moe, save_moe_checkpoint
from moe_lab.checkpoint import writer as writer_mod  # where save_file is called (patched below)
from moe_lab.checkpoint import files as ckpt_mod
from moe_lab.checkpoint import load_training_state
from moe_lab.training.optim import default_optimizer

ROOT = Path(__file__).resolve().parents[2]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MoEModel.from_config(tiny_config(**kw)).eval()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _weights_differ(a, b):
    sb = b.state_dict()
    return any(not torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def _ids():
    return torch.randint(0, 97, (2, 10))


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_identical_logits(tmp_path, tied):
    m = _model(tie_word_embeddings=tied)
    opt = default_optimizer(m, 1e-3, 0.1)
    m(_ids()).sum().backward()
    opt.step()
    path = save_moe_checkpoint(m, opt, None, tmp_path / "ckpt", trainer_state={"global_step": 1})
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json"} <= files
    loaded = load_pretrained_moe(path).eval()
    ids = _ids()
    assert torch.equal(loaded(ids), m(ids))
    assert loaded.config == m.config
    if tied:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def _safetensors_header(raw):
    """The JSON header if ``raw`` is exactly a safetensors file (8-byte little-endian header
    length, JSON header, then tensor bytes that the header's offsets cover end to end), else None."""
    if len(raw) < 8:
        return None
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        return None
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    pos = 0
    for begin, end in sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"):
        if begin != pos:
            return None
        pos = end
    return header if pos == len(raw) - 8 - n else None


def _full_checkpoint(path):
    """A checkpoint with every kind of file: weights, optimizer, scheduler, trainer state, tokenizer."""
    m = _model()
    opt = default_optimizer(m, 1e-3, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    m(_ids()).sum().backward()
    opt.step()
    sched.step()
    save_moe_checkpoint(m, opt, sched, path, trainer_state={"global_step": 1}, tokenizer=ByteTokenizer())
    return m, opt, sched


def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    path = tmp_path / "c"
    _full_checkpoint(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "trainer_state.json", "tokenizer_config.json"} <= names
    for f in files:
        raw = f.read_bytes()
        assert not raw.startswith(b"PK\x03\x04"), f"{f.name} is a zip archive (torch.save's format)"
        if f.suffix == ".safetensors":
            assert _safetensors_header(raw) is not None, f"{f.name} is not a plain safetensors file"
        else:
            assert f.suffix == ".json", f"unexpected file {f.name} in a checkpoint"
            assert not raw.startswith(b"\x80"), f"{f.name} is a pickle"
            json.loads(raw.decode("utf-8"))
    assert "embed_tokens.weight" in _safetensors_header((path / "model.safetensors").read_bytes())
    opt_keys = _safetensors_header((path / "optimizer.safetensors").read_bytes())
    assert any(k.endswith("::exp_avg") for k in opt_keys)  # optimizer tensors live here, not in a pickle


def test_safetensors_check_rejects_pickles_and_zips(tmp_path):
    # the check above can fail: torch.save's zip and a raw pickle are not safetensors
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    assert _safetensors_header((tmp_path / "a.pt").read_bytes()) is None
    assert _safetensors_header(pickle.dumps({"w": [1.0, 2.0]}, protocol=4)) is None
    path = save_moe_checkpoint(_model(), None, None, tmp_path / "c")
    raw = (path / "model.safetensors").read_bytes()
    assert _safetensors_header(raw) is not None and _safetensors_header(raw + b"extra") is None


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = tmp_path / "c"
    m, opt, sched = _full_checkpoint(path)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                        (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(owner, name, refuse)
    loaded = load_pretrained_moe(path)
    opt2 = default_optimizer(loaded, 1e-3, 0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 0.5)
    state = load_training_state(path, loaded, opt2, sched2)
    monkeypatch.undo()
    assert state == {"global_step": 1}
    _assert_same_weights(loaded, m)
    names = dict(loaded.named_parameters())
    for name, p in m.named_parameters():
        assert torch.equal(opt2.state[names[name]]["exp_avg"], opt.state[p]["exp_avg"]), name
    assert sched2.last_epoch == sched.last_epoch == 1


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_legacy_optimizer_pt_is_never_fully_unpickled(tmp_path):
    path = save_moe_checkpoint(_model(), None, None, tmp_path / "c")
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCodeWhenUnpickled(marker)}, path / "optimizer.pt")
    model = load_pretrained_moe(path)
    with pytest.raises(CheckpointError, match="weights only"):
        load_training_state(path, model, default_optimizer(model, 1e-3, 0.1))
    assert not marker.exists()


def test_truncated_weights_raise(tmp_path):
    path = save_moe_checkpoint(_model(), None, None, tmp_path / "c")
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not safetensors"):
        load_pretrained_moe(path)


def test_mismatched_config_raises(tmp_path):
    path = save_moe_checkpoint(_model(), None, None, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*experts"):
        load_pretrained_moe(path)


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained_moe(tmp_path / "nope")
    path = save_moe_checkpoint(_model(), None, None, tmp_path / "c")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained_moe(path)
    (path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained_moe(path)


def test_invalid_config_in_checkpoint(tmp_path):
    path = save_moe_checkpoint(_model(), None, None, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["experts_per_token"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="experts_per_token"):
        load_pretrained_moe(path)


def test_hub_name_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not a local directory and could not be fetched"):
        load_pretrained_moe("some-org/some-moe-model")


def _dropout_ps(model):
    """p of the dropout modules that MoEConfig.dropout sets (embeddings, residual branches)."""
    return {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout) and ".experts." not in n}


def test_overrides_apply_on_load(tmp_path):
    saved = _model(dropout=0.1)
    path = save_moe_checkpoint(saved, None, None, tmp_path / "c")
    ids = _ids()
    plain = load_pretrained_moe(path).train()
    assert plain.config.dropout == 0.1
    assert _dropout_ps(plain) == {"embed_dropout": 0.1, "layers.0.dropout": 0.1, "layers.1.dropout": 0.1}
    assert not torch.equal(plain(ids), plain(ids))  # dropout is active in training mode

    m = load_pretrained_moe(path, dropout=0.0, moe_backend="eager").train()
    assert m.config.dropout == 0.0 and m.config.moe_backend == "eager"
    assert set(_dropout_ps(m).values()) == {0.0} and len(_dropout_ps(m)) == 3
    assert all(moe.experts.backend == "eager" for moe in m.moe_layers)
    assert torch.equal(m(ids), m(ids))  # no dropout left: training-mode forwards are deterministic
    _assert_same_weights(m, saved)  # overrides change the config, not the weights
    assert json.loads((path / "config.json").read_text())["dropout"] == 0.1  # nor the checkpoint


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m = _model()
    ckpts = tmp_path / "checkpoints"
    save_moe_checkpoint(m, None, None, ckpts / "step-000001")

    def exploding_save(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(writer_mod, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_moe_checkpoint(m, None, None, ckpts / "step-000002")
    assert not (ckpts / "step-000002").exists()
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]  # the temp dir was removed
    assert latest_checkpoint(tmp_path) == ckpts / "step-000001"
    load_pretrained_moe(ckpts / "step-000001")


def test_stale_temporaries_ignored_and_cleaned(tmp_path):
    ckpts = tmp_path / "checkpoints"
    save_moe_checkpoint(_model(), None, None, ckpts / "step-000003")
    stale = ckpts / ".tmp-step-000004-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == ckpts / "step-000003"
    ckpt_mod.clean_stale_temporaries(ckpts)
    assert not stale.exists()


def test_overwrite_replaces_the_checkpoint(tmp_path):
    path = tmp_path / "model"
    save_moe_checkpoint(_model(), None, None, path)
    m2 = _model(seed=1, dropout=0.2)
    save_moe_checkpoint(m2, None, None, path)
    loaded = load_pretrained_moe(path)
    assert loaded.config.dropout == 0.2
    _assert_same_weights(loaded, m2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp-* / .old-* left


def test_overwrite_failing_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model"
    old = _model()
    save_moe_checkpoint(old, None, None, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_save_file = writer_mod.save_file

    def half_written_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(writer_mod, "save_file", half_written_then_fail)
    new = _model(seed=1)
    assert _weights_differ(new, old)
    with pytest.raises(OSError, match="disk full"):
        save_moe_checkpoint(new, None, None, path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # bitwise the old files
    _assert_same_weights(load_pretrained_moe(path), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the temporary was removed


# A writer process killed (SIGKILL) while it writes the new weights over an existing checkpoint.
_KILLED_WRITER = r"""
import os, signal, sys
sys.path.insert(0, "tests")
import torch
from helpers import tiny_config
from safetensors.torch import save
from moe_lab import MoEModel
from moe_lab.checkpoint import writer as writer_mod
from moe_lab.training import save_moe_checkpoint

def half_written_then_killed(tensors, filename, metadata=None):
    data = save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

writer_mod.save_file = half_written_then_killed
torch.manual_seed(1)
save_moe_checkpoint(MoEModel.from_config(tiny_config()).eval(), None, None, sys.argv[1])
print("the writer was not killed")
"""


def test_overwrite_killed_mid_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "model"
    old = _model()
    save_moe_checkpoint(old, None, None, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # what a crash leaves: a half-written temporary directory
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained_moe(leftovers[0])
    # the old checkpoint: the same bytes, loads with the old weights (the leftover is ignored)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    _assert_same_weights(load_pretrained_moe(path), old)
    assert _weights_differ(_model(seed=1), old)  # the killed writer's model was a different one
    ckpt_mod.clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    _assert_same_weights(load_pretrained_moe(path), old)


class _Crash(BaseException):
    """Stands for the process dying at this point (nothing after it runs)."""


def test_overwrite_crash_between_the_two_renames_keeps_a_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model"
    old = _model()
    save_moe_checkpoint(old, None, None, path)
    real_rename = os.rename

    def crash_before_the_new_one_moves_in(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise _Crash()
        real_rename(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "rename", crash_before_the_new_one_moves_in)
    with pytest.raises(_Crash):
        save_moe_checkpoint(_model(seed=1), None, None, path)
    monkeypatch.undo()
    ckpt_mod.clean_stale_temporaries(tmp_path)  # what the next training run does first
    loaded = load_pretrained_moe(path)  # before the fix: CheckpointError, directory not found
    assert not _weights_differ(loaded, old) or not _weights_differ(loaded, _model(seed=1))


def test_killed_between_the_two_renames_restores_the_previous_checkpoint(tmp_path):
    """A process killed after moving the old checkpoint aside and before moving the new one in
    leaves ``.old-NAME-PID`` (complete) and ``.tmp-NAME-*``: the cleanup puts the old one back."""
    path = tmp_path / "model"
    old = _model()
    save_moe_checkpoint(old, None, None, path)
    save_moe_checkpoint(_model(seed=1), None, None, tmp_path / ".tmp-model-abc123")  # the unfinished new one
    os.rename(path, tmp_path / ".old-model-4242")
    ckpt_mod.clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    _assert_same_weights(load_pretrained_moe(path), old)
