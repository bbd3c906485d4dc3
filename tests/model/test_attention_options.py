"""Attention options: an explicit ``head_dim`` (Qwen3-MoE) and q/k/v biases (``attention_bias``, Qwen2-MoE)."""

import json

import pytest
import torch
from helpers import tiny_config

from moe_lab import ConfigError, MoEConfig, MoEModel
from moe_lab.inference.generate import KVCache
from moe_lab.training import load_pretrained_moe, save_moe_checkpoint
from moe_lab.training.optim import default_optimizer


def _randomize_biases(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


# ---- config ------------------------------------------------------------------------------


def test_head_dim_defaults_to_hidden_over_heads_and_follows_changes():
    cfg = MoEConfig(hidden_size=64, num_attention_heads=4)
    assert cfg.head_dim == 16 and cfg.attention_bias is False
    assert cfg.to_dict()["head_dim"] is None  # derived: saved as null
    assert cfg.replace(hidden_size=128).head_dim == 32
    cfg.hidden_size = 128
    assert cfg.head_dim == 32
    explicit = cfg.replace(head_dim=8)
    assert explicit.head_dim == 8 and explicit.to_dict()["head_dim"] == 8
    assert explicit.replace(hidden_size=256).head_dim == 8  # an explicit value is kept
    explicit.head_dim = None
    assert explicit.head_dim == 32 and explicit.to_dict()["head_dim"] is None


def test_head_dim_json_round_trip_is_exact(tmp_path):
    for cfg in (MoEConfig(hidden_size=64, num_attention_heads=4), MoEConfig(hidden_size=64, num_attention_heads=4,
                                                                           head_dim=32, attention_bias=True)):
        cfg.to_json(tmp_path / "c.json")
        back = MoEConfig.from_json(tmp_path / "c.json")
        assert back == cfg and back.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "fields, needle",
    [
        (dict(head_dim=0), "head_dim = 0"),
        (dict(head_dim=7), "head_dim (7) must be even"),
        (dict(hidden_size=66, num_attention_heads=4), "hidden_size (66) must be divisible by num_attention_heads (4)"),
        (dict(hidden_size=12, num_attention_heads=4), "(3) must be even"),
    ],
)
def test_bad_head_dims_are_refused_naming_the_value(fields, needle):
    with pytest.raises(ConfigError) as err:
        MoEConfig(**fields)
    assert needle in str(err.value)


def test_an_explicit_head_dim_frees_hidden_size_from_the_heads():
    assert MoEConfig(hidden_size=66, num_attention_heads=4, head_dim=16).head_dim == 16


# ---- the model ---------------------------------------------------------------------------


def test_explicit_head_dim_sets_the_projection_and_rope_shapes():
    cfg = tiny_config(head_dim=12, num_key_value_heads=2, qk_norm=True)  # hidden 32, 4 heads: 8 derived
    model = MoEModel(config=cfg)
    attn = model.layers[0].attn
    assert attn.q_proj.weight.shape == (4 * 12, 32) and attn.k_proj.weight.shape == (2 * 12, 32)
    assert attn.v_proj.weight.shape == (2 * 12, 32) and attn.o_proj.weight.shape == (32, 4 * 12)
    assert attn.q_norm.weight.shape == (12,) and model.rotary.inv_freq.shape == (6,)
    assert model(torch.randint(0, 97, (2, 5))).shape == (2, 5, 97)


def test_attention_bias_puts_zero_initialised_biases_on_q_k_v_only():
    model = MoEModel(config=tiny_config(attention_bias=True, num_key_value_heads=2))
    attn = model.layers[1].attn
    assert attn.o_proj.bias is None
    for proj, n in ((attn.q_proj, 32), (attn.k_proj, 16), (attn.v_proj, 16)):
        assert proj.bias.shape == (n,) and torch.equal(proj.bias, torch.zeros(n))
    assert not any(k.endswith("bias") for k in MoEModel(config=tiny_config()).state_dict())


def test_attention_biases_change_the_output_and_are_trained():
    torch.manual_seed(0)
    model = MoEModel(config=tiny_config(attention_bias=True))
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        before = model(ids)
        model.layers[0].attn.v_proj.bias.fill_(0.5)  # v's bias passes through softmax weights unchanged
        assert (model(ids) - before).abs().max() > 1e-3
    opt = default_optimizer(model, 1e-2, 0.0)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    for n in start:
        assert not torch.equal(start[n], dict(model.named_parameters())[n]), n


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kv_cache_decode_equals_the_full_forward_with_head_dim_and_biases(kv_heads):
    torch.manual_seed(0)
    cfg = tiny_config(head_dim=16, attention_bias=True, qk_norm=True, num_key_value_heads=kv_heads)
    model = _randomize_biases(MoEModel(config=cfg)).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2, max_length=9)
        assert cache.keys[0].shape == (2, kv_heads, 9, 16)
        first = model(ids[:, :6], kv_cache=cache)
        steps = [model(ids[:, i : i + 1], kv_cache=cache) for i in range(6, 9)]
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), full, rtol=0, atol=1e-5)


def test_checkpoint_keeps_head_dim_and_attention_bias(tmp_path):
    torch.manual_seed(0)
    model = _randomize_biases(MoEModel(config=tiny_config(head_dim=12, attention_bias=True))).eval()
    path = save_moe_checkpoint(model, None, None, tmp_path / "ckpt")
    raw = json.loads((path / "config.json").read_text())
    assert (raw["head_dim"], raw["attention_bias"]) == (12, True)
    loaded = load_pretrained_moe(path).eval()
    assert loaded.config == model.config and loaded.config.head_dim == 12
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    derived = save_moe_checkpoint(MoEModel(config=tiny_config()), None, None, tmp_path / "plain")
    assert json.loads((derived / "config.json").read_text())["head_dim"] is None
    assert load_pretrained_moe(derived).config.head_dim == 8
