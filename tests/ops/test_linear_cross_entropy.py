"""The chunked linear + cross-entropy equals the eager reference in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from moe_lab.ops.linear_cross_entropy import VOCAB_ALIGN, linear_cross_entropy_sum, shifted_linear_cross_entropy_sum


def _reference(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("vocab", [97, 256, 300])  # odd, already aligned, padded to 384
@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])  # several chunks with a ragged last one, one chunk
def test_value_and_gradients_equal_the_eager_loss_fp32(vocab, chunk_rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(vocab, 16, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (50,), generator=g)
    labels[[3, 17, 40]] = -100  # ignored rows count for nothing
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    got = linear_cross_entropy_sum(h, w, labels, chunk_rows=chunk_rows)
    want = _reference(h2, w2, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (2.5 * got).backward()
    (2.5 * want).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert w.grad.shape == (vocab, 16)  # the padding never reaches the weight's gradient


def test_bf16_autocast_is_within_bf16_noise():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g).requires_grad_()
    w = (0.2 * torch.randn(301, 32, generator=g)).requires_grad_()
    labels = torch.randint(0, 301, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_sum(h, w, labels, chunk_rows=16)
        want = _reference(h, w, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2)


def test_shifted_form_matches_the_trainers_next_token_loss():
    from moe_lab.training.fast_paths import lm_loss_sum

    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 9, 8, generator=g)
    w = torch.randn(99, 8, generator=g)
    labels = torch.randint(0, 99, (2, 9), generator=g)
    labels[1, 4] = -100
    torch.testing.assert_close(shifted_linear_cross_entropy_sum(h, w, labels, chunk_rows=5),
                               lm_loss_sum(F.linear(h, w), labels), rtol=1e-5, atol=1e-5)
    assert VOCAB_ALIGN % 64 == 0
