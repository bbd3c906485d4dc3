"""moe_lab.training.fast_paths on CPU: the loss by hand, and the CPU path compiles nothing.

The CUDA path (compiled decoder layers + compiled loss) is checked against eager on a GPU
by benchmarks/gpu_check.py.
"""

import math

import pytest
import torch
from helpers import tiny_config

from moe_lab import MoEModel, MoETrainer
from moe_lab.constants import IGNORE_INDEX
from moe_lab.training.fast_paths import apply_fast_paths, lm_loss_sum


def _by_hand(logits_BSV, labels_BS):
    """Sum over b, t < S-1 with labels[b, t+1] != -100 of -log softmax(logits[b, t])[labels[b, t+1]]."""
    total = 0.0
    b_size, s_size, _ = logits_BSV.shape
    for b in range(b_size):
        for t in range(s_size - 1):
            y = int(labels_BS[b, t + 1])
            if y == -100:
                continue
            row = [float(v) for v in logits_BSV[b, t]]
            m = max(row)
            log_z = m + math.log(sum(math.exp(v - m) for v in row))
            total += log_z - row[y]
    return total


def _case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g) * 3
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 2] = IGNORE_INDEX
    labels[1, 4] = IGNORE_INDEX
    labels[1, 0] = IGNORE_INDEX  # position 0 is never a target: no effect either way
    return logits, labels


def test_ignore_index_is_minus_100():
    assert IGNORE_INDEX == -100


def test_lm_loss_sum_equals_hand_computed_shifted_cross_entropy():
    logits, labels = _case()
    got = lm_loss_sum(logits, labels)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(got) == pytest.approx(_by_hand(logits, labels), rel=1e-5)
    # a sum, not a mean: 2 * 4 targets, 2 of them ignored (labels[1, 0] is not a target)
    per_target = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    assert float(got) == pytest.approx(float(per_target.sum()), rel=1e-6)
    assert int((labels[:, 1:] != IGNORE_INDEX).sum()) == 6


def test_lm_loss_sum_shifts_by_one():
    logits, labels = _case()
    base = lm_loss_sum(logits, labels)
    # the last position predicts nothing, the first label is nobody's target
    changed_logits = logits.clone()
    changed_logits[:, -1] += torch.randn(2, 7) * 5
    changed_labels = labels.clone()
    changed_labels[:, 0] = (labels[:, 0].clamp(min=0) + 1) % 7
    assert torch.equal(lm_loss_sum(changed_logits, changed_labels), base)
    # ... while the logits at position 0 predict labels[:, 1]
    changed_logits = logits.clone()
    changed_logits[0, 0, labels[0, 1]] += 4.0  # more confident in the right next token: lower loss
    assert float(lm_loss_sum(changed_logits, labels)) < float(base) - 1e-3


def test_lm_loss_sum_all_ignored_is_zero_and_bf16_is_upcast():
    logits, labels = _case()
    assert float(lm_loss_sum(logits, torch.full_like(labels, IGNORE_INDEX))) == 0.0
    low = logits.to(torch.bfloat16)
    got = lm_loss_sum(low, labels)
    assert got.dtype == torch.float32  # computed in fp32, not in bf16
    assert float(got) == pytest.approx(_by_hand(low.float(), labels), rel=1e-5)


def _tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_apply_fast_paths_on_cpu_returns_the_eager_loss_and_compiles_nothing():
    torch.manual_seed(0)
    model = MoEModel.from_config(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 8))
    before = model(ids)
    flags = _tf32_flags()
    fn = apply_fast_paths(model, torch.device("cpu"))
    assert fn is lm_loss_sum
    assert all(layer._compiled_call_impl is None for layer in model.layers)  # what nn.Module.compile sets
    assert _tf32_flags() == flags
    assert torch.equal(model(ids), before)


def test_trainer_on_cpu_uses_the_eager_loss():
    model = MoEModel.from_config(tiny_config())
    trainer = MoETrainer(model, device="cpu", fast_paths=True, progress_bar=False, tensorboard=False)
    assert trainer.settings.loss_sum_fn is lm_loss_sum
    assert all(layer._compiled_call_impl is None for layer in trainer.model.layers)


@pytest.mark.slow  # compiling on CPU takes ~30 s on 2 cores
def test_compiled_lm_loss_sum_equals_eager_on_cpu():
    logits, labels = _case()
    compiled = torch.compile(lm_loss_sum, dynamic=False)  # what apply_fast_paths returns on CUDA
    x_eager = logits.clone().requires_grad_()
    x_comp = logits.clone().requires_grad_()
    eager = lm_loss_sum(x_eager, labels)
    got = compiled(x_comp, labels)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    eager.backward()
    got.backward()
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-5, atol=1e-6)
    assert (x_eager.grad[:, -1] == 0).all()  # the last position gets no gradient


