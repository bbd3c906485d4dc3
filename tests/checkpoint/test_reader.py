"""Checkpoint.open: the reading API (weights lazy/excluded, build_model, load_into with expert
slices, tokenizer fallback, training state, routing stats), the formats registry, and the
memory check."""

import json

import pytest
import torch
from helpers import tiny_config

from moe_lab import CheckpointError, ConfigError, MoEModel
from moe_lab.checkpoint import (
    Checkpoint,
    LazyWeights,
    TensorSpec,
    checks,
    registered_formats,
    save_moe_checkpoint,
    write_checkpoint,
)
from moe_lab.data import BPETokenizer, ByteTokenizer, train_bpe_tokenizer
from moe_lab.model.experts import GroupedExperts


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MoEModel.from_config(tiny_config(**overrides)).eval()


@pytest.fixture
def saved(tmp_path):
    model = _model()
    stats = {"moe_layer_indices": [0, 1], "expert_counts": [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]}
    path = write_checkpoint(tmp_path / "ckpt", model.config, model.state_dict(), routing_stats=stats,
                            trainer_state={"global_step": 7})
    return path, model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


# ---- opening -------------------------------------------------------------------------------


def test_open_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file; expected a checkpoint directory"):
        Checkpoint.open(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    with pytest.raises(CheckpointError, match=r"model_type 'deepseek_v3'.*\['llama', 'mistral', 'mixtral', 'qwen2_moe', 'qwen3_moe'\]"):
        Checkpoint.open(tmp_path / "qwen")
    assert {"mixtral", "llama", "mistral"} <= set(registered_formats())


def test_open_reads_config_and_overrides(saved):
    path, model = saved
    ckpt = Checkpoint.open(path, dropout=0.3)
    assert ckpt.format == "moe_lab" and ckpt.model_type is None and ckpt.path == path
    assert ckpt.config == model.config.replace(dropout=0.3)
    assert ckpt.build_model().config.dropout == 0.3
    assert ckpt.build_model(moe_backend="eager").config.moe_backend == "eager"
    with pytest.raises(ConfigError, match=r"overrides \['experts_per_token'\] do not fit .*experts_per_token \(9\)"):
        Checkpoint.open(path, experts_per_token=9)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("num_layers", True, "num_layers = True: expected an integer"),
        ("rope_theta", "1e4", "rope_theta = '1e4': expected a number"),
        ("hidden_size", None, "hidden_size = None: expected an integer (a JSON number"),
        ("tie_word_embeddings", 1, "tie_word_embeddings = 1: expected true or false"),
        ("router_type", 3, "router_type = 3: expected a string"),
    ],
)
def test_config_values_must_have_the_field_type(saved, field, value, needle):
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(path)
    assert needle in str(err.value) and str(path / "config.json") in str(err.value)


# ---- weights -------------------------------------------------------------------------------


def test_weights_eager_lazy_and_excluded(saved):
    path, model = saved
    ckpt = Checkpoint.open(path)
    eager = ckpt.weights()
    assert isinstance(eager, dict) and set(eager) == set(model.state_dict())
    lazy = ckpt.weights(lazy=True)
    assert isinstance(lazy, LazyWeights) and set(lazy) == set(eager)
    name = "layers.1.mlp.experts.w_in"
    assert lazy.spec(name) == TensorSpec(tuple(eager[name].shape), torch.float32)
    assert torch.equal(lazy.rows(name, 2, 3), eager[name][2:3])
    no_experts = ckpt.weights(lazy=True, exclude=lambda n: ".experts." in n)
    assert not [n for n in no_experts if ".experts." in n] and "embed_tokens.weight" in no_experts
    assert set(ckpt.weights(exclude=["norm.weight"])) == set(eager) - {"norm.weight"}
    with pytest.raises(KeyError):
        no_experts[name]


@pytest.mark.parametrize("tied", [False, True])
def test_build_model_equals_the_saved_model(tmp_path, tied):
    model = _model(tie_word_embeddings=tied)
    path = save_moe_checkpoint(model, None, None, tmp_path / "c")
    built = Checkpoint.open(path).build_model().eval()
    assert _same(built, model) and built.training is False
    assert all(not t.is_meta for t in built.state_dict().values())
    assert (built.lm_head.weight is built.embed_tokens.weight) == tied
    ids = torch.randint(0, 97, (2, 9))
    assert torch.equal(built(ids), model(ids))


