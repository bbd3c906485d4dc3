"""The 2025-2026 routing recipes, with hand-checked numbers: sigmoid scores, aux-loss-free
bias balancing, group-limited routing, balancing-loss scopes, router precision."""

import math

import pytest
import torch
from helpers import tiny_config

from moe_lab import ConfigError, MoEModel
from moe_lab.model.routers import TopKRouter, limit_to_top_groups, update_expert_bias
from moe_lab.training.losses import StepTotals, routing_losses
from moe_lab.training.step import StepSettings, train_step


def _router(**kw):
    r = TopKRouter(hidden_size=4, num_experts=4, top_k=2, **kw)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(4))  # logits = the hidden state itself
    return r


def test_sigmoid_scores_normalised_top_k_and_scaling_factor():
    r = _router(score_function="sigmoid", scaling_factor=2.5)
    x = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    w, e, info = r(x, training=False)
    s = torch.sigmoid(x[0])
    assert e.tolist() == [[0, 3]]
    expected = 2.5 * torch.stack([s[0], s[3]]) / (s[0] + s[3])
    torch.testing.assert_close(w[0], expected)
    torch.testing.assert_close(info["router_probs"][0], s / s.sum())  # what the balancing loss averages
    unnormalised = _router(score_function="sigmoid", normalize_weights=False)(x, training=False)[0]
    torch.testing.assert_close(unnormalised[0], torch.stack([s[0], s[3]]))


def test_aux_free_bias_changes_selection_not_weights():
    r = _router(bias_update_rate=0.1)
    x = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    p = torch.softmax(x[0], dim=-1)
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))  # favours expert 2 over expert 3
    w, e, _ = r(x, training=False)
    assert e.tolist() == [[2, 0]]  # ranked by the biased score
    torch.testing.assert_close(w[0], torch.stack([p[2], p[0]]) / (p[0] + p[2]))  # the unbiased probabilities
    # the update: bias += rate * sign(mean(load) - load)
    update_expert_bias(r, torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.6, 0.1]))
    assert "expert_bias" in dict(r.named_buffers()) and "expert_bias" in r.state_dict()


def test_group_limited_routing_picks_groups_first():
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.45, 0.3, 0.3]])  # groups of 2: sums 0.9, 0.95, 0.6
    kept = limit_to_top_groups(scores, num_groups=3, topk_groups=1)
    assert torch.isinf(kept[0, [0, 1, 4, 5]]).all() and kept[0, 2] == 0.5  # group 1 wins on its two best
    r = TopKRouter(hidden_size=6, num_experts=6, top_k=2, num_groups=3, topk_groups=1)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(6))
    _, e, _ = r(torch.log(scores + 1e-3), training=False)
    assert sorted(e[0].tolist()) == [2, 3]  # expert 0 has the best score alone, but its group loses


def test_recipe_config_errors_name_the_values():
    with pytest.raises(ConfigError, match=r"num_experts \(4\) must be divisible by num_groups \(3\)"):
        MoEModel.from_config(tiny_config(router_num_groups=3, router_topk_groups=1))
    with pytest.raises(ConfigError, match=r"top_k \(2\) must be <= topk_groups \(1\) \* experts per group \(1\)"):
        MoEModel.from_config(tiny_config(router_num_groups=4, router_topk_groups=1))
    with pytest.raises(ConfigError, match="router_score_function needs router_type 'top_k'"):
        MoEModel.from_config(tiny_config(router_type="expert_choice", router_score_function="sigmoid"))
    with pytest.raises(ConfigError, match="set both or neither"):
        MoEModel.from_config(tiny_config(router_num_groups=2))


def test_sequence_scope_is_the_mean_of_per_sequence_switch_losses():
    model = MoEModel.from_config(tiny_config(load_balancing_scope="sequence", num_layers=1, router_z_loss_coef=0.0,
                                             load_balancing_loss_coef=1.0))
    ids = torch.randint(0, 97, (3, 8))
    _, info = model(ids, return_routing_info=True)
    aux, lb_L, _ = routing_losses(info, model.config, lambda t: t)
    per_seq = []
    for b in range(3):  # each sequence alone is a micro-batch-scope loss of one sequence
        _, one = model(ids[b : b + 1], return_routing_info=True)
        per_seq.append(one["load_balancing_loss"][0])
    torch.testing.assert_close(lb_L[0], torch.stack(per_seq).mean())
    torch.testing.assert_close(aux, lb_L.sum())


def _grads_after_step(cfg, batches):
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights, compare the gradients
    captured = {}

    def keep(*_):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    opt.register_step_pre_hook(keep)
    stats = train_step(model, opt, batches, settings=StepSettings(max_grad_norm=None))
    return stats, captured


def _batches(n, rows, seq=10, pad=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (n * rows, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 6:] = 0
        mask[-1, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": ids[i * rows : (i + 1) * rows], "attention_mask": mask[i * rows : (i + 1) * rows],
             "labels": labels[i * rows : (i + 1) * rows]} for i in range(n)]


