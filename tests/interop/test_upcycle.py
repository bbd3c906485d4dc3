"""Sparse upcycling: dense -> MoE with identical experts computes what the dense model computes."""

import json

import pytest
import torch
from helpers import tiny_config

from moe_lab import ConfigError, MoEModel, UnsupportedConversionError, upcycle
from moe_lab.interop import load_hf_llama_dense, upcycle_checkpoint
from moe_lab.checkpoint import load_pretrained_moe, save_moe_checkpoint

ATOL = 1e-5


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model.eval()(ids, attention_mask=mask)


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_layers": 2, "moe_layer_frequency": 3},  # every layer dense
        {"num_layers": 2, "moe_layer_frequency": 3, "expert_type": "ffn", "activation": "gelu"},
        {"num_layers": 4, "moe_layer_frequency": 2},  # mixed: existing MoE layers are kept
    ],
    ids=["all-dense-glu", "all-dense-ffn", "mixed"],
)
def test_upcycled_model_computes_what_the_dense_model_computes(randomize, padded_batch, overrides):
    dense = randomize(MoEModel(config=tiny_config(num_experts=4, experts_per_token=2, **overrides))).eval()
    moe = upcycle(dense, num_experts=4, experts_per_token=2)
    assert moe.moe_layer_indices == list(range(dense.config.num_layers))
    assert not moe.training
    ids, mask, _ = padded_batch()
    a, b = _logits(dense, ids), _logits(moe, ids)
    assert a.abs().max() > 0.5 and (a - b).abs().max() < ATOL
    real = mask.bool()
    assert ((_logits(dense, ids, mask) - _logits(moe, ids, mask)).abs()[real]).max() < ATOL
    # the routing really spreads tokens over experts: the equality is not one expert doing all the work
    with torch.no_grad():
        _, info = moe(ids, return_routing_info=True)
    assert (info["expert_counts"] > 0).sum(dim=1).min() >= 3


def test_experts_are_copies_and_routers_are_small_and_random():
    dense = MoEModel(config=tiny_config(num_layers=2, moe_layer_frequency=3))
    moe = upcycle(dense, num_experts=8, experts_per_token=2, router_init_std=0.01, seed=3)
    for i in range(2):
        up, down = dense.layers[i].mlp.up.weight, dense.layers[i].mlp.down.weight
        experts = moe.layers[i].mlp.experts
        assert experts.w_in.shape == (8, *up.shape) and all(torch.equal(experts.w_in[e], up) for e in range(8))
        assert all(torch.equal(experts.w_out[e], down) for e in range(8))
        gate = moe.layers[i].mlp.router.gate.weight
        assert 0.005 < gate.std().item() < 0.02
    assert not torch.equal(moe.layers[0].mlp.router.gate.weight, moe.layers[1].mlp.router.gate.weight)
    again = upcycle(dense, num_experts=8, experts_per_token=2, router_init_std=0.01, seed=3)
    assert torch.equal(again.layers[0].mlp.router.gate.weight, moe.layers[0].mlp.router.gate.weight)
    cfg = moe.config
    assert (cfg.router_type.value, cfg.normalize_router_weights, cfg.capacity_factor) == ("top_k", True, None)
    assert cfg.intermediate_size == dense.config.dense_ffn_size


def test_existing_moe_layers_are_kept_bitwise():
    dense = MoEModel(config=tiny_config(num_layers=4, moe_layer_frequency=2))
    moe = upcycle(dense, num_experts=4, experts_per_token=2)
    for k, v in dense.layers[1].state_dict().items():
        assert torch.equal(moe.layers[1].state_dict()[k], v), k


def test_refusals():
    with pytest.raises(ConfigError, match="no dense layers"):
        upcycle(MoEModel(config=tiny_config()), 4, 2)
    with pytest.raises(ConfigError, match=r"experts_per_token \(5\) must be <= num_experts \(4\)"):
        upcycle(MoEModel(config=tiny_config(num_layers=2, moe_layer_frequency=3)), 4, 5)
    mixed = MoEModel(config=tiny_config(num_layers=4, moe_layer_frequency=2, router_type="switch", experts_per_token=1))
    with pytest.raises(UnsupportedConversionError) as err:
        upcycle(mixed, num_experts=8, experts_per_token=2)
    assert len(err.value.reasons) == 3  # expert count, top-k, switch routing


def test_upcycle_checkpoint_writes_a_loadable_checkpoint_with_the_tokenizer(tmp_path, randomize, padded_batch):
    from moe_lab.data import ByteTokenizer, load_tokenizer

    dense = randomize(MoEModel(config=tiny_config(vocab_size=259, num_layers=2, moe_layer_frequency=3)))
    src = save_moe_checkpoint(dense, None, None, tmp_path / "dense", tokenizer=ByteTokenizer())
    out = upcycle_checkpoint(src, tmp_path / "moe", num_experts=4, experts_per_token=2)
    moe = load_pretrained_moe(out)
    assert moe.moe_layer_indices == [0, 1]
    assert isinstance(load_tokenizer(out), ByteTokenizer)
    ids, _, _ = padded_batch(vocab=259)
    assert (_logits(dense, ids) - _logits(moe, ids)).abs().max() < ATOL
    with pytest.raises(ConfigError, match="not empty"):
        upcycle_checkpoint(src, tmp_path / "moe", num_experts=4, experts_per_token=2)


