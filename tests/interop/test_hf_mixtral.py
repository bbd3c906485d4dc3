"""Export to / import from transformers Mixtral: loading, logits, round trip, refusals."""

import json

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from moe_lab import CheckpointError, MoEModel, UnsupportedConversionError, export_hf_mixtral  # noqa: E402
from moe_lab.interop import import_hf_mixtral, mixtral_export_problems  # noqa: E402
from moe_lab.model.experts import GroupedExperts  # noqa: E402
from moe_lab.checkpoint import load_pretrained_moe, save_moe_checkpoint  # noqa: E402

ATOL = 1e-4


def _hf_load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def _assert_clean_load(info):
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info


def _compare(ours, hf, ids, mask=None, positions=None):
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    diff = (a - b).abs()[real].max().item()
    return diff, a[real].abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # swiglu, top-2, GQA
        {"activation": "geglu", "num_key_value_heads": 4, "experts_per_token": 1},
        {"tie_word_embeddings": True, "experts_per_token": 3, "rope_theta": 500.0, "rms_norm_eps": 1e-6},
        {"head_dim": 12},  # hidden 32 / 4 heads = 8: Mixtral's head_dim field carries it
    ],
    ids=["swiglu-gqa-top2", "geglu-mha-top1", "tied-top3", "head-dim12"],
)
def test_export_loads_in_transformers_with_equal_logits(tmp_path, randomize, padded_batch, overrides):
    cfg = tiny_config(**{"num_key_value_heads": 2, **overrides})
    model = randomize(MoEModel(config=cfg)).eval()
    out = export_hf_mixtral(model, tmp_path / "hf")
    hf, info = _hf_load(out)
    _assert_clean_load(info)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert hf.config.num_local_experts == cfg.num_experts and hf.config.num_experts_per_tok == cfg.experts_per_token
    if cfg.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    ids, mask, positions = padded_batch(vocab=cfg.vocab_size)
    diff, scale = _compare(model, hf, ids)
    assert scale > 0.5 and diff < ATOL, (diff, scale)
    # right- and left-padded rows: transformers gets moe_lab's positions (cumsum(mask) - 1)
    diff, _ = _compare(model, hf, ids, mask, positions)
    assert diff < ATOL


def test_routing_is_not_trivial(tmp_path, randomize, padded_batch):
    """The logit test means something only if tokens pick different experts."""
    model = randomize(MoEModel(config=tiny_config())).eval()
    ids, _, _ = padded_batch()
    with torch.no_grad():
        _, info = model(ids, return_routing_info=True)
    assert (info["expert_counts"] > 0).sum() >= 6  # most of the 2 x 4 experts are used


def test_round_trip_is_bitwise_exact(tmp_path, randomize):
    cfg = tiny_config(num_key_value_heads=2, router_z_loss_coef=0.02, load_balancing_loss_coef=0.05, dropout=0.1)
    model = randomize(MoEModel(config=cfg))
    out = export_hf_mixtral(model, tmp_path / "hf")
    back = load_pretrained_moe(out)
    assert back.config == cfg  # the embedded moe_lab config restores the training-only fields too
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_through_transformers_save_pretrained(tmp_path, randomize, padded_batch):
    """moe_lab -> HF -> (transformers re-saves it) -> moe_lab gives the same weights."""
    model = randomize(MoEModel(config=tiny_config(num_key_value_heads=2))).eval()
    hf, _ = _hf_load(export_hf_mixtral(model, tmp_path / "hf"))
    hf.save_pretrained(tmp_path / "resaved")
    back = load_pretrained_moe(tmp_path / "resaved").eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), back(ids, mask))