def test_build_model_dtype_and_exclude(saved):
    path, model = saved
    ckpt = Checkpoint.open(path)
    half = ckpt.build_model(dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.rotary.inv_freq.dtype == torch.float32  # recomputed, kept fp32
    assert torch.equal(half.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))
    partial = ckpt.build_model(exclude=lambda n: ".experts." in n)
    experts = {n: p for n, p in partial.named_parameters() if ".experts." in n}
    assert experts and all(p.is_meta for p in experts.values())  # left for the caller (the expert cache)
    assert all(not p.is_meta for n, p in partial.named_parameters() if n not in experts)
    assert torch.equal(partial.layers[0].attn.q_proj.weight, model.layers[0].attn.q_proj.weight)


def test_build_model_refuses_shapes_the_config_does_not_have(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match=r"num_experts is 8 in config.json but 4 in the weights.*shape mismatches"):
        Checkpoint.open(path).build_model(num_experts=8)
    with pytest.raises(CheckpointError, match="expert_hidden_size is 40 in config.json but 48 in the weights"):
        Checkpoint.open(path).build_model(expert_hidden_size=40)


def test_load_into_an_existing_model_and_into_an_expert_shard(saved):
    path, model = saved
    ckpt = Checkpoint.open(path)
    fresh = _model(seed=5)
    ckpt.load_into(fresh)
    assert _same(fresh, model)
    # a rank that holds experts 2 and 3 of 4: only those rows are read into its shard
    shard = _model(seed=6)
    for layer in shard.moe_layers:
        layer.experts = GroupedExperts(2, 32, 48)
    names = [n for n, _ in shard.named_parameters() if ".experts." in n]
    ckpt.load_into(shard, expert_slices={n: slice(2, 4) for n in names})
    full = model.state_dict()
    for n, p in shard.named_parameters():
        assert torch.equal(p, full[n][2:4] if n in names else full[n]), n
    with pytest.raises(CheckpointError, match="does not match the model: shape mismatches"):
        ckpt.load_into(shard)  # without the slices, the shapes differ
    with pytest.raises(CheckpointError, match="holds rows 3:5"):
        ckpt.load_into(shard, expert_slices={n: slice(3, 5) for n in names})


# ---- the rest of the directory -------------------------------------------------------------


def test_tokenizer_is_the_saved_one_else_bytes(tmp_path, saved):
    path, model = saved
    ckpt = Checkpoint.open(path)
    assert not ckpt.has_tokenizer and isinstance(ckpt.tokenizer(), ByteTokenizer)
    bpe = train_bpe_tokenizer(["hello world, hello experts"] * 20, vocab_size=270)
    with_tok = save_moe_checkpoint(model, None, None, tmp_path / "tok", tokenizer=bpe)
    tok = Checkpoint.open(with_tok).tokenizer()
    assert isinstance(tok, BPETokenizer) and tok.encode("hello experts") == bpe.encode("hello experts")


def test_training_state_and_routing_stats(saved, tmp_path):
    path, _ = saved
    ckpt = Checkpoint.open(path)
    state = ckpt.training_state()
    assert state.trainer_state == {"global_step": 7}
    assert state.optimizer_tensors is None and state.scheduler is None and not state.has_optimizer
    assert ckpt.routing_stats()["expert_counts"][1] == [4.0, 3.0, 2.0, 1.0]
    bare = save_moe_checkpoint(_model(), None, None, tmp_path / "bare")
    assert Checkpoint.open(bare).routing_stats() is None and Checkpoint.open(bare).training_state().trainer_state == {}


def test_memory_check_refuses_what_does_not_fit(saved, monkeypatch):
    path, _ = saved
    monkeypatch.setattr(checks, "available_memory", lambda device: 100_000)
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(path).build_model()
    msg = str(err.value)
    assert "needs 201.9 KiB for its parameters (float32) but cpu has 97.7 KiB available" in msg
    assert "hidden_size=32" in msg and "num_experts=4" in msg
    Checkpoint.open(path).build_model(exclude=lambda n: ".experts." in n)  # without experts: 26 KiB, fits


def test_host_memory_is_known(monkeypatch):
    assert checks.host_memory() > 2**27
    # the CPU's available memory is host_memory(); both read free memory, which moves between
    # two readings, so the reading is pinned for the comparison
    monkeypatch.setattr(checks, "host_memory", lambda: 123 * 2**20)
    assert checks.available_memory(torch.device("cpu")) == 123 * 2**20
