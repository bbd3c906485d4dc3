"""Export to / import from transformers Qwen2-MoE and Qwen3-MoE: logits, round trips, refusals."""

import json

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from moe_lab import (  # noqa: E402
    CheckpointError,
    MoEModel,
    UnsupportedConversionError,
    export_hf_qwen2_moe,
    export_hf_qwen3_moe,
    import_hf_qwen2_moe,
    import_hf_qwen3_moe,
)
from moe_lab.checkpoint import Checkpoint, load_pretrained_moe  # noqa: E402
from moe_lab.interop import qwen2_moe_export_problems, qwen3_moe_export_problems  # noqa: E402

ATOL = 1e-4
EXPORT = {"qwen2_moe": export_hf_qwen2_moe, "qwen3_moe": export_hf_qwen3_moe}
QWEN2 = dict(num_shared_experts=1, shared_expert_gate=True)


def _hf_load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], info
    return model.eval()


def _max_diff(ours, hf, ids, mask=None, positions=None):
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return (a - b).abs()[real].max().item(), a[real].abs().max().item()


def _assert_same_logits(ours, hf, padded_batch, vocab=97):
    ids, mask, positions = padded_batch(vocab=vocab)
    diff, scale = _max_diff(ours, hf, ids)
    assert scale > 0.5 and diff < ATOL, (diff, scale)
    diff, _ = _max_diff(ours, hf, ids, mask, positions)  # left- and right-padded rows
    assert diff < ATOL, diff


