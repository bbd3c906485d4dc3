"""Shared experts (ungated and Qwen2-MoE's sigmoid gate, GLU and FFN) and QK-norm, checked
against outputs computed by hand from the weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from moe_lab import ConfigError, MoEModel
from moe_lab.inference.generate import KVCache
from moe_lab.model.experts import out_proj_std
from moe_lab.model.moe_layer import MoELayer
from moe_lab.model.transformer import Attention, RotaryEmbedding, apply_rotary

SHARED = {
    "glu": dict(num_shared_experts=1),
    "glu-gated": dict(num_shared_experts=2, shared_expert_gate=True),
    "ffn": dict(num_shared_experts=1, expert_type="ffn", activation="gelu", shared_expert_intermediate_size=40),
    "ffn-gated": dict(num_shared_experts=1, expert_type="ffn", activation="relu", shared_expert_gate=True),
}


def _layer(seed=0, **overrides):
    torch.manual_seed(seed)
    layer = MoELayer(tiny_config(**overrides)).eval()
    with torch.no_grad():  # unit-scale weights, so the shared part is not negligible
        for p in layer.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return layer


def _shared_by_hand(layer, cfg, x_TD):
    """``g * shared(x)`` from the raw weights (no module calls)."""
    mlp = layer.shared_experts
    if cfg.expert_type.value == "glu":
        w = mlp.gate_up.weight
        inner = w.shape[0] // 2
        act = F.silu if cfg.activation.value == "swiglu" else F.gelu
        h = act(x_TD @ w[:inner].T) * (x_TD @ w[inner:].T)
    else:
        act = F.gelu if cfg.activation.value == "gelu" else F.relu
        h = act(x_TD @ mlp.up.weight.T)
    s = h @ mlp.down.weight.T
    if cfg.shared_expert_gate:
        s = torch.sigmoid(x_TD @ layer.shared_expert_gate.weight.T) * s  # [T, 1] * [T, D]
    return s


@pytest.mark.parametrize("name", list(SHARED))
def test_output_is_routed_plus_gated_shared(name):
    cfg = tiny_config(**SHARED[name])
    layer = _layer(**SHARED[name])
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, info = layer(x)
        shared = layer.shared_experts
        layer.shared_experts = None  # the routed part alone
        routed, _ = layer(x)
        layer.shared_experts = shared
        want = routed.reshape(-1, cfg.hidden_size) + _shared_by_hand(layer, cfg, x.reshape(-1, cfg.hidden_size))
    assert torch.allclose(y.reshape(-1, cfg.hidden_size), want, atol=1e-6)
    assert (routed - y).abs().max() > 0.1  # the shared part matters
    width = cfg.shared_intermediate_size
    assert width == {"glu": 48, "glu-gated": 96, "ffn": 40, "ffn-gated": 48}[name]
    w_in = shared.gate_up.weight if cfg.expert_type.value == "glu" else shared.up.weight
    assert w_in.shape == ((2 if cfg.expert_type.value == "glu" else 1) * width, cfg.hidden_size)
    assert (layer.shared_expert_gate is not None) == cfg.shared_expert_gate


def test_one_token_by_hand():
    """D=2, one shared GLU expert of width 1, gated; the routed experts' output is zeroed."""
    layer = MoELayer(tiny_config(hidden_size=2, num_attention_heads=1, expert_hidden_size=1, num_experts=2,
                                 experts_per_token=1, num_shared_experts=1, shared_expert_gate=True)).eval()
    with torch.no_grad():
        layer.experts.w_out.zero_()
        layer.shared_experts.gate_up.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # gate, up
        layer.shared_experts.down.weight.copy_(torch.tensor([[1.0], [-3.0]]))
        layer.shared_expert_gate.weight.copy_(torch.tensor([[0.5, 0.5]]))
        y, _ = layer(torch.tensor([[[1.0, 1.0]]]))
    h = F.silu(torch.tensor(1.0)) * 2.0  # silu(gate . x) * (up . x)
    g = torch.sigmoid(torch.tensor(1.0))
    assert torch.allclose(y.reshape(2), g * h * torch.tensor([1.0, -3.0]), atol=1e-6)


