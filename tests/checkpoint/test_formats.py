"""Transformers directories open through the same Checkpoint.open (the readers that moe_lab.interop
registers): config and names converted, shards read lazily with every header checked."""

import pytest
import torch
from helpers import tiny_config

from moe_lab import CheckpointError, MoEModel, export_hf_mixtral
from moe_lab.checkpoint import Checkpoint
from moe_lab.data import ByteTokenizer


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = MoEModel.from_config(tiny_config(vocab_size=259)).eval()
    out = export_hf_mixtral(model, tmp_path / "hf", tokenizer=ByteTokenizer(), max_shard_bytes=40_000)
    return out, model


def test_a_sharded_mixtral_export_opens_as_a_checkpoint(exported):
    path, model = exported
    ckpt = Checkpoint.open(path)
    assert ckpt.format == "hf-mixtral" and ckpt.model_type == "mixtral" and len(ckpt.weight_files) > 1
    assert ckpt.config == model.config
    specs = ckpt.tensor_specs()  # converted on meta tensors: moe_lab names, nothing read
    assert specs["layers.0.mlp.experts.w_in"].shape == (4, 96, 32)
    assert set(specs) == set(model.state_dict())
    assert "model.layers.0.block_sparse_moe.gate.weight" in ckpt.stored_specs()
    built = ckpt.build_model().eval()
    assert all(torch.equal(v, built.state_dict()[k]) for k, v in model.state_dict().items())
    assert isinstance(ckpt.tokenizer(), ByteTokenizer)


def test_a_corrupt_shard_is_refused_before_loading(exported):
    path, _ = exported
    shard = Checkpoint.open(path).weight_files[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"cannot read {shard}.*truncated or not safetensors"):
        Checkpoint.open(path).build_model()


def test_overrides_reach_the_converted_config(exported):
    path, _ = exported
    assert Checkpoint.open(path, moe_backend="eager").build_model().config.moe_backend == "eager"
    assert Checkpoint.open(path).build_model(dropout=0.2).config.dropout == 0.2
