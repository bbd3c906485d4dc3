"""Activation checkpointing (full, selective) is exact and really recomputes: two AdamW steps
with dropout, router jitter and the aux-loss-free bias give bit-identical losses and weights to
no checkpointing in one process; state_dict keys do not change; the layers run twice and save
fewer tensors; FSDP 2 × EP 2 and TP 2 with checkpointing on 2 gloo ranks equal one process."""

import pytest
import torch
from helpers import tiny_config
from parallel.layouts_harness import assert_matches, reference, run_ranks, steps, train

from moe_lab import MoEModel
from moe_lab.errors import ConfigError
from moe_lab.jobs import load_job
from moe_lab.parallel import ParallelDims
from moe_lab.parallel.layout import ParallelOptions
from moe_lab.training import MoETrainer
from moe_lab.training.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpointed_layer_indices,
    checkpointed_layers,
)

# three layers (0 and 2 MoE, 1 dense), every source of randomness on: attention/residual dropout,
# expert dropout (FFN experts), router jitter; and the aux-loss-free router bias
RANDOM_CFG = tiny_config(
    vocab_size=96, num_layers=3, moe_layer_frequency=1, dropout=0.1, attention_dropout=0.1,
    expert_type="ffn", activation="gelu", expert_dropout=0.1, router_jitter_noise=0.1,
    router_bias_update_rate=1e-3, capacity_factor=1.0,
).to_dict()


#: two AdamW steps of two micro-batches: the second step runs on weights and a router bias moved by the first
STEPS = 2


@pytest.fixture(scope="module")
def no_ac():
    return reference(RANDOM_CFG, steps(STEPS))


def _model(mode="none", every=2, cfg=RANDOM_CFG):
    torch.manual_seed(0)
    return apply_activation_checkpointing(MoEModel.from_config(cfg), mode, every)


def test_which_layers_are_checkpointed():
    assert checkpointed_layer_indices(5, "full") == [0, 1, 2, 3, 4]
    assert checkpointed_layer_indices(5, "selective", 2) == [0, 2, 4]
    assert checkpointed_layer_indices(5, "selective", 3) == [0, 3]
    assert checkpointed_layer_indices(5, "selective", 1) == checkpointed_layer_indices(5, "full")
    assert checkpointed_layer_indices(5, "none") == []


@pytest.mark.parametrize("mode, every, expected", [("full", 2, [0, 1, 2]), ("selective", 2, [0, 2])])
def test_checkpointing_is_exact(no_ac, mode, every, expected):
    model = _model(mode, every)
    assert checkpointed_layers(model) == expected
    losses = train(model, steps(STEPS))
    assert losses == no_ac["losses"]  # bit for bit: the recompute replays dropout and jitter
    state = model.state_dict()
    assert list(state) == list(no_ac["state"])
    for key, want in no_ac["state"].items():
        assert torch.equal(state[key], want), key
    # the aux-loss-free bias moved, so the check above covers it
    assert not torch.equal(state["layers.0.mlp.router.expert_bias"], torch.zeros(4))


