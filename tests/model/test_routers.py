import math

import pytest
import torch

from moe_lab import ExpertChoiceRouter, RouterError, SwitchRouter, TopKRouter
from moe_lab.model.routers import load_balancing_loss, router_z_loss


def _rigged(router, prefs):
    """Make the router's logits equal `prefs[e]` for every token whose hidden state is one-hot."""
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[:, 0] = torch.tensor(prefs, dtype=torch.float32)
    return router


def _ones(n, d):
    x = torch.zeros(n, d)
    x[:, 0] = 1.0
    return x


# ---- top-k -------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_picks_k_distinct_best_experts(k):
    r = TopKRouter(16, 5, top_k=k)
    x = torch.randn(20, 16)
    w, idx, info = r(x)
    assert idx.shape == (20, k) and w.shape == (20, k)
    assert all(len(set(row.tolist())) == k for row in idx)
    expected = info["router_probs"].topk(k, dim=-1).indices
    assert torch.equal(idx, expected)
    assert torch.allclose(w.sum(-1), torch.ones(20))
    assert int(info["expert_counts"].sum()) == 20 * k
    assert float(info["dropped_fraction"]) == 0.0


def test_topk_unnormalised_weights_are_raw_probs():
    r = TopKRouter(8, 4, top_k=2, normalize_weights=False)
    x = torch.randn(6, 8)
    w, idx, info = r(x)
    assert torch.allclose(w, info["router_probs"].gather(1, idx))


def test_router_math_is_fp32_under_autocast():
    r = TopKRouter(8, 4).to(torch.bfloat16)
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, _, info = r(x)
    assert info["router_logits"].dtype == torch.float32 and w.dtype == torch.float32


def test_topk_padding_not_routed_or_counted():
    r = TopKRouter(8, 4, top_k=2)
    x = torch.randn(6, 8)
    mask = torch.tensor([1, 1, 1, 0, 1, 0], dtype=torch.bool)
    w, idx, info = r(x, token_mask=mask)
    assert (idx[~mask] == -1).all() and (w[~mask] == 0).all()
    assert int(info["expert_counts"].sum()) == 4 * 2
    # the losses ignore padded rows entirely: same as calling on the real rows only
    _, _, ref = r(x[mask])
    assert torch.allclose(info["load_balancing_loss"], ref["load_balancing_loss"])
    assert torch.allclose(info["router_z_loss"], ref["router_z_loss"])


def test_topk_capacity_priority_first_choice_then_token_order():
    r = _rigged(TopKRouter(4, 4, top_k=2, capacity_factor=0.5), [4.0, 3.0, 0.0, 0.0])
    x = _ones(8, 4)
    _, idx, info = r(x)
    # capacity = ceil(0.5 * 8 * 2 / 4) = 2 per expert: first two tokens keep both slots
    assert torch.equal(idx[:2], torch.tensor([[0, 1], [0, 1]]))
    assert (idx[2:] == -1).all()
    assert info["expert_counts"].tolist() == [2, 2, 0, 0]
    assert float(info["dropped_fraction"]) == pytest.approx(12 / 16)


def test_gradients_reach_the_router():
    r = TopKRouter(8, 4, top_k=2)
    x = torch.randn(10, 8)
    w, _, info = r(x)
    (w.square().sum() + info["load_balancing_loss"] + info["router_z_loss"]).backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0


# ---- switch ------------------------------------------------------------------------------
def test_switch_exact_capacity_and_dropping():
    r = _rigged(SwitchRouter(4, 4, capacity_factor=1.0, jitter_noise=0.0), [5.0, 1.0, 0.0, 0.0])
    x = _ones(8, 4)
    w, idx, info = r(x)
    cap = math.ceil(1.0 * 8 / 4)
    assert cap == 2
    assert idx[:, 0].tolist() == [0, 0, -1, -1, -1, -1, -1, -1]  # later tokens dropped
    assert info["expert_counts"].tolist() == [2, 0, 0, 0]
    assert float(info["dropped_fraction"]) == pytest.approx(6 / 8)
    # weight is the raw top-1 probability, zero where dropped
    p0 = torch.softmax(torch.tensor([5.0, 1.0, 0.0, 0.0]), 0)[0]
    assert torch.allclose(w[:2, 0], p0.expand(2)) and (w[2:] == 0).all()


