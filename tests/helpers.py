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


def free_port() -> int:
    """A free loopback port in [20000, 32000): above Ray's worker ports (10002-19999) and below
    Linux's ephemeral range (32768+), where the Ray clusters of the other pytest worker bind
    their own ports, so that none of them takes this one before the test binds it."""
    import random
    import socket

    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in [20000, 32000)")
