"""From a sweep to its trials (moe_lab.tuning.trials): each trial's job, the fields without
effect (INERT_FIELDS, checked against the real model), the collapsed grid, and what a trial
reports. No Ray.
"""

import math
from pathlib import Path

import pytest
import yaml

from moe_lab.errors import ConfigError
from moe_lab.training import metrics as M
from moe_lab.tuning import INERT_FIELDS, REPORTED_METRICS, TrialResult, load_sweep, trial_job

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "sweep_smoke.yaml"


def test_switch_trials_run_with_one_expert_and_bad_combinations_fail():
    spec = load_sweep(SMOKE)
    job, adjustments = trial_job(spec, {"model": {"router_type": "switch"}})
    assert job.model.experts_per_token == 1
    assert adjustments and "experts_per_token 2 -> 1" in adjustments[0]
    job, adjustments = trial_job(spec, {"model.router_type": "expert_choice"})
    assert job.model.experts_per_token == 2 and adjustments == []
    with pytest.raises(ConfigError, match=r"model.experts_per_token=8.*experts_per_token \(8\) must be <= num_experts \(4\)"):
        trial_job(spec, {"model.experts_per_token": 8})


def test_expert_choice_balancing_loss_is_one_with_zero_gradient():
    """The premise of the load_balancing_loss_coef rule, and its drop_tokens condition."""
    import torch

    from moe_lab.model.routers import ExpertChoiceRouter, TopKRouter

    torch.manual_seed(0)
    x = torch.randn(24, 16)
    mask = torch.ones(24, dtype=torch.bool)
    mask[-5:] = False  # padding is excluded from the loss
    for kwargs in ({}, {"capacity_factor": 2.0, "top_k": 2, "jitter_noise": 0.2}):
        router = ExpertChoiceRouter(hidden_size=16, num_experts=4, **kwargs)
        _, _, info = router(x, training=True, token_mask=mask)
        info["load_balancing_loss"].backward()
        assert info["load_balancing_loss"].item() == pytest.approx(1.0, abs=1e-6), kwargs
        assert router.gate.weight.grad.abs().max().item() < 1e-7, kwargs
    # not so when unpicked tokens go to their top-1 expert over capacity, nor for token choice
    for router in (ExpertChoiceRouter(hidden_size=16, num_experts=4, capacity_factor=0.25, drop_tokens=False),
                   TopKRouter(hidden_size=16, num_experts=4)):
        _, _, info = router(x, training=True, token_mask=mask)
        info["load_balancing_loss"].backward()
        assert router.gate.weight.grad.abs().max().item() > 1e-4, router


#: two values of each inert field that differ wherever the field has an effect
_ALTERNATIVES = {
    "model.load_balancing_loss_coef": (0.0, 0.5),
    "model.capacity_factor": (0.5, 2.0),
    "model.normalize_router_weights": (True, False),
    "model.expert_choice_eval_routing": ("token_choice", "expert_choice"),
}