def test_chunked_lm_loss_trains_like_the_logits_loss(tmp_path):
    """training.lm_loss="chunked" (the CUDA fast path's LM loss) gives the losses and weights
    of the logits + cross-entropy path, on CPU in fp32."""
    import torch as _torch

    from moe_lab.training import MoETrainer

    rows = [{"input_ids": _torch.randint(0, 97, (12,), generator=_torch.Generator().manual_seed(i)).tolist()}
            for i in range(16)]
    results = {}
    for lm_loss in ("logits", "chunked"):
        _torch.manual_seed(0)
        trainer = MoETrainer(MoEModel.from_config(tiny_config()), lm_loss=lm_loss, mixed_precision=False,
                             progress_bar=False, tensorboard=False, logging_steps=1, seed=0)
        assert (trainer.settings.head_loss_fn is None) == (lm_loss == "logits")
        res = trainer.train(rows, batch_size=4, max_steps=3, warmup_steps=1, learning_rate=1e-2,
                            output_dir=str(tmp_path / lm_loss))
        results[lm_loss] = (res.history["loss"], trainer.model.state_dict())
    (a, wa), (b, wb) = results["logits"], results["chunked"]
    assert a == pytest.approx(b, rel=1e-5)
    for k in wa:  # relative error per tensor (Adam turns summation-order noise into single-element steps)
        rel = float((wa[k].double() - wb[k].double()).norm() / wa[k].double().norm().clamp(min=1e-30))
        assert rel <= 1e-5, f"{k}: relative error {rel:.1e}"


# ---- training.cuda_graphs -------------------------------------------------------------
# The graphs themselves need a GPU (benchmarks/gpu_check.py compares them with the compiled
# layers without graphs); here: the option's validation, and the step's CUDA-graph mode
# (gradients kept allocated, zeroed in place, one cudagraph-trees step per micro-batch),
# which runs on CPU too.


@pytest.mark.parametrize("kwargs, expected", [
    (dict(cuda_graphs=True, device="cpu"), "cuda_graphs needs a CUDA device, got device 'cpu'"),
    (dict(cuda_graphs=True, fast_paths=False, device="cuda"), "cuda_graphs needs fast_paths: true"),
    (dict(cuda_graphs=True, activation_checkpointing="full", device="cuda"),
     "does not combine with activation_checkpointing 'full'"),
])
def test_cuda_graphs_option_is_checked_in_the_config(kwargs, expected):
    from moe_lab.config import TrainingConfig
    from moe_lab.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match=expected):
        TrainingConfig(**kwargs)
    assert TrainingConfig(cuda_graphs=True, device="cuda").cuda_graphs  # the valid combination


def test_cuda_graphs_on_a_cpu_only_machine_fails_before_compiling():
    from moe_lab.errors import ConfigError

    model = MoEModel.from_config(tiny_config())
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device; device 'auto' resolved to 'cpu'"):
        MoETrainer(model, cuda_graphs=True, progress_bar=False, tensorboard=False)
    assert all(layer._compiled_call_impl is None for layer in model.layers)


def test_cuda_graph_step_mode_accumulates_like_the_plain_step():
    """StepSettings(cuda_graphs=True): two micro-batches give the plain step's losses, gradient
    norms and weights, and the gradients stay allocated (zeroed in place) between steps, so
    that no backward output ever becomes a parameter's ``.grad``."""
    from moe_lab.training.step import StepSettings, train_step

    g = torch.Generator().manual_seed(3)
    steps = [[{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
              for ids in torch.randint(0, 97, (2, 2, 16), generator=g)] for _ in range(3)]
    runs = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = MoEModel.from_config(tiny_config())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        settings = StepSettings(torch.device("cpu"), max_grad_norm=1.0, cuda_graphs=graphs)
        stats, grad_ids, allocated_at_forward = [], set(), []
        model.register_forward_pre_hook(
            lambda mod, args: allocated_at_forward.append(all(p.grad is not None for p in mod.parameters())))
        for micro in steps:
            s = train_step(model, opt, micro, settings=settings)
            stats.append((s.loss_share, s.grad_norm))
            grads = [p.grad for p in model.parameters()]
            if graphs:
                assert all(gr is not None and not gr.any() for gr in grads)  # kept, and zero
                grad_ids |= {id(gr) for gr in grads}
            else:
                assert all(gr is None for gr in grads)
        if graphs:  # allocated before the first backward, and the same gradient tensors in every step
            assert allocated_at_forward == [True] * 6
            assert len(grad_ids) == len(list(model.parameters()))
        else:
            assert allocated_at_forward[0] is False
        runs[graphs] = (stats, model.state_dict())
    (plain, w_plain), (graphed, w_graphed) = runs[False], runs[True]
    for (la, na), (lb, nb) in zip(plain, graphed):
        assert la == pytest.approx(lb, rel=1e-6) and na == pytest.approx(nb, rel=1e-6)
    for k in w_plain:
        torch.testing.assert_close(w_graphed[k], w_plain[k], rtol=1e-6, atol=1e-7)
