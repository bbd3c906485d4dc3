"""Fixtures for the interop tests: random weights at a useful scale, tiny transformers models."""

import math

import pytest
import torch


def _randomize(module, seed=0):
    """Unit-scale random weights (default inits are ~0.02, which makes every expert look alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return module


@pytest.fixture
def randomize():
    return _randomize


def _padded_batch(batch=3, seq=10, vocab=97, seed=1):
    """ids [B, S], a right-padded row, a left-padded row and a full row, and RoPE positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 3] = 0  # left padding
    mask[1, seq - seq // 4 :] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # how moe_lab counts positions
    return ids, mask, positions


@pytest.fixture
def padded_batch():
    return _padded_batch


def _tiny_mixtral(tmp_path, name="mixtral", seed=0, **overrides):
    """A random MixtralForCausalLM built and saved locally (no download); returns (dir, model)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    kwargs = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rope_theta=10000.0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**kwargs))
    _randomize(model, seed)
    model.eval()
    out = tmp_path / name
    model.save_pretrained(out)
    return out, model


@pytest.fixture
def tiny_mixtral():
    return _tiny_mixtral


def _tiny_qwen(tmp_path, model_type="qwen2_moe", name=None, seed=0, zero_biases=True, **overrides):
    """A random Qwen2MoeForCausalLM / Qwen3MoeForCausalLM built and saved locally (no download),
    with zero attention biases unless ``zero_biases=False`` (then random q/k/v biases; an
    o_proj bias stays zero); returns (dir, model)."""
    import transformers

    kwargs = dict(
        vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, rope_theta=10000.0,
    )
    if model_type == "qwen2_moe":
        kwargs["shared_expert_intermediate_size"] = 16
        config_cls, model_cls = transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM
    else:
        config_cls, model_cls = transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    _randomize(model, seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("proj.bias") and (zero_biases or n.endswith("o_proj.bias")):
                p.zero_()
    model.eval()
    out = tmp_path / (name or model_type)
    model.save_pretrained(out)
    return out, model


@pytest.fixture
def tiny_qwen():
    return _tiny_qwen
