import pytest
import torch

from moe_lab import ExpertError, FeedForwardExpert, GLUExpert, GroupedExperts
from moe_lab.model.dispatch import LocalDispatcher


def _run(experts, x, counts, backend):
    experts.zero_grad()
    xx = x.clone().requires_grad_(True)
    y = experts(xx, counts, backend=backend)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), xx.grad, experts.w_in.grad.clone(), experts.w_out.grad.clone()


@pytest.mark.parametrize(
    "expert_type, activation, hidden, inter",
    [
        ("glu", "swiglu", 16, 24),
        ("glu", "geglu", 16, 24),
        ("ffn", "gelu", 16, 24),
        ("ffn", "relu", 16, 24),
        ("glu", "swiglu", 10, 6),  # unaligned: grouped path uses the padded-bmm fallback
    ],
)
def test_grouped_equals_eager_forward_and_backward(expert_type, activation, hidden, inter):
    experts = GroupedExperts(4, hidden, inter, expert_type=expert_type, activation=activation, dropout=0.0)
    counts = torch.tensor([3, 0, 5, 2])  # includes an expert with no tokens
    x = torch.randn(int(counts.sum()), hidden)
    ref = _run(experts, x, counts, "eager")
    fast = _run(experts, x, counts, "grouped")
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_bf16_close_to_fp32_eager():
    experts = GroupedExperts(3, 16, 32)
    counts = torch.tensor([4, 4, 8])
    x = torch.randn(16, 16)
    ref = experts(x, counts, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = experts(x, counts, backend="grouped")
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("expert_type, activation", [("glu", "swiglu"), ("ffn", "gelu")])
def test_stacked_expert_equals_standalone_module(expert_type, activation):
    experts = GroupedExperts(3, 8, 12, expert_type=expert_type, activation=activation, dropout=0.0)
    x = torch.randn(5, 8)
    for e in range(3):
        single = experts.expert(e).eval()
        assert isinstance(single, GLUExpert if expert_type == "glu" else FeedForwardExpert)
        counts = torch.zeros(3, dtype=torch.long)
        counts[e] = 5
        torch.testing.assert_close(experts(x, counts, backend="eager"), single(x))


def test_load_expert_round_trip():
    experts = GroupedExperts(2, 8, 12)
    src = GLUExpert(8, 12)
    experts.load_expert(1, src)
    x = torch.randn(4, 8)
    torch.testing.assert_close(experts.expert(1)(x), src(x))
    with pytest.raises(ExpertError, match="do not match"):
        experts.load_expert(0, GLUExpert(8, 10))


def test_dispatcher_round_trip_is_weighted_sum():
    disp = LocalDispatcher(3)
    x = torch.randn(4, 5)
    idx = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1]])
    w = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    x_sorted, counts, meta = disp.dispatch(x, idx, w)
    assert counts.tolist() == [2, 1, 2]
    # identity experts: combine gives sum_k w_k * x
    out = disp.combine(x_sorted, meta)
    expected = x * torch.tensor([1.0, 1.0, 1.0, 0.0]).unsqueeze(-1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (FeedForwardExpert, dict(hidden_size=8, intermediate_size=16, activation="swiglu"), "does not fit ffn"),
        (GLUExpert, dict(hidden_size=8, intermediate_size=16, activation="relu"), "does not fit glu"),
        (GLUExpert, dict(hidden_size=8, intermediate_size=16, activation="tanh"), "unknown activation 'tanh'"),
        (FeedForwardExpert, dict(hidden_size=0, intermediate_size=16), "hidden_size"),
        (FeedForwardExpert, dict(hidden_size=8, intermediate_size=16, dropout=1.5), "dropout"),
    ],
)
def test_expert_bad_arguments(cls, kwargs, match):
    with pytest.raises(ExpertError, match=match):
        cls(**kwargs)


def test_grouped_experts_bad_backend():
    with pytest.raises(ExpertError, match="unknown expert backend 'fast'"):
        GroupedExperts(2, 8, 8, backend="fast")


def test_fast_combine_equals_scatter_combine_forward_and_backward():
    disp = LocalDispatcher(4)
    x = torch.randn(6, 5)
    idx = torch.tensor([[0, 2], [1, 3], [2, 0], [3, 1], [0, 1], [2, 3]])
    w = torch.rand(6, 2)
    outs = []
    for all_valid in (False, True):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        x_sorted, counts, meta = disp.dispatch(xx, idx, ww, all_valid=all_valid)
        assert (meta.order is not None) == all_valid
        y = disp.combine(x_sorted * 2.0, meta)
        (y * torch.arange(30.0).view(6, 5)).sum().backward()
        outs.append((y.detach(), xx.grad, ww.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