def test_switch_capacity_counts_real_tokens_only():
    r = _rigged(SwitchRouter(4, 2, capacity_factor=1.0, jitter_noise=0.0), [5.0, 0.0])
    x = _ones(6, 4)
    mask = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    _, idx, info = r(x, token_mask=mask)
    # 4 real tokens -> capacity ceil(4/2) = 2
    assert idx[:, 0].tolist() == [0, 0, -1, -1, -1, -1]
    assert float(info["dropped_fraction"]) == pytest.approx(2 / 4)


def test_switch_without_dropping_keeps_everyone():
    r = _rigged(SwitchRouter(4, 4, capacity_factor=1.0, drop_tokens=False, jitter_noise=0.0), [5.0, 1.0, 0, 0])
    _, idx, info = r(_ones(8, 4))
    assert (idx[:, 0] == 0).all() and float(info["dropped_fraction"]) == 0.0


def test_switch_jitter_only_in_training():
    r = SwitchRouter(8, 4, jitter_noise=0.5)
    x = torch.randn(32, 8)
    _, _, a = r(x, training=False)
    _, _, b = r(x, training=False)
    assert torch.equal(a["router_logits"], b["router_logits"])
    _, _, c = r(x, training=True)
    assert not torch.allclose(a["router_logits"], c["router_logits"])


# ---- expert choice -----------------------------------------------------------------------
def test_expert_choice_each_expert_picks_capacity_best_tokens():
    r = ExpertChoiceRouter(8, 4, capacity_factor=1.0, top_k=2)
    x = torch.randn(10, 8)
    w, idx, info = r(x, training=True)
    cap = math.ceil(1.0 * 10 * 2 / 4)
    assert r.capacity(10) == cap == 5
    assert idx.shape == (10, 4)
    assert info["expert_counts"].tolist() == [cap] * 4
    probs = info["router_probs"]
    for e in range(4):
        picked = set((idx[:, e] == e).nonzero().squeeze(-1).tolist())
        assert picked == set(probs[:, e].topk(cap).indices.tolist())
        assert torch.allclose(w[:, e], probs[:, e] * (idx[:, e] == e))
    unrouted = (idx < 0).all(-1).float().mean()
    assert float(info["dropped_fraction"]) == pytest.approx(float(unrouted))


def test_expert_choice_no_drop_sends_unpicked_tokens_to_top1():
    r = _rigged(ExpertChoiceRouter(4, 2, capacity_factor=0.5, drop_tokens=False, top_k=1), [3.0, 0.0])
    x = torch.randn(8, 4)
    x[:, 0] = torch.linspace(-1, 1, 8)
    _, idx, info = r(x, training=True)
    assert ((idx >= 0).any(-1)).all()
    assert float(info["dropped_fraction"]) == 0.0


def test_expert_choice_padding_never_picked():
    r = ExpertChoiceRouter(8, 4, capacity_factor=2.0, top_k=2)
    x = torch.randn(8, 8)
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    _, idx, info = r(x, training=True, token_mask=mask)
    assert (idx[~mask] == -1).all()
    assert info["expert_counts"].tolist() == [r.capacity(5)] * 4


def test_expert_choice_eval_is_causal_token_choice():
    r = ExpertChoiceRouter(8, 4, top_k=2)
    x = torch.randn(6, 8)
    w_all, idx_all, _ = r(x, training=False)
    # one token at a time (decoding) gives the same routing as the whole sequence
    for t in range(6):
        w_t, idx_t, _ = r(x[t : t + 1], training=False)
        assert torch.equal(idx_t[0], idx_all[t]) and torch.allclose(w_t[0], w_all[t])
    assert idx_all.shape == (6, 2)