@pytest.mark.parametrize("name", ["glu-gated", "ffn"])
def test_padded_tokens_get_zero_and_no_gradient(name):
    layer = _layer(**SHARED[name])
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, :2] = False
    y, _ = layer(x, mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert y[mask].abs().min() > 0
    y.pow(2).sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    shared = [p for n, p in layer.named_parameters() if n.startswith("shared_expert")]
    assert len(shared) == (3 if name == "glu-gated" else 2)
    for p in shared:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the padded rows changed nothing: the gradients equal those of the real tokens alone
    real = x.detach()[mask].reshape(1, -1, 32)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    y2, _ = layer(real)
    y2.pow(2).sum().backward()
    for n, p in layer.named_parameters():
        if n.startswith("shared_expert"):
            assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_gradient_of_the_gate_by_hand():
    """d/dw of sum(sigmoid(x.w) * s(x)) is sum_t sigmoid'(x_t.w) * sum(s(x_t)) * x_t."""
    layer = _layer(**SHARED["glu-gated"])
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    layer.shared_output(x).sum().backward()
    with torch.no_grad():
        s = layer.shared_experts(x)  # [T, D]
        z = x @ layer.shared_expert_gate.weight.T  # [T, 1]
        want = ((torch.sigmoid(z) * (1 - torch.sigmoid(z))) * s.sum(-1, keepdim=True) * x).sum(0, keepdim=True)
    assert torch.allclose(layer.shared_expert_gate.weight.grad, want, atol=1e-5)


def test_init_std_and_model_init_leaves_them_alone():
    std, layers = 0.1, 4
    cfg = dict(hidden_size=256, num_attention_heads=4, expert_hidden_size=256, num_layers=layers,
               initializer_range=std, num_shared_experts=2, shared_expert_gate=True)
    torch.manual_seed(0)
    model = MoEModel(config=tiny_config(**cfg))
    mlp = model.layers[1].mlp
    assert mlp.shared_experts.gate_up.weight.std().item() == pytest.approx(std, rel=0.03)
    assert mlp.shared_experts.down.weight.std().item() == pytest.approx(out_proj_std(std, layers), rel=0.03)
    assert mlp.shared_expert_gate.weight.std().item() == pytest.approx(std, rel=0.2)  # 256 values


def test_config_and_parameter_counts():
    with pytest.raises(ConfigError, match="shared_expert_gate needs num_shared_experts"):
        tiny_config(shared_expert_gate=True)
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size needs num_shared_experts"):
        tiny_config(shared_expert_intermediate_size=8)
    plain = MoEModel(config=tiny_config())
    shared = MoEModel(config=tiny_config(num_shared_experts=1, shared_expert_gate=True))
    per_layer = 3 * 32 * 48 + 32  # gate/up/down of width 48 + the gate's [1, D]
    assert shared.num_parameters() - plain.num_parameters() == 2 * per_layer
    # shared experts are always active
    assert shared.num_parameters(active_only=True) - plain.num_parameters(active_only=True) == 2 * per_layer
    assert not any("shared" in n for n in shared.expert_parameter_names())  # replicated under EP


def test_model_trains_with_shared_experts():
    torch.manual_seed(0)
    model = MoEModel(config=tiny_config(num_shared_experts=1, shared_expert_gate=True, qk_norm=True))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, info = model(ids, return_routing_info=True)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)) + info["aux_loss"]
    loss.backward()
    for name in ("layers.0.mlp.shared_experts.gate_up.weight", "layers.1.mlp.shared_expert_gate.weight",
                 "layers.0.attn.q_norm.weight", "layers.1.attn.k_norm.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


# ---- QK-norm ------------------------------------------------------------------------------


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_qk_norm_normalises_each_head_before_rope():
    cfg = tiny_config(qk_norm=True, num_key_value_heads=2, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    attn = Attention(cfg, 0)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (cfg.head_dim,)
    x = torch.randn(2, 5, 32)
    cos, sin = RotaryEmbedding(cfg.head_dim, 64, cfg.rope_theta)(torch.arange(5).expand(2, 5))
    with torch.no_grad():
        q, k, v = attn.project(x, cos, sin)
        q_raw = (x @ attn.q_proj.weight.T).view(2, 5, 4, 8)
        k_raw = (x @ attn.k_proj.weight.T).view(2, 5, 2, 8)
        want_q = apply_rotary(_rms(q_raw, attn.q_norm.weight, 1e-5).transpose(1, 2), cos, sin)
        want_k = apply_rotary(_rms(k_raw, attn.k_norm.weight, 1e-5).transpose(1, 2), cos, sin)
    assert torch.allclose(q, want_q, atol=1e-6) and torch.allclose(k, want_k, atol=1e-6)
    assert torch.allclose(v, (x @ attn.v_proj.weight.T).view(2, 5, 2, 8).transpose(1, 2))
    # scaling a head's projection changes nothing after the norm (up to eps)
    with torch.no_grad():
        attn.q_proj.weight.mul_(10.0)
        q10, _, _ = attn.project(x, cos, sin)
    assert torch.allclose(q10, q, atol=2e-3)


def test_qk_norm_off_has_no_norms_and_on_changes_the_output():
    off = MoEModel(config=tiny_config())
    assert off.layers[0].attn.q_norm is None and not any("q_norm" in n for n in off.state_dict())
    torch.manual_seed(0)
    on = MoEModel(config=tiny_config(qk_norm=True)).eval()
    sd = on.state_dict()
    assert torch.equal(sd["layers.0.attn.q_norm.weight"], torch.ones(8))  # init: ones (not touched by _init_weights)
    torch.manual_seed(0)
    plain = MoEModel(config=tiny_config()).eval()
    plain.load_state_dict({k: v for k, v in sd.items() if not k.endswith(("attn.q_norm.weight", "attn.k_norm.weight"))})
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert (on(ids) - plain(ids)).abs().max() > 1e-3


def test_qk_norm_with_kv_cache_equals_the_full_forward():
    torch.manual_seed(0)
    model = MoEModel(config=tiny_config(qk_norm=True, num_shared_experts=1, shared_expert_gate=True)).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2, max_length=9)
        first = model(ids[:, :6], kv_cache=cache)
        steps = [model(ids[:, i : i + 1], kv_cache=cache) for i in range(6, 9)]
    got = torch.cat([first] + steps, dim=1)
    assert torch.allclose(got, full, atol=1e-5)
