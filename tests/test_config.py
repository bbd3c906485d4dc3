import json

import pytest

from moe_lab import ConfigError, MoEConfig, MoEError, TrainingConfig


def test_moe_config_defaults():
    c = MoEConfig()
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_experts, c.experts_per_token) == (50257, 768, 12, 8, 2)
    assert c.router_type.value == "top_k" and c.load_balancing_loss_coef == 0.01
    assert c.intermediate_size == 3072


def test_training_config_defaults():
    t = TrainingConfig()
    assert t.output_dir == "./outputs" and t.num_epochs == 3 and t.batch_size == 16
    assert t.learning_rate == 1e-4 and t.warmup_steps == 1000
    assert t.mixed_precision is True and t.gradient_accumulation_steps == 1


def test_json_round_trip_is_exact(tmp_path):
    c = MoEConfig(hidden_size=64, num_attention_heads=4, router_type="switch", experts_per_token=1,
                  capacity_factor=1.5, activation="geglu", moe_layer_frequency=2)
    path = tmp_path / "config.json"
    c.to_json(path)
    again = MoEConfig.from_json(path)
    assert again == c and again.to_dict() == c.to_dict()
    assert json.loads(path.read_text()) == c.to_dict()
    t = TrainingConfig(batch_size=4)
    assert TrainingConfig.from_dict(t.to_dict()) == t


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=4, experts_per_token=5), r"experts_per_token \(5\) must be <= num_experts \(4\)"),
        (dict(num_experts=0), r"num_experts = 0"),
        (dict(num_experts=1025), r"num_experts = 1025"),
        (dict(router_type="best"), r"router_type = 'best'"),
        (dict(expert_type="ffn", activation="swiglu"), r"activation 'swiglu' does not fit expert_type 'ffn'"),
        (dict(activation="tanh"), r"activation = 'tanh'"),
        (dict(hidden_size=100, num_attention_heads=3), r"hidden_size \(100\) must be divisible by num_attention_heads \(3\)"),
        (dict(hidden_size=-8), r"hidden_size = -8"),
        (dict(vocab_size=0), r"vocab_size = 0"),
        (dict(num_attention_heads=12, num_key_value_heads=5), r"num_key_value_heads \(5\)"),
        (dict(router_type="switch", experts_per_token=2), r"experts_per_token \(2\): leave it unset or set it to 1"),
        (dict(hidden_sise=8), r"hidden_sise: unknown field"),
    ],
)
def test_bad_config_names_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match) as exc:
        MoEConfig(**kwargs)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, MoEError)


def test_assignment_is_validated():
    c = MoEConfig()
    with pytest.raises(ConfigError, match="num_layers = 0"):
        c.num_layers = 0


def test_from_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        MoEConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MoEConfig.from_json(bad)


@pytest.mark.parametrize("build", ["config", "model"])
def test_switch_router_routes_one_expert_by_default(build):
    """router_type='switch' with experts_per_token left unset is top-1, for MoEConfig and
    MoEModel alike; an explicit value other than 1 is a ConfigError naming it."""
    from moe_lab import MoEModel

    small = dict(vocab_size=50, hidden_size=16, num_layers=1, num_attention_heads=2, num_experts=4)
    make = (lambda **kw: MoEConfig(**small, **kw)) if build == "config" else (lambda **kw: MoEModel(**small, **kw).config)
    assert make(router_type="switch").experts_per_token == 1
    assert make(router_type="switch", experts_per_token=1).experts_per_token == 1
    assert make().experts_per_token == 2  # the top_k default is untouched
    for k in (2, 3):
        with pytest.raises(ConfigError, match=rf"experts_per_token \({k}\)"):
            make(router_type="switch", experts_per_token=k)


def test_switch_model_routes_each_token_to_one_expert():
    import torch

    from moe_lab import MoEModel

    model = MoEModel(vocab_size=50, hidden_size=16, num_layers=1, num_attention_heads=2, num_experts=4,
                     router_type="switch", dropout=0.0)
    _, info = model(torch.randint(0, 50, (2, 8)), return_routing_info=True)
    assert info["expert_indices"][0].shape == (16, 1)