def _train_and_eval(**fields):
    """Gradients of one training step (LM loss + aux loss) and the eval logits of a tiny model."""
    import torch

    from moe_lab.config import MoEConfig
    from moe_lab.model.transformer import MoEModel

    cfg = MoEConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2, num_experts=4,
                    expert_hidden_size=32, max_position_embeddings=16, dropout=0.0, router_jitter_noise=0.1,
                    moe_backend="eager", **{k.split(".", 1)[1]: v for k, v in fields.items()})
    torch.manual_seed(0)
    model = MoEModel(config=cfg)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    torch.manual_seed(2)  # the same jitter draws
    logits, info = model(ids, return_routing_info=True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)) + info["aux_loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        return grads, model(ids)


def _same_training(field, values, conditions):
    import torch

    (ga, la), (gb, lb) = (_train_and_eval(**conditions, **{field: v}) for v in values)
    return set(ga) == set(gb) and all(torch.allclose(ga[n], gb[n], atol=1e-6) for n in ga) \
        and torch.allclose(la, lb, atol=1e-6)


@pytest.mark.parametrize("rule", INERT_FIELDS, ids=lambda r: r.field.split(".", 1)[1])
def test_every_inert_rule_holds_for_the_model(rule):
    """Each rule of INERT_FIELDS against the real model: under the rule's conditions the
    field changes no gradient and no eval output; under another router it does (so the check
    can fail). A rule with a fixed value is one the config enforces."""
    import itertools

    from moe_lab.config import MoEConfig

    if rule.runs_with is not None:  # switch: the config only accepts experts_per_token=1
        key = rule.field.split(".", 1)[1]
        with pytest.raises(ConfigError, match="routes each token to 1 expert"):
            MoEConfig(router_type="switch", **{key: 2})
        assert getattr(MoEConfig(router_type="switch", **{key: rule.runs_with}), key) == rule.runs_with
        return
    assert rule.field in _ALTERNATIVES, f"add two values of {rule.field} to _ALTERNATIVES"
    names = [n for n, _ in rule.when]
    for combo in itertools.product(*(allowed for _, allowed in rule.when)):
        assert _same_training(rule.field, _ALTERNATIVES[rule.field], dict(zip(names, combo))), combo
    other = next(r for r in ("top_k", "switch", "expert_choice") if r not in dict(rule.when)["model.router_type"])
    control = {n: (other if n == "model.router_type" else allowed[0]) for n, allowed in rule.when}
    assert not _same_training(rule.field, _ALTERNATIVES[rule.field], control), control


def test_inert_rules_are_checked():
    from moe_lab.tuning import InertRule, check_inert_rules

    with pytest.raises(ConfigError, match=r"inert rule for 'model.router_typ'.*unknown field"):
        check_inert_rules([InertRule("model.router_typ", (("model.drop_tokens", (True,)),), "x")])
    with pytest.raises(ConfigError, match=r"'model.drop_tokens' is also a condition"):
        check_inert_rules([InertRule("model.drop_tokens", (("model.router_type", ("top_k",)),), "x"),
                           InertRule("model.capacity_factor", (("model.drop_tokens", (False,)),), "x")])


def _grid_over_routers_and_coef(sweep_data, **fields):
    data = sweep_data({"model.router_type": {"grid": ["top_k", "switch", "expert_choice"]},
                       "model.load_balancing_loss_coef": {"grid": [0.001, 0.01, 0.1]},
                       "training.learning_rate": {"grid": [0.001, 0.003]}}, **fields)
    return load_sweep(data)


def test_grid_collapses_the_inert_coefficient_for_expert_choice(sweep_data):
    """The grid points (what Tune then runs is checked in tests/orchestration/test_tune.py)."""
    from moe_lab.tuning import grid_points

    spec = _grid_over_routers_and_coef(sweep_data, num_samples=2)
    model = grid_points(spec)["model"]
    ec = [v for v in model if v["model.router_type"] == "expert_choice"]
    assert ec == [{"model.router_type": "expert_choice"}]  # one trial, no coefficient
    assert sorted((v["model.router_type"], v["model.load_balancing_loss_coef"]) for v in model if v not in ec) == \
        sorted((r, c) for r in ("top_k", "switch") for c in (0.001, 0.01, 0.1))
    assert grid_points(spec)["training"] == [{"training.learning_rate": 0.001}, {"training.learning_rate": 0.003}]
    assert spec.num_trials == 2 * 7 * 2  # num_samples x (3 + 3 + 1) x 2 learning rates
    # with drop_tokens=false the balancing loss acts under expert choice too: no collapse
    assert _grid_over_routers_and_coef(sweep_data, overrides=yaml.safe_load(SMOKE.read_text())["overrides"]
                                       + ["model.drop_tokens=false"]).num_trials == 9 * 2


def test_trial_result_is_one_flat_report_per_evaluation():
    """Train records are remembered (mean over MoE layers), eval records make the report."""
    result = TrialResult(max_steps=300)
    layers = [{M.LOAD_IMBALANCE: 1.5, M.DROPPED_FRACTION: 0.1}, {M.LOAD_IMBALANCE: 2.5, M.DROPPED_FRACTION: 0.3}]
    assert result.merge({M.STEP: 2, M.LOSS: 3.0, M.TOKENS_PER_S: 100.0, M.MOE_LAYERS: layers}) is None
    report = result.merge({M.STEP: 2, M.EVAL_LOSS: 2.9, M.EVAL_PERPLEXITY: 18.1, M.EVAL_LOAD_IMBALANCE: [1.2, 1.6],
                           M.EVAL_DROPPED_FRACTION: [0.0, 0.2], M.EVAL_DEAD_EXPERTS: [0, 2],
                           M.EVAL_DEAD_EXPERT_FRACTION: 0.5})
    assert set(REPORTED_METRICS) <= set(report)  # every metric a sweep may schedule on or show
    assert report[M.STEP] == 2 and report["max_steps"] == 300
    assert report[M.EVAL_LOAD_IMBALANCE] == pytest.approx(1.4) and report["eval_load_imbalance_max"] == 1.6
    assert report[M.EVAL_DROPPED_FRACTION] == pytest.approx(0.1) and report["eval_dead_experts_max"] == 2
    assert report["train_loss"] == 3.0 and report[M.TOKENS_PER_S] == 100.0
    assert report[M.HISTORY_LOAD_IMBALANCE] == pytest.approx(2.0)
    assert report[M.HISTORY_DROPPED_FRACTION] == pytest.approx(0.2)
    before = TrialResult(max_steps=4).merge({M.STEP: 1, M.EVAL_LOSS: 1.0, M.EVAL_PERPLEXITY: 2.7})
    assert all(math.isnan(before[k]) for k in ("train_loss", M.TOKENS_PER_S, M.EVAL_LOAD_IMBALANCE))
    assert before[M.EVAL_DEAD_EXPERT_FRACTION] == 0.0 and before["eval_dead_experts_max"] == 0