# ---- transformers Llama -------------------------------------------------------------------


def _tiny_llama(tmp_path, randomize, **overrides):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    model = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))).eval()
    model.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


@pytest.mark.parametrize("tied", [False, True])
def test_upcycled_llama_matches_the_llama_logits(tmp_path, randomize, padded_batch, tied):
    path, llama = _tiny_llama(tmp_path, randomize, tie_word_embeddings=tied)
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        ref = llama(ids).logits
        ref_padded = llama(ids, attention_mask=mask, position_ids=positions).logits
    dense = load_hf_llama_dense(path)
    assert dense.moe_layer_indices == [] and dense.config.tie_word_embeddings == tied
    assert (_logits(dense, ids) - ref).abs().max() < 1e-4
    moe = upcycle(path, num_experts=4, experts_per_token=2)
    assert moe.moe_layer_indices == [0, 1]
    assert ref.abs().max() > 0.5 and (_logits(moe, ids) - ref).abs().max() < 1e-4
    assert ((_logits(moe, ids, mask) - ref_padded).abs()[mask.bool()]).max() < 1e-4


def test_upcycle_command_path_for_llama_copies_the_tokenizer(tmp_path, randomize):
    from moe_lab.data import ByteTokenizer
    from moe_lab.interop import save_hf_tokenizer

    path, _ = _tiny_llama(tmp_path, randomize, vocab_size=259)
    save_hf_tokenizer(ByteTokenizer(), path)
    out = upcycle_checkpoint(path, tmp_path / "moe", num_experts=2, experts_per_token=1)
    assert (out / "tokenizer.json").is_file()
    from moe_lab.data import load_tokenizer

    assert load_tokenizer(out).encode("hé") == list("hé".encode())


def test_llama_features_moe_lab_cannot_run_are_refused(tmp_path, randomize):
    path, _ = _tiny_llama(tmp_path, randomize)
    raw = json.loads((path / "config.json").read_text())
    raw.update(mlp_bias=True, hidden_act="relu")
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedConversionError) as err:
        upcycle(path, 4, 2)
    assert len(err.value.reasons) == 3, err.value.reasons
    for needle in ("mlp_bias=True", "'relu'", "yarn"):
        assert needle in str(err.value), needle


def test_llama_with_head_dim_and_attention_bias_loads_with_equal_logits(tmp_path, randomize, padded_batch):
    path, llama = _tiny_llama(tmp_path, randomize, head_dim=16, attention_bias=True)  # hidden 32, 4 heads
    with torch.no_grad():
        for layer in llama.model.layers:
            layer.self_attn.o_proj.bias.zero_()  # Llama's flag gives o_proj a bias too; moe_lab's has none
    llama.save_pretrained(path)
    ids, mask, positions = padded_batch()
    with torch.no_grad():
        ref = llama(ids, attention_mask=mask, position_ids=positions).logits
    dense = load_hf_llama_dense(path)
    assert (dense.config.head_dim, dense.config.attention_bias) == (16, True)
    assert bool(dense.layers[0].attn.q_proj.bias.detach().any())
    assert ref.abs().max() > 0.5 and ((_logits(dense, ids, mask) - ref).abs()[mask.bool()]).max() < 1e-4
    moe = upcycle(path, num_experts=2, experts_per_token=1)
    assert ((_logits(moe, ids, mask) - ref).abs()[mask.bool()]).max() < 1e-4


def test_llama_non_zero_o_proj_bias_is_refused(tmp_path, randomize):
    path, _ = _tiny_llama(tmp_path, randomize, attention_bias=True)  # randomize: o_proj biases ~1
    with pytest.raises(UnsupportedConversionError) as err:
        load_hf_llama_dense(path)
    assert len(err.value.reasons) == 2, err.value.reasons  # one per layer
    assert "model.layers.0.self_attn.o_proj.bias is non-zero" in str(err.value)


def test_mistral_upcycles_when_its_window_covers_the_context(tmp_path, randomize, padded_batch):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    mistral = randomize(transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=64, **kwargs))).eval()
    mistral.save_pretrained(tmp_path / "mistral")
    ids, _, _ = padded_batch()
    with torch.no_grad():
        ref = mistral(ids).logits
    moe = upcycle(tmp_path / "mistral", num_experts=4, experts_per_token=2)
    assert (_logits(moe, ids) - ref).abs().max() < 1e-4
    raw = json.loads((tmp_path / "mistral" / "config.json").read_text())
    raw["sliding_window"] = 16
    (tmp_path / "mistral" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedConversionError, match="sliding_window=16"):
        upcycle(tmp_path / "mistral", 4, 2)
