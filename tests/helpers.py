"""Shared test helpers (tests/ is on sys.path via pytest's pythonpath)."""

def tiny_config(**overrides):
    from moe_lab import MoEConfig

    base = dict(
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        num_experts=4,
        experts_per_token=2,
        expert_hidden_size=48,
        max_position_embeddings=64,
        dropout=0.0,
    )
    base.update(overrides)
    return MoEConfig(**base)