CASES = {
    "qwen2-gqa-top2": ("qwen2_moe", dict(QWEN2, num_key_value_heads=2)),
    "qwen2-dense-layers-normed-tied": ("qwen2_moe", dict(
        num_layers=3, moe_layer_frequency=2, dense_intermediate_size=40, num_shared_experts=2,
        shared_expert_gate=True, normalize_router_weights=True, tie_word_embeddings=True)),
    "qwen2-geglu-wide-shared-top1": ("qwen2_moe", dict(
        QWEN2, activation="geglu", experts_per_token=1, shared_expert_intermediate_size=72, rope_theta=500.0)),
    "qwen3-unnormed-top2": ("qwen3_moe", dict(qk_norm=True, normalize_router_weights=False, num_key_value_heads=2)),
    "qwen3-dense-layers-top3": ("qwen3_moe", dict(
        qk_norm=True, num_layers=4, moe_layer_frequency=2, experts_per_token=3, rms_norm_eps=1e-6)),
    # hidden 32 / 4 heads = 8: an explicit head_dim, and q/k/v biases (random, see randomize)
    "qwen2-bias-head-dim16": ("qwen2_moe", dict(QWEN2, attention_bias=True, head_dim=16, num_key_value_heads=2)),
    "qwen3-bias-head-dim12-dense": ("qwen3_moe", dict(
        qk_norm=True, attention_bias=True, head_dim=12, num_layers=3, moe_layer_frequency=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_with_equal_logits(tmp_path, randomize, padded_batch, case):
    model_type, overrides = CASES[case]
    cfg = tiny_config(**overrides)
    model = randomize(MoEModel(config=cfg)).eval()
    hf = _hf_load(EXPORT[model_type](model, tmp_path / "hf"))
    assert hf.config.model_type == model_type
    assert type(hf).__name__ == ("Qwen2MoeForCausalLM" if model_type == "qwen2_moe" else "Qwen3MoeForCausalLM")
    assert hf.config.norm_topk_prob == cfg.normalize_router_weights
    moe = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe == list(cfg.moe_layer_indices)
    _assert_same_logits(model, hf, padded_batch)


@pytest.mark.parametrize("case", ["qwen2-dense-layers-normed-tied", "qwen3-dense-layers-top3", "qwen2-bias-head-dim16",
                                  "qwen3-bias-head-dim12-dense"])
def test_export_import_round_trip_is_bitwise(tmp_path, randomize, case):
    model_type, overrides = CASES[case]
    cfg = tiny_config(**overrides, router_z_loss_coef=0.02, load_balancing_loss_coef=0.05, dropout=0.1)
    model = randomize(MoEModel(config=cfg))
    out = EXPORT[model_type](model, tmp_path / "hf")
    assert Checkpoint.open(out).format == "hf-" + model_type.replace("_", "-")
    back = load_pretrained_moe(out)
    assert back.config == cfg  # the embedded moe_lab config restores every field
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_round_trip_through_transformers_save_pretrained(tmp_path, randomize, padded_batch, model_type):
    """moe_lab -> transformers (which re-saves it) -> moe_lab gives the same weights and logits."""
    cfg = tiny_config(**(QWEN2 if model_type == "qwen2_moe" else {"qk_norm": True}))
    model = randomize(MoEModel(config=cfg)).eval()
    hf = _hf_load(EXPORT[model_type](model, tmp_path / "hf"))
    hf.save_pretrained(tmp_path / "resaved")
    back = load_pretrained_moe(tmp_path / "resaved").eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), back(ids, mask))


def test_qwen2_export_writes_the_published_layout(tmp_path, randomize):
    model = randomize(MoEModel(config=tiny_config(**QWEN2, shared_expert_intermediate_size=16)))
    out = export_hf_qwen2_moe(model, tmp_path / "hf")
    t = load_file(str(out / "model.safetensors"))
    raw = json.loads((out / "config.json").read_text())
    mlp = model.layers[1].mlp
    gate_up = mlp.shared_experts.gate_up.weight.detach()
    assert torch.equal(t["model.layers.1.mlp.shared_expert.gate_proj.weight"], gate_up[:16])
    assert torch.equal(t["model.layers.1.mlp.shared_expert.up_proj.weight"], gate_up[16:])
    assert torch.equal(t["model.layers.1.mlp.shared_expert_gate.weight"], mlp.shared_expert_gate.weight.detach())
    assert torch.equal(t["model.layers.1.mlp.experts.3.up_proj.weight"], mlp.experts.w_in.detach()[3, 48:])
    assert torch.equal(t["model.layers.0.self_attn.k_proj.bias"], torch.zeros(32))  # qkv_bias: zeros
    assert "model.layers.0.self_attn.o_proj.bias" not in t
    assert (raw["shared_expert_intermediate_size"], raw["moe_intermediate_size"], raw["qkv_bias"]) == (16, 48, True)
    assert raw["head_dim"] == 8
    assert raw["decoder_sparse_step"] == 1 and raw["mlp_only_layers"] == [] and raw["use_sliding_window"] is False


def test_export_writes_the_attention_biases_and_head_dim(tmp_path, randomize):
    m2 = randomize(MoEModel(config=tiny_config(**QWEN2, attention_bias=True, head_dim=16)))
    t = load_file(str(export_hf_qwen2_moe(m2, tmp_path / "q2") / "model.safetensors"))
    bias = m2.layers[1].attn.v_proj.bias.detach()
    assert bias.shape == (64,) and bool(bias.any())
    assert torch.equal(t["model.layers.1.self_attn.v_proj.bias"], bias)  # the real biases, not zeros
    assert t["model.layers.1.self_attn.o_proj.weight"].shape == (32, 64)
    m3 = randomize(MoEModel(config=tiny_config(qk_norm=True, attention_bias=True, head_dim=16)))
    out = export_hf_qwen3_moe(m3, tmp_path / "q3")
    t, raw = load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())
    assert (raw["attention_bias"], raw["head_dim"]) == (True, 16)
    assert torch.equal(t["model.layers.0.self_attn.q_proj.bias"], m3.layers[0].attn.q_proj.bias.detach())
    assert torch.equal(t["model.layers.0.self_attn.o_proj.bias"], torch.zeros(32))  # Qwen3's flag covers o_proj
    plain = json.loads((export_hf_qwen3_moe(MoEModel(config=tiny_config(qk_norm=True)), tmp_path / "p3")
                        / "config.json").read_text())
    assert plain["attention_bias"] is False