def test_exported_layout_is_the_per_expert_one_older_transformers_read(tmp_path, randomize):
    model = randomize(MoEModel(config=tiny_config()))
    out = export_hf_mixtral(model, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    num_i = model.config.intermediate_size
    w_in = model.layers[1].mlp.experts.w_in.detach()
    assert torch.equal(tensors["model.layers.1.block_sparse_moe.experts.2.w1.weight"], w_in[2, :num_i])
    assert torch.equal(tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"], w_in[2, num_i:])
    assert torch.equal(
        tensors["model.layers.1.block_sparse_moe.experts.2.w2.weight"], model.layers[1].mlp.experts.w_out[2].detach()
    )
    assert len([k for k in tensors if ".experts." in k]) == 2 * 4 * 3  # no expert dropped
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == model.config.rope_theta  # v4 and v5 keys
    assert cfg["model_type"] == "mixtral" and cfg["sliding_window"] is None


def test_bf16_and_sharded_export(tmp_path, randomize, padded_batch):
    model = randomize(MoEModel(config=tiny_config()))
    out = export_hf_mixtral(model, tmp_path / "hf", dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    hf, info = _hf_load(out)
    _assert_clean_load(info)
    back = load_pretrained_moe(out)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_export_from_checkpoint_dir_brings_the_tokenizer(tmp_path, randomize):
    from moe_lab.data import ByteTokenizer

    cfg = tiny_config(vocab_size=259)
    ckpt = save_moe_checkpoint(randomize(MoEModel(config=cfg)), None, None, tmp_path / "ckpt", tokenizer=ByteTokenizer())
    out = export_hf_mixtral(ckpt, tmp_path / "hf")
    cfg_json = json.loads((out / "config.json").read_text())
    assert (cfg_json["bos_token_id"], cfg_json["eos_token_id"], cfg_json["pad_token_id"]) == (257, 258, 256)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("héllo")["input_ids"] == list("héllo".encode())
    model, our_tok = import_hf_mixtral(out, out=tmp_path / "back")
    assert isinstance(our_tok, ByteTokenizer)
    from moe_lab.data import load_tokenizer

    assert isinstance(load_tokenizer(tmp_path / "back"), ByteTokenizer)
    assert load_pretrained_moe(tmp_path / "back").config == cfg


def test_export_refuses_to_overwrite(tmp_path, randomize):
    model = MoEModel(config=tiny_config())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_hf_mixtral(model, tmp_path / "hf")
    export_hf_mixtral(model, tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "keep.txt").exists()


# ---- refusals ---------------------------------------------------------------------------


def test_export_lists_every_reason_it_refuses(tmp_path):
    cfg = tiny_config(
        num_layers=4, moe_layer_frequency=2, expert_type="ffn", activation="gelu", router_bias=True,
        normalize_router_weights=False, capacity_factor=1.0, attention_bias=True,
    )
    with pytest.raises(UnsupportedConversionError) as err:
        export_hf_mixtral(MoEModel(config=cfg), tmp_path / "hf")
    msg = str(err.value)
    assert len(err.value.reasons) == 6, err.value.reasons
    for needle in ("capacity_factor=1.0", "expert_type is 'ffn'", "layers [0, 2] dense", "normalize_router_weights",
                   "router_bias", "attention_bias=True"):
        assert needle in msg, (needle, msg)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"router_type": "switch", "experts_per_token": 1}, "router_type is 'switch'"),
        ({"router_type": "expert_choice"}, "router_type is 'expert_choice'"),
        ({"capacity_factor": 1.25}, "drops tokens over capacity"),
    ],
)
def test_export_refuses_routers_mixtral_lacks(tmp_path, overrides, needle):
    cfg = tiny_config(**overrides)
    assert any(needle in p for p in mixtral_export_problems(cfg))
    with pytest.raises(UnsupportedConversionError, match=needle):
        export_hf_mixtral(MoEModel(config=cfg), tmp_path / "hf")


def test_capacity_without_dropping_is_exportable():
    assert mixtral_export_problems(tiny_config(capacity_factor=1.25, drop_tokens=False)) == []


