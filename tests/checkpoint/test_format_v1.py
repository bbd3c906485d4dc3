"""Old checkpoints still load: ``tests/fixtures/checkpoint_v1`` was written by the code before
the ``moe_lab.checkpoint`` package (see ``tests/fixtures/make_checkpoint_v1.py``), and every
part of it reads back through ``Checkpoint.open``: config, weights (bitwise, by sha256),
tokenizer, trainer state, optimizer and scheduler state."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from moe_lab.checkpoint import Checkpoint, TrainingState, load_pretrained_moe
from moe_lab.config import MoEConfig
from moe_lab.training.optim import default_optimizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def _digest(t):
    t = t.detach().contiguous().cpu()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sha256": hashlib.sha256(raw).hexdigest()}


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(FIXTURE)


def test_the_fixture_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in FIXTURE.iterdir()}
    assert sum(files.values()) < 300_000
    assert {"config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "trainer_state.json", "tokenizer_config.json", "tokenizer.json"} <= set(files)


def test_config(ckpt):
    assert ckpt.format == "moe_lab" and ckpt.model_type is None
    assert ckpt.config == MoEConfig.from_dict(EXPECTED["config"])
    stored = ckpt.config.to_dict()
    # every field the old checkpoint wrote reads back unchanged; fields added since then
    # take their defaults (an old checkpoint means what it meant when it was written)
    assert {k: stored[k] for k in EXPECTED["config"]} == EXPECTED["config"]
    defaults = MoEConfig(vocab_size=8, hidden_size=8, num_attention_heads=1).to_dict()
    added = set(stored) - set(EXPECTED["config"])
    assert {k: stored[k] for k in added} == {k: defaults[k] for k in added}


@pytest.mark.parametrize("lazy", [False, True])
def test_weights_bitwise(ckpt, lazy):
    weights = ckpt.weights(lazy=lazy)
    assert set(weights) == set(EXPECTED["weights"])
    for name, want in EXPECTED["weights"].items():
        assert _digest(weights[name]) == want, name


def test_built_model_holds_the_stored_weights(ckpt):
    model = ckpt.build_model()
    state = model.state_dict()
    for name, want in EXPECTED["weights"].items():
        assert _digest(state[name]) == want, name
    again = load_pretrained_moe(FIXTURE)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())
    ids = torch.tensor([ckpt.tokenizer().encode(EXPECTED["tokenizer"]["text"])])
    assert torch.isfinite(model.eval()(ids)).all()


def test_tokenizer(ckpt):
    tok = ckpt.tokenizer()
    assert ckpt.has_tokenizer and type(tok).__name__ == EXPECTED["tokenizer"]["class"]
    assert tok.encode(EXPECTED["tokenizer"]["text"]) == EXPECTED["tokenizer"]["ids"]
    assert tok.decode(EXPECTED["tokenizer"]["ids"]) == EXPECTED["tokenizer"]["text"]


def test_training_state(ckpt):
    state = ckpt.training_state()
    assert isinstance(state, TrainingState)
    assert state.trainer_state == EXPECTED["trainer_state"]
    assert state.scheduler == EXPECTED["scheduler"]
    assert state.optimizer_meta["class"] == EXPECTED["optimizer_class"]
    assert set(state.optimizer_tensors) == set(EXPECTED["optimizer"])
    for key, want in EXPECTED["optimizer"].items():
        assert _digest(state.optimizer_tensors[key]) == want, key
    assert ckpt.routing_stats() is None  # save_moe_checkpoint writes none


def test_optimizer_and_scheduler_state_restore(ckpt):
    model = ckpt.build_model()
    opt = default_optimizer(model, 1e-3, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    ckpt.training_state().apply(model, opt, sched)
    names = {id(p): n for n, p in model.named_parameters()}
    restored = {f"{names[id(p)]}::{k}": _digest(v) for p, st in opt.state.items() for k, v in st.items()
                if isinstance(v, torch.Tensor)}
    assert restored == EXPECTED["optimizer"]
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert groups == EXPECTED["param_groups"]
    assert sched.last_epoch == EXPECTED["scheduler"]["last_epoch"]
    assert sched.get_last_lr() == EXPECTED["scheduler"]["_last_lr"]