# ---- import of checkpoints transformers wrote -------------------------------------------


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("qwen2_moe", {}),
        ("qwen2_moe", {"norm_topk_prob": True, "mlp_only_layers": [0], "tie_word_embeddings": True}),
        ("qwen2_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2, "hidden_act": "gelu"}),
        ("qwen3_moe", {}),
        ("qwen3_moe", {"norm_topk_prob": True, "num_hidden_layers": 3, "mlp_only_layers": [0, 1]}),
    ],
    ids=["qwen2", "qwen2-normed-dense0-tied", "qwen2-step2-gelu", "qwen3", "qwen3-normed-dense01"],
)
def test_load_pretrained_moe_reads_a_transformers_qwen(tmp_path, tiny_qwen, padded_batch, model_type, overrides):
    path, hf = tiny_qwen(tmp_path, model_type, **overrides)
    model = load_pretrained_moe(path).eval()
    cfg = model.config
    assert cfg.qk_norm == (model_type == "qwen3_moe")
    assert (cfg.num_shared_experts, cfg.shared_expert_gate) == ((1, True) if model_type == "qwen2_moe" else (0, False))
    assert list(cfg.moe_layer_indices) == [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    _assert_same_logits(model, hf, padded_batch)


def test_import_reads_the_fused_v5_layout(tmp_path, tiny_qwen, padded_batch):
    path, hf = tiny_qwen(tmp_path, "qwen2_moe")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((path / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_logits(load_pretrained_moe(fused).eval(), hf, padded_batch)


def test_import_with_out_writes_a_moe_lab_checkpoint(tmp_path, tiny_qwen):
    path, _ = tiny_qwen(tmp_path, "qwen3_moe")
    model, tok = import_hf_qwen3_moe(path, out=tmp_path / "ckpt", dropout=0.2)
    assert tok is None and model.config.dropout == 0.2
    again = load_pretrained_moe(tmp_path / "ckpt")
    assert again.config == model.config and Checkpoint.open(tmp_path / "ckpt").format == "moe_lab"
    with pytest.raises(CheckpointError, match="model_type 'qwen3_moe', not 'qwen2_moe'"):
        import_hf_qwen2_moe(path)


# ---- refusals ---------------------------------------------------------------------------

_UNEXPRESSIBLE = dict(
    router_score_function="sigmoid", router_bias_update_rate=0.01, router_num_groups=2, router_topk_groups=1,
    router_scaling_factor=2.0, capacity_factor=1.0, expert_type="ffn", activation="gelu", router_bias=True,
)
_COMMON_NEEDLES = ("capacity_factor=1.0", "router_score_function is 'sigmoid'", "router_bias_update_rate=0.01",
                   "router_num_groups=2", "router_scaling_factor=2.0", "expert_type is 'ffn'", "router_bias=True")


def test_qwen2_export_lists_every_reason_it_refuses(tmp_path):
    cfg = tiny_config(**_UNEXPRESSIBLE, qk_norm=True)
    with pytest.raises(UnsupportedConversionError) as err:
        export_hf_qwen2_moe(MoEModel(config=cfg), tmp_path / "hf")
    msg = str(err.value)
    assert "cannot be exported as Qwen2-MoE" in msg
    assert len(err.value.reasons) == 9, err.value.reasons
    for needle in _COMMON_NEEDLES + ("num_shared_experts=0", "qk_norm=True"):
        assert needle in msg, (needle, msg)
    assert not (tmp_path / "hf").exists()
    reasons = qwen2_moe_export_problems(tiny_config(num_shared_experts=1))
    assert len(reasons) == 1 and "shared_expert_gate=False" in reasons[0]


def test_qwen3_export_lists_every_reason_it_refuses(tmp_path):
    cfg = tiny_config(**_UNEXPRESSIBLE, num_shared_experts=1)
    with pytest.raises(UnsupportedConversionError) as err:
        export_hf_qwen3_moe(MoEModel(config=cfg), tmp_path / "hf")
    msg = str(err.value)
    assert len(err.value.reasons) == 9, err.value.reasons
    for needle in _COMMON_NEEDLES + ("num_shared_experts=1", "qk_norm=False"):
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"router_type": "switch", "experts_per_token": 1}, "router_type is 'switch'"),
        ({"router_type": "expert_choice"}, "router_type is 'expert_choice'"),
    ],
)
def test_export_refuses_routers_qwen_lacks(overrides, needle):
    assert any(needle in p for p in qwen2_moe_export_problems(tiny_config(**QWEN2, **overrides)))
    assert any(needle in p for p in qwen3_moe_export_problems(tiny_config(qk_norm=True, **overrides)))