def test_export_refuses_a_model_with_sharded_experts(tmp_path):
    model = MoEModel(config=tiny_config())
    model.layers[0].mlp.experts = GroupedExperts(2, 32, 48)  # what an expert-parallel rank holds
    with pytest.raises(UnsupportedConversionError, match="holds 2 of 4 experts"):
        export_hf_mixtral(model, tmp_path / "hf")


# ---- import of checkpoints transformers wrote -------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_load_pretrained_moe_reads_a_transformers_mixtral(tmp_path, tiny_mixtral, padded_batch, tied):
    path, hf = tiny_mixtral(tmp_path, tie_word_embeddings=tied)
    model = load_pretrained_moe(path).eval()
    assert isinstance(model, MoEModel)
    assert model.config.tie_word_embeddings == tied and model.config.kv_heads == 2
    ids, mask, positions = padded_batch()
    diff, scale = _compare(model, hf, ids)
    assert scale > 0.5 and diff < ATOL
    diff, _ = _compare(model, hf, ids, mask, positions)
    assert diff < ATOL


def test_import_maps_head_dim(tmp_path, tiny_mixtral, padded_batch):
    path, hf = tiny_mixtral(tmp_path, head_dim=16)  # hidden 32, 4 heads
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    model = load_pretrained_moe(path).eval()
    assert model.config.head_dim == 16
    ids, mask, positions = padded_batch()
    diff, scale = _compare(model, hf, ids, mask, positions)
    assert scale > 0.5 and diff < ATOL


def test_import_reads_the_fused_v5_layout(tmp_path, tiny_mixtral, padded_batch):
    """Checkpoints with transformers-v5 parameter names (mlp.gate / experts.gate_up_proj) load too."""
    path, hf = tiny_mixtral(tmp_path)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((path / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    model = load_pretrained_moe(fused).eval()
    ids, mask, positions = padded_batch()
    diff, _ = _compare(model, hf, ids, mask, positions)
    assert diff < ATOL


def test_import_applies_overrides(tmp_path, tiny_mixtral):
    path, _ = tiny_mixtral(tmp_path)
    model = load_pretrained_moe(path, moe_backend="eager", dropout=0.2)
    assert model.config.moe_backend == "eager" and model.config.dropout == 0.2


def test_import_refuses_unsupported_mixtral_features(tmp_path, tiny_mixtral):
    path, _ = tiny_mixtral(tmp_path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(hidden_act="gelu_pytorch_tanh", mlp_bias=True, sliding_window=8)
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedConversionError) as err:
        load_pretrained_moe(path)
    assert len(err.value.reasons) == 4, err.value.reasons
    for needle in ("gelu_pytorch_tanh", "mlp_bias=True", "yarn", "sliding_window=8"):
        assert needle in str(err.value)


def test_sliding_window_shorter_than_the_context_is_refused_unless_the_context_is_cut(tmp_path, tiny_mixtral):
    path, _ = tiny_mixtral(tmp_path, sliding_window=16)
    with pytest.raises(UnsupportedConversionError, match="sliding_window=16"):
        load_pretrained_moe(path)
    assert load_pretrained_moe(path, max_position_embeddings=16).config.max_position_embeddings == 16
    path2, _ = tiny_mixtral(tmp_path, name="wide", sliding_window=64)  # window >= context: no effect
    assert load_pretrained_moe(path2).config.max_position_embeddings == 64


def test_import_refuses_tensors_it_has_no_place_for(tmp_path, tiny_mixtral):
    path, _ = tiny_mixtral(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_pretrained_moe(path)
    assert "q_proj.bias" in str(err.value) and "experts.3.w2.weight" in str(err.value)


def test_other_transformers_model_types_get_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model_type 'deepseek_v3'.*'mixtral'"):
        load_pretrained_moe(tmp_path)


def test_pickled_weights_are_never_loaded(tmp_path, tiny_mixtral):
    path, _ = tiny_mixtral(tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickles and are never loaded"):
        load_pretrained_moe(path)
