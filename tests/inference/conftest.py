"""Tiny checkpoints for the inference tests (written with the real checkpoint code)."""

import pytest
import torch

from moe_lab import MoEModel
from moe_lab.data import ByteTokenizer
from moe_lab.checkpoint import write_checkpoint

#: skewed training-time routing counts: layer 0 favours experts 3 and 1, layer 1 experts 0 and 2
ROUTING_COUNTS = [[10.0, 300.0, 5.0, 900.0], [800.0, 20.0, 400.0, 1.0]]


def make_tiny_checkpoint(path, seed=0, routing=True, **overrides):
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    kwargs = dict(vocab_size=len(tok), hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                  experts_per_token=2, expert_hidden_size=32, max_position_embeddings=64, dropout=0.0)
    kwargs.update(overrides)
    model = MoEModel(**kwargs).eval()
    stats = None
    if routing:
        stats = {"moe_layer_indices": model.moe_layer_indices, "expert_counts": ROUTING_COUNTS[: len(model.moe_layers)]}
    write_checkpoint(path, model.config, model.state_dict(), routing_stats=stats, tokenizer=tok)
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(checkpoint dir, the MoEModel it holds)."""
    path = tmp_path_factory.mktemp("tiny-moe") / "model"
    model = make_tiny_checkpoint(path)
    return path, model


@pytest.fixture(scope="session")
def make_ckpt():
    """The checkpoint factory: ``make_ckpt(path, seed=0, routing=True, **model_overrides)``."""
    return make_tiny_checkpoint