def test_state_dict_and_parameter_names_do_not_change():
    plain, full = _model(), _model("full")
    assert list(full.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in full.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert not any("_checkpoint_wrapped_module" in k for k in full.state_dict())
    full.load_state_dict(plain.state_dict(), strict=True)  # checkpoints load either way
    plain.load_state_dict(full.state_dict(), strict=True)


def _forward_backward(model, counts):
    batch = steps(1)[0][0]
    hooks = [layer.attn.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, layer in enumerate(model.layers)]
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, info = model(batch["input_ids"], batch["attention_mask"], return_routing_info=True)
    num_saved = saved[0]
    (logits.float().logsumexp(-1).mean() + info["aux_loss"]).backward()
    for h in hooks:
        h.remove()
    return num_saved


def test_checkpointed_layers_run_again_in_backward_and_save_less():
    counts = {i: 0 for i in range(3)}
    saved_plain = _forward_backward(_model(), counts)
    assert counts == {0: 1, 1: 1, 2: 1}
    counts = {i: 0 for i in range(3)}
    saved_selective = _forward_backward(_model("selective"), counts)
    assert counts == {0: 2, 1: 1, 2: 2}  # layers 0 and 2 recomputed in backward, layer 1 not
    counts = {i: 0 for i in range(3)}
    saved_full = _forward_backward(_model("full"), counts)
    assert counts == {0: 2, 1: 2, 2: 2}
    assert saved_full < saved_selective < saved_plain, (saved_full, saved_selective, saved_plain)
    assert saved_full < saved_plain / 3


def test_no_grad_and_removal_run_layers_plainly():
    model = _model("full")
    counts = {i: 0 for i in range(3)}
    with torch.no_grad():
        hooks = [layer.attn.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
                 for i, layer in enumerate(model.layers)]
        model.eval()(torch.randint(0, 96, (2, 6)))
        for h in hooks:
            h.remove()
    assert counts == {0: 1, 1: 1, 2: 1}
    assert checkpointed_layers(apply_activation_checkpointing(model, "none")) == []


def test_settings_reach_the_model_from_the_trainer_and_the_job():
    model = MoEModel.from_config(RANDOM_CFG)
    MoETrainer(model, activation_checkpointing="selective", activation_checkpointing_every=2, progress_bar=False,
               tensorboard=False, fast_paths=False)
    assert checkpointed_layers(model) == [0, 2]
    job = load_job(None, ["training.activation_checkpointing=full", "training.activation_checkpointing_every=3"])
    assert (job.training.activation_checkpointing, job.training.activation_checkpointing_every) == ("full", 3)


def test_bad_settings_name_the_value():
    model = MoEModel.from_config(RANDOM_CFG)
    with pytest.raises(ConfigError, match="'some'"):
        apply_activation_checkpointing(model, "some")
    with pytest.raises(ConfigError, match="every must be an int >= 1, got 0"):
        apply_activation_checkpointing(model, "selective", every=0)
    with pytest.raises(ConfigError, match="'partial'"):
        ParallelOptions(activation_checkpointing="partial")
    with pytest.raises(ConfigError, match="activation_checkpointing = 'every'"):
        load_job(None, ["training.activation_checkpointing=every"])
    with pytest.raises(ConfigError, match="activation_checkpointing_every = 0"):
        load_job(None, ["training.activation_checkpointing_every=0"])
    with pytest.raises(ConfigError, match="Linear has none"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "full")


# ---- FSDP 2 × EP 2 and TP 2, with checkpointing, on 2 gloo ranks --------------------------------

def _layout_cfg():
    # layer 0 dense, layer 1 MoE (its experts a nested FSDP unit, all-to-all inside the checkpoint)
    return tiny_config(vocab_size=96, moe_layer_frequency=2, router_jitter_noise=0.0).to_dict()


def _layouts_body(rank, world, cfg, ref):
    from parallel.layouts_harness import tp_step

    from moe_lab.parallel.runtime import parallel_runtime

    for name, dims, step_fn in (("fsdp2xep2+ac", ParallelDims(dp_shard=2, ep=2), None),
                                ("tp2+ac", ParallelDims(tp=2), tp_step)):
        torch.manual_seed(0)
        model = MoEModel.from_config(cfg)
        model.runtime = runtime = parallel_runtime(model, dims=dims,
                                                   options=ParallelOptions(activation_checkpointing="full"))
        assert checkpointed_layers(model) == [0, 1], name
        calls = [0]
        model.layers[1].mlp.experts.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        losses = train(model, steps(), runtime, step_fn=step_fn)
        assert calls[0] == 3 * 2 * 2, (name, calls)  # steps × micro-batches × (forward + recompute)
        assert_matches(name, losses, runtime.full_state_dict(model), ref)


@pytest.mark.slow
def test_fsdp_ep_and_tp_with_checkpointing_match_one_process():
    cfg = _layout_cfg()
    run_ranks(_layouts_body, 2, cfg, reference(cfg, steps()))