@pytest.mark.parametrize("scope, exact", [("global_batch", True), ("sequence", True), ("micro_batch", False)])
def test_accumulation_equals_one_big_batch_for_every_loss(scope, exact):
    """Accumulating 2 micro-batches of 3 equals one batch of 6 in the sequence and global-batch
    scopes (lb and z); the micro-batch scope's balancing loss is per micro-batch by design."""
    cfg = tiny_config(load_balancing_scope=scope, load_balancing_loss_coef=0.5, router_z_loss_coef=0.1,
                      router_jitter_noise=0.0)
    big_stats, big = _grads_after_step(cfg, _batches(1, 6))
    acc_stats, acc = _grads_after_step(cfg, _batches(2, 3))
    assert acc_stats.loss_share == pytest.approx(big_stats.loss_share, rel=1e-6) or not exact
    torch.testing.assert_close(acc_stats.layer_stats_3L[1], big_stats.layer_stats_3L[1], rtol=1e-5, atol=1e-7)  # z
    lb_equal = torch.allclose(acc_stats.layer_stats_3L[0], big_stats.layer_stats_3L[0], rtol=1e-5, atol=1e-7)
    assert lb_equal == exact
    if exact:
        for name in big:
            torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-7, msg=name)


def test_global_batch_prepass_replays_the_rng():
    """With jitter on, the real forwards route as the pre-pass did: the pre-pass counts equal
    the real forwards' selections."""
    cfg = tiny_config(load_balancing_scope="global_batch", router_jitter_noise=0.3, router_bias_update_rate=0.01)
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg)
    from moe_lab.training.step import step_selection_counts
    from moe_lab.training.runtime import Runtime

    batches = _batches(2, 3)
    torch.manual_seed(5)
    model.train()
    pre = step_selection_counts(model, batches, StepSettings(), Runtime())
    real = sum(model(b["input_ids"], attention_mask=b["attention_mask"], return_routing_info=True)[1]
               ["selection_counts"].double() for b in batches)
    torch.testing.assert_close(pre, real)


def test_bias_moves_towards_balance_during_training():
    cfg = tiny_config(router_bias_update_rate=0.05, load_balancing_loss_coef=0.0)
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = _batches(1, 6, pad=False)
    _, info = model(batches[0]["input_ids"], return_routing_info=True)
    load = info["selection_counts"][0].double()
    train_step(model, opt, batches)
    bias = model.moe_layers[0].router.expert_bias
    torch.testing.assert_close(bias, 0.05 * torch.sign(load.mean() - load).float())


def test_router_runs_in_fp32_under_autocast():
    model = MoEModel.from_config(tiny_config())
    router = model.moe_layers[0].router
    seen = {}
    router.register_forward_hook(lambda m, a, out: seen.update(info=out[2], weights=out[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, info = model(torch.randint(0, 97, (2, 8)), return_routing_info=True)
    assert logits.dtype == torch.bfloat16  # the rest of the model runs in bf16
    assert seen["info"]["router_logits"].dtype == torch.float32 and seen["weights"].dtype == torch.float32
    assert info["aux_loss"].dtype == torch.float32
    info["aux_loss"].backward()
    assert router.gate.weight.grad.dtype == torch.float32


def test_fine_grained_experts_route_and_match_the_eager_reference():
    cfg = tiny_config(num_experts=64, experts_per_token=8, expert_hidden_size=8, router_score_function="sigmoid",
                      router_num_groups=8, router_topk_groups=4, router_bias_update_rate=1e-3)
    torch.manual_seed(0)
    grouped = MoEModel.from_config(cfg)
    eager = MoEModel.from_config(cfg.replace(moe_backend="eager"))
    eager.load_state_dict(grouped.state_dict())
    ids = torch.randint(0, 97, (2, 16))
    a, info = grouped(ids, return_routing_info=True)
    b = eager(ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert info["expert_indices"][0].shape == (32, 8)
    groups = info["expert_indices"][0] // 8  # every token's experts lie in at most 4 groups
    assert all(len(set(row.tolist())) <= 4 for row in groups)


def test_router_bias_is_logged_saved_and_resumed(tmp_path):
    """The aux-loss-free bias is a buffer: in metrics.jsonl at each logging step, in the
    checkpoint, and restored by a resume (continuing exactly)."""
    import json

    from moe_lab import load_pretrained_moe
    from moe_lab.training import MoETrainer
    from moe_lab.training import metrics as M

    rows = [{"input_ids": list(torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(i)))}
            for i in range(16)]
    rows = [{"input_ids": [int(x) for x in r["input_ids"]]} for r in rows]
    cfg = tiny_config(router_bias_update_rate=0.01)
    opts = dict(progress_bar=False, tensorboard=False, mixed_precision=False, logging_steps=1, seed=0)
    train = dict(batch_size=4, learning_rate=1e-2, warmup_steps=1, save_steps=2, eval_steps=100)
    torch.manual_seed(0)
    full = MoETrainer(MoEModel.from_config(cfg), **opts)
    full.train(rows, max_steps=4, output_dir=str(tmp_path / "full"), **train)
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    biases = [r[M.MOE_LAYERS][0][M.ROUTER_BIAS] for r in records]
    assert len(biases) == 4 and biases[0] != biases[-1] and any(b != 0 for b in biases[-1])
    saved = load_pretrained_moe(tmp_path / "full" / "model").moe_layers[0].router.expert_bias
    torch.testing.assert_close(saved, torch.tensor(biases[-1]), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    resumed = MoETrainer(MoEModel.from_config(cfg), **opts)
    resumed.train(rows, max_steps=4, output_dir=str(tmp_path / "res"),
                  resume_from=str(tmp_path / "full" / "checkpoints" / "step-000002"), **train)
    torch.testing.assert_close(resumed.model.moe_layers[0].router.expert_bias, full.model.moe_layers[0].router.expert_bias)