def test_expert_choice_eval_expert_choice_single_token_goes_to_every_expert():
    r = ExpertChoiceRouter(8, 4, top_k=2, eval_routing="expert_choice")
    w, idx, _ = r(torch.randn(1, 8), training=False)
    assert idx[0].tolist() == [0, 1, 2, 3]
    assert torch.allclose(w.sum(), torch.tensor(1.0))


# ---- expert choice is not causal in training ------------------------------------------
# Two experts, capacity 2 of 4 tokens; the gate scores a token by its hidden feature 0:
# expert 0 prefers large values, expert 1 small ones. Token 0 (0.5) is in expert 0's top 2
# of [0.5, 1.0, -1.0, -2.0]; raising one other token to 2.0 pushes it out of expert 0's
# top 2 and into expert 1's. So token 0's routing depends on a token it cannot see.
EC_VALUES = [0.5, 1.0, -1.0, -2.0]


def _ec_layer(**kw):
    from helpers import tiny_config

    from moe_lab import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(tiny_config(router_type="expert_choice", num_experts=2, experts_per_token=1,
                                 capacity_factor=1.0, **kw))
    _rigged(layer.router, [1.0, -1.0])
    return layer


def _ec_input(shape, changed=None):
    x = torch.randn(32, generator=torch.Generator().manual_seed(1)).repeat(4, 1)  # only feature 0 differs
    x[:, 0] = torch.tensor(EC_VALUES)
    x = x.view(*shape, 32)
    if changed is not None:
        x[changed + (0,)] = 2.0
    return x


def test_expert_choice_router_training_routing_depends_on_other_tokens():
    r = _rigged(ExpertChoiceRouter(4, 2, capacity_factor=1.0, top_k=1), [1.0, -1.0])
    assert r.capacity(4) == 2
    x = _ones(4, 4)
    x[:, 0] = torch.tensor(EC_VALUES)
    w, idx, _ = r(x, training=True)
    x2 = x.clone()
    x2[3, 0] = 2.0  # a later token
    w2, idx2, _ = r(x2, training=True)
    assert idx[0].tolist() == [0, -1] and idx2[0].tolist() == [-1, 1]
    assert w[0, 0] > 0 and w[0, 1] == 0 and w2[0, 0] == 0 and w2[0, 1] > 0
    # eval with the default token-choice routing: token 0 keeps its expert and weight
    we, idxe, _ = r(x, training=False)
    we2, idxe2, _ = r(x2, training=False)
    assert idxe[0].tolist() == idxe2[0].tolist() == [0]
    assert torch.equal(we[0], we2[0])


@pytest.mark.parametrize(
    "shape, changed",
    [((1, 4), (0, 3)), ((2, 2), (1, 0))],
    ids=["later-position-same-sequence", "other-sequence"],
)
def test_expert_choice_layer_output_not_causal_in_training_causal_in_eval(shape, changed):
    layer = _ec_layer()
    assert layer.router.eval_routing == "token_choice"  # the config default
    x, x2 = _ec_input(shape), _ec_input(shape, changed)
    with torch.no_grad():
        layer.train()
        y, info = layer(x)
        y2, info2 = layer(x2)
        layer.eval()
        ye, infoe = layer(x)
        ye2, infoe2 = layer(x2)
        alone = layer(x[:1, :1])[0][0, 0]  # token 0 on its own, as in one-token decoding
    # training: token 0 moves from expert 0 to expert 1, and its output changes
    assert info["expert_indices"][0].tolist() == [0, -1] and info2["expert_indices"][0].tolist() == [-1, 1]
    assert y[0, 0].norm() > 0 and (y[0, 0] - y2[0, 0]).norm() > 0.1 * y[0, 0].norm()
    # eval (token choice): token 0 keeps expert 0 and its output
    assert infoe["expert_indices"][0].tolist() == infoe2["expert_indices"][0].tolist() == [0]
    tol = dict(rtol=1e-5, atol=1e-6 * float(ye[0, 0].abs().max()))  # the outputs are small (init std 0.02)
    assert ye[0, 0].norm() > 0
    torch.testing.assert_close(ye2[0, 0], ye[0, 0], **tol)
    torch.testing.assert_close(alone, ye[0, 0], **tol)


