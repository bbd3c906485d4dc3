"""The routers' balancing losses are computed from local statistics outside the forward."""

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_config

from moe_lab import MoEModel
from moe_lab.training.losses import routing_losses


@pytest.mark.parametrize("router", ["top_k", "switch", "expert_choice"])
def test_routing_losses_in_one_process_equal_the_models_aux_loss(router):
    k = 1 if router == "switch" else 2
    model = MoEModel.from_config(tiny_config(router_type=router, experts_per_token=k, load_balancing_loss_coef=0.3,
                                             router_z_loss_coef=0.02))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # padding is excluded from both losses
    _, info = model(torch.randint(0, 97, (3, 10)), attention_mask=mask, return_routing_info=True)
    aux, lb_L, z_L = routing_losses(info, model.config, lambda t: t)
    torch.testing.assert_close(aux, info["aux_loss"])
    torch.testing.assert_close(lb_L, info["load_balancing_loss"])
    torch.testing.assert_close(z_L, info["router_z_loss"])
    assert float(info["num_tokens"]) == 27


def test_the_forward_never_communicates(monkeypatch):
    """Collectives stay out of the forward: a model forward with a process group present
    makes no torch.distributed call (only the loss layer reduces the statistics)."""
    calls = []
    for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter"):
        monkeypatch.setattr(dist, name, lambda *a, _n=name, **k: calls.append(_n))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    model = MoEModel.from_config(tiny_config())
    logits, info = model(torch.randint(0, 97, (2, 8)), return_routing_info=True)
    assert calls == []
    seen = []

    def summing(t):
        seen.append(t.clone())
        return 2 * t  # as if two ranks held the same statistics

    aux, lb_L, _ = routing_losses(info, model.config, summing)
    assert len(seen) == 1  # one collective for every layer's statistics
    # two identical ranks: global counts double, tokens double, so each rank's share is half
    torch.testing.assert_close(lb_L, info["load_balancing_loss"] / 2)