def test_what_each_layout_accepts():
    assert qwen2_moe_export_problems(tiny_config(**QWEN2, capacity_factor=1.25, drop_tokens=False)) == []
    assert qwen3_moe_export_problems(tiny_config(qk_norm=True, num_layers=3, moe_layer_frequency=3)) == []


def _assert_bitwise_round_trip(model, export, path):
    back = load_pretrained_moe(export(model, path))
    assert back.config == model.config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_qwen2_import_maps_non_zero_qkv_biases(tmp_path, tiny_qwen, padded_batch):
    path, hf = tiny_qwen(tmp_path, "qwen2_moe", zero_biases=False)
    hf_bias = hf.model.layers[1].self_attn.k_proj.bias.detach()
    assert bool(hf_bias.any())
    model = load_pretrained_moe(path).eval()
    assert model.config.attention_bias and model.config.head_dim == 8
    assert torch.equal(model.layers[1].attn.k_proj.bias.detach(), hf_bias)
    _assert_same_logits(model, hf, padded_batch)
    _assert_bitwise_round_trip(model, export_hf_qwen2_moe, tmp_path / "again")


def test_qwen3_import_maps_head_dim_and_attention_bias(tmp_path, tiny_qwen, padded_batch):
    path, hf = tiny_qwen(tmp_path, "qwen3_moe", zero_biases=False, head_dim=16, attention_bias=True,
                         num_hidden_layers=3, mlp_only_layers=[0, 2])  # hidden 32, 4 heads: 8 derived
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    model = load_pretrained_moe(path).eval()
    cfg = model.config
    assert (cfg.head_dim, cfg.attention_bias, cfg.to_dict()["head_dim"]) == (16, True, 16)
    _assert_same_logits(model, hf, padded_batch)
    _assert_bitwise_round_trip(model, export_hf_qwen3_moe, tmp_path / "again")
    path2, _ = tiny_qwen(tmp_path, "qwen3_moe", name="derived", head_dim=8)  # = hidden/heads: stays derived
    assert load_pretrained_moe(path2).config.to_dict()["head_dim"] is None


def test_import_refuses_non_zero_biases_it_has_no_place_for_naming_each(tmp_path, tiny_qwen):
    path, _ = tiny_qwen(tmp_path, "qwen2_moe", zero_biases=False)
    with pytest.raises(UnsupportedConversionError) as err:  # the user asks for no biases
        load_pretrained_moe(path, attention_bias=False)
    assert len(err.value.reasons) == 6, err.value.reasons  # q, k, v of 2 layers
    assert "model.layers.0.self_attn.q_proj.bias is non-zero but attention_bias=False" in str(err.value)
    path3, _ = tiny_qwen(tmp_path, "qwen3_moe", attention_bias=True)
    state = load_file(str(path3 / "model.safetensors"))
    state["model.layers.1.self_attn.o_proj.bias"][3] = 0.5
    save_file(state, str(path3 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedConversionError) as err:
        load_pretrained_moe(path3)
    assert err.value.reasons == [
        "model.layers.1.self_attn.o_proj.bias is non-zero; moe_lab's o_proj has no bias (zero ones are accepted)"
    ]


def test_import_lists_every_config_reason_it_refuses(tmp_path, tiny_qwen):
    path, _ = tiny_qwen(tmp_path, "qwen3_moe", num_hidden_layers=3)
    raw = json.loads((path / "config.json").read_text())
    raw.update(hidden_act="gelu_pytorch_tanh", mlp_bias=True, mlp_only_layers=[1], use_sliding_window=True,
               sliding_window=8)
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedConversionError) as err:
        load_pretrained_moe(path)
    assert len(err.value.reasons) == 4, err.value.reasons
    for needle in ("gelu_pytorch_tanh", "mlp_bias=True", "makes layers [0, 2] MoE layers", "sliding_window=8"):
        assert needle in str(err.value), needle


def test_import_refuses_tensors_it_has_no_place_for(tmp_path, tiny_qwen):
    path, _ = tiny_qwen(tmp_path, "qwen3_moe")
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.mlp.shared_expert_gate.weight"] = torch.zeros(1, 32)
    del state["model.layers.1.self_attn.k_norm.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_pretrained_moe(path)
    assert "shared_expert_gate.weight" in str(err.value) and "layers.1.self_attn.k_norm.weight" in str(err.value)
