import json
import struct

import pytest
import torch
from helpers import tiny_config

from moe_lab import CheckpointError, MoEModel
from moe_lab.training import latest_checkpoint, load_pretrained_moe, save_moe_checkpoint
from moe_lab.training import checkpoint as ckpt_mod
from moe_lab.training.trainer import default_optimizer


def _model(**kw):
    torch.manual_seed(0)
    return MoEModel.from_config(tiny_config(**kw)).eval()


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


def test_weights_file_holds_no_pickle(tmp_path):
    path = save_moe_checkpoint(_model(), None, None, tmp_path / "c")
    raw = (path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert "embed_tokens.weight" in header
    assert b"\x80\x04" not in raw[:2] and not raw.startswith(b"PK")  # no pickle protocol / zip (torch.save)
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin"))


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


def test_overrides_apply_on_load(tmp_path):
    path = save_moe_checkpoint(_model(dropout=0.1), None, None, tmp_path / "c")
    assert load_pretrained_moe(path, dropout=0.0, moe_backend="eager").config.moe_backend == "eager"


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m = _model()
    ckpts = tmp_path / "checkpoints"
    save_moe_checkpoint(m, None, None, ckpts / "step-000001")

    def exploding_save(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "save_file", exploding_save)
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


def test_overwrite_is_atomic(tmp_path):
    path = tmp_path / "model"
    save_moe_checkpoint(_model(), None, None, path)
    m2 = _model(dropout=0.2)
    save_moe_checkpoint(m2, None, None, path)
    assert load_pretrained_moe(path).config.dropout == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
