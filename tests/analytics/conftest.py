"""Fixtures of the analytics tests: a tiny byte-level MoE model whose router sends arithmetic
characters to expert 0 and DNA letters to expert 1, and texts of those two domains."""

import types

import pytest
import torch

from moe_lab import MoEModel

ARITH_CHARS = "0123456789+="
DNA_CHARS = "acgt"


def rigged_model(experts_per_token: int = 1, num_layers: int = 1, num_experts: int = 4) -> MoEModel:
    """Attention outputs zero, so each token's hidden state is its embedding; the embedding of an
    arithmetic char is e_0 and of a DNA char e_1, and gate row 0 reads e_0, row 1 reads e_1."""
    torch.manual_seed(0)
    model = MoEModel(vocab_size=259, hidden_size=32, num_layers=num_layers, num_attention_heads=4,
                     num_experts=num_experts, experts_per_token=experts_per_token, expert_hidden_size=32,
                     max_position_embeddings=64, dropout=0.0)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.experts.w_out.zero_()  # experts add nothing: every layer sees the embedding
            gate = layer.mlp.router.gate.weight  # [E, D]
            gate.zero_()
            gate[0, 0] = 10.0
            gate[1, 1] = 10.0
        emb = model.embed_tokens.weight  # [V, D]
        for ch in ARITH_CHARS:
            emb[ord(ch)] = 0.0
            emb[ord(ch), 0] = 1.0
        for ch in DNA_CHARS:
            emb[ord(ch)] = 0.0
            emb[ord(ch), 1] = 1.0
    return model.eval()


def arith_text(i: int) -> str:
    return f"{i}+{i * 7}={i * 8}"


def dna_text(i: int) -> str:
    return "acgt"[i % 4] + "gattaca" * 3


def _domain_rows(n: int = 12):
    texts, labels = [], []
    for i in range(n):
        texts += [arith_text(i), dna_text(i)]
        labels += ["arithmetic", "dna"]
    return texts, labels


@pytest.fixture
def rigged():
    """``rigged.model(experts_per_token, num_layers)`` and ``rigged.rows(n) -> (texts, labels)``."""
    return types.SimpleNamespace(model=rigged_model, rows=_domain_rows, arith=ARITH_CHARS, dna=DNA_CHARS)