def test_expert_choice_eval_routing_expert_choice_is_not_causal_in_eval_either():
    layer = _ec_layer(expert_choice_eval_routing="expert_choice").eval()
    _, info = layer(_ec_input((1, 4)))
    _, info2 = layer(_ec_input((1, 4), (0, 3)))
    assert info["expert_indices"][0].tolist() == [0, -1] and info2["expert_indices"][0].tolist() == [-1, 1]


def test_expert_choice_model_eval_logits_do_not_see_later_tokens_or_other_sequences():
    from helpers import tiny_config

    from moe_lab import MoEModel

    torch.manual_seed(0)
    model = MoEModel.from_config(tiny_config(router_type="expert_choice")).eval()
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = model(ids)
    changed = ids.clone()
    changed[0, 5:] = (ids[0, 5:] + 1) % 97  # later tokens of sequence 0
    changed[1] = (ids[1] + 7) % 97  # all of sequence 1
    with torch.no_grad():
        out = model(changed)
    torch.testing.assert_close(out[0, :5], ref[0, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids[:1, :5])[0], ref[0, :5], rtol=1e-5, atol=1e-5)  # = the prefix alone
    assert not torch.allclose(out[0, 5:], ref[0, 5:])  # the changed positions themselves do change


# ---- losses by hand ----------------------------------------------------------------------
def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    counts = torch.tensor([2, 1, 1])  # top-1 selections: experts 0, 1, 0, 2
    # f = [0.5, 0.25, 0.25]; P = [0.4, 0.375, 0.225]; E * sum(f * P)
    expected = 3 * (0.5 * 0.4 + 0.25 * 0.375 + 0.25 * 0.225)
    got = load_balancing_loss(probs, counts, torch.tensor(4.0))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_load_balancing_loss_is_one_when_uniform():
    probs = torch.full((8, 4), 0.25)
    assert float(load_balancing_loss(probs, torch.tensor([2, 2, 2, 2]), torch.tensor(8.0))) == pytest.approx(1.0)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert float(router_z_loss(logits, torch.tensor(2.0))) == pytest.approx(expected, rel=1e-6)


def test_router_losses_match_hand_values_end_to_end():
    r = TopKRouter(3, 3, top_k=1)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(3))
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    _, idx, info = r(x)
    probs = torch.softmax(x, -1)
    f = torch.tensor([2, 1, 1]) / 4
    assert float(info["load_balancing_loss"].detach()) == pytest.approx(float(3 * (f * probs.mean(0)).sum()), rel=1e-6)
    assert float(info["router_z_loss"].detach()) == pytest.approx(float(torch.logsumexp(x, -1).square().mean()), rel=1e-6)


# ---- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=8, num_experts=2, top_k=3), r"top_k \(3\)"),
        (dict(hidden_size=8, num_experts=0), r"num_experts"),
        (dict(hidden_size=8, num_experts=1025), r"1025"),
        (dict(hidden_size=0, num_experts=4), r"hidden_size"),
        (dict(hidden_size=8, num_experts=4, capacity_factor=-1.0), r"capacity_factor"),
    ],
)
def test_router_bad_arguments(kwargs, match):
    with pytest.raises(RouterError, match=match):
        TopKRouter(**kwargs)


def test_router_wrong_hidden_size():
    with pytest.raises(RouterError, match=r"\[tokens, 8\]"):
        TopKRouter(8, 4)(torch.randn(3, 5))
