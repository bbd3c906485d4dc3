"""Sharded checkpoints (torch.distributed.checkpoint): saved at FSDP 2 x EP 2 after two of
three steps, they load at EP 2 without FSDP, at TP 2, at PP 2 and in one process and continue exactly (the
third step ends with the weights of an uninterrupted one-process run); one saved at PP 2 loads in one
process; consolidation gives
the full config.json + model.safetensors that load_pretrained_moe reads; writing is atomic."""

import pickle
import shutil

import pytest
import torch
from helpers import tiny_config
from parallel.layouts_harness import assert_matches, make_optimizer, reference, run_ranks, steps, tp_step, train

from moe_lab import CheckpointError, MoEModel, load_pretrained_moe
from moe_lab.checkpoint.sharded import consolidate, is_sharded_checkpoint, load_sharded, save_sharded
from moe_lab.parallel import ParallelDims
from moe_lab.parallel.runtime import parallel_runtime


def _cfg():
    return tiny_config(vocab_size=96, moe_layer_frequency=2, router_jitter_noise=0.0).to_dict()


def _step3_ref(ref):
    """The reference's third step: its loss and gradient norm, and the final weights."""
    return {"losses": [ref["losses"][2], ref["losses"][5]], "state": ref["state"]}


def _body(rank, world, cfg, ckpt, ref):
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg)
    runtime = parallel_runtime(model, dims=ParallelDims(dp_shard=2, ep=2))
    opt = make_optimizer(model)
    train(model, steps()[:2], runtime, opt)
    save_sharded(model, opt, ckpt, extra={"scheduler": {"last_epoch": 2}})
    losses = train(model, steps()[2:], runtime, opt)
    assert_matches("fsdp2xep2 after saving", losses, runtime.full_state_dict(model), _step3_ref(ref))
    # another layout: EP 2 over two data-parallel replicas, no FSDP
    torch.manual_seed(1)  # different initial weights: the load must overwrite them all
    model = MoEModel.from_config(cfg)
    runtime = parallel_runtime(model, dims=ParallelDims(ep=2))
    opt = make_optimizer(model)
    assert load_sharded(model, opt, ckpt) == {"scheduler": {"last_epoch": 2}}
    losses = train(model, steps()[2:], runtime, opt)
    assert_matches("loaded at ep2", losses, runtime.full_state_dict(model), _step3_ref(ref))
    # and at TP 2 (the logits sharded over the vocabulary)
    torch.manual_seed(1)
    model = MoEModel.from_config(cfg)
    model.runtime = runtime = parallel_runtime(model, dims=ParallelDims(tp=2))
    opt = make_optimizer(model)
    load_sharded(model, opt, ckpt)
    losses = train(model, steps()[2:], runtime, opt, step_fn=tp_step)
    assert_matches("loaded at tp2", losses, runtime.full_state_dict(model), _step3_ref(ref))
    # and at PP 2: each rank holds (loads, then saves) only its stage's parameters
    torch.manual_seed(1)
    model = MoEModel.from_config(cfg)
    model.runtime = runtime = parallel_runtime(model, dims=ParallelDims(pp=2))
    opt = make_optimizer(model)
    load_sharded(model, opt, ckpt)
    losses = train(model, steps()[2:], runtime, opt)
    assert_matches("loaded at pp2", losses, runtime.full_state_dict(model), _step3_ref(ref))
    save_sharded(model, opt, ckpt + "-pp2-step3")


@pytest.mark.slow
def test_sharded_checkpoint_moves_between_layouts_and_consolidates(tmp_path):
    cfg = _cfg()
    ref = reference(cfg, steps())
    ckpt = tmp_path / "step-2"
    run_ranks(_body, 2, cfg, str(ckpt), ref)
    assert is_sharded_checkpoint(ckpt) and not list(tmp_path.glob(".tmp-*"))
    # saved at PP 2 (two stages' disjoint pieces), loaded in one process: the final weights
    model = MoEModel.from_config(cfg)
    load_sharded(model, make_optimizer(model), tmp_path / "step-2-pp2-step3")
    assert_matches("saved at pp2", _step3_ref(ref)["losses"], model.state_dict(), _step3_ref(ref))
    # one process: load, continue
    torch.manual_seed(1)
    model = MoEModel.from_config(cfg)
    opt = make_optimizer(model)
    load_sharded(model, opt, ckpt)
    after2 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = train(model, steps()[2:], None, opt)
    assert_matches("loaded in one process", losses, model.state_dict(), _step3_ref(ref))
    # consolidated: the full format, equal to the weights after two steps
    out = consolidate(ckpt, tmp_path / "full")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    full = load_pretrained_moe(str(out)).state_dict()
    for key, want in after2.items():
        torch.testing.assert_close(full[key], want, rtol=0, atol=0, msg=key)


class _RunsCode:
    """Pickles as a call of ``exec(code)``."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def test_sharded_save_is_atomic_and_load_checks_the_directory(tmp_path):
    model = MoEModel.from_config(_cfg())
    opt = make_optimizer(model)
    ckpt = tmp_path / "ckpt"
    save_sharded(model, opt, ckpt, extra={"step": 1})
    before = sorted(p.name for p in ckpt.rglob("*"))
    with pytest.raises(TypeError):  # extra is not JSON: the save fails after the shards are written
        save_sharded(model, opt, ckpt, extra={"step": object()})
    assert sorted(p.name for p in ckpt.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"], list(tmp_path.iterdir())
    fresh = MoEModel.from_config(_cfg())
    assert load_sharded(fresh, None, ckpt) == {"step": 1}
    for key, want in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], want, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        load_sharded(fresh, None, tmp_path)
    # DCP's .metadata is a pickle: a tampered one is refused, and what it names never runs
    marker = tmp_path / "executed"
    evil = tmp_path / "evil"
    shutil.copytree(ckpt, evil)
    (evil / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(f"open({str(marker)!r}, 'w').close()")))
    with pytest.raises(CheckpointError, match="not DCP metadata"):
        load_sharded(fresh, None, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="no optimizer state"):
        save_sharded(model, None, tmp_path / "weights-only")
        load_sharded(fresh, make_optimizer(fresh), tmp_path / "weights-only")
