"""Grouped matmul: one matmul per expert over rows sorted by expert, in one call.

    y_NO = grouped_matmul(x_NI, w_EOI, tokens_per_expert_E)   # y[rows of e] = x[rows of e] @ w[e].T

``torch.nn.functional.grouped_mm`` runs it where the device, dtype and alignment allow
(CPU fp32/bf16; CUDA sm90+ bf16); elsewhere a padded batched matmul computes the same
function. Both are tested against a loop over experts (``GroupedExperts.forward_eager``).

Shape letters: N rows (sorted by expert), I input features, O output features, E experts,
C rows of the fullest expert (the padded path's per-expert capacity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs for this device, dtype and sizes.

    grouped_mm needs row strides that are multiples of 16 bytes; on CUDA it needs an sm90+
    card and bf16.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    elem = torch.empty((), dtype=dtype).element_size()
    if any((d * elem) % 16 for d in dims):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, with a contiguous gradient in the backward."""
    return ContiguousGrad.apply(x)


def _padded_bmm(x_NI: torch.Tensor, w_EIO: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Fallback: scatter rows into ``[E, C, I]`` (C = rows of the fullest expert), one ``bmm``
    with ``w_EIO`` (already transposed for ``x @ w``), gather the rows back: ``[N, O]``."""
    num_experts = w_EIO.shape[0]
    counts = tokens_per_expert_E.tolist()
    capacity = max(counts) if counts else 0
    if capacity == 0:
        return x_NI.new_zeros(x_NI.shape[0], w_EIO.shape[-1])
    expert_of_row_N = torch.repeat_interleave(
        torch.arange(num_experts, device=x_NI.device), tokens_per_expert_E.to(x_NI.device)
    )
    starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    pos_in_expert_N = torch.arange(x_NI.shape[0], device=x_NI.device) - starts_E.to(x_NI.device)[expert_of_row_N]
    buf_ECI = x_NI.new_zeros(num_experts, capacity, x_NI.shape[-1])
    buf_ECI = buf_ECI.index_put((expert_of_row_N, pos_in_expert_N), x_NI)
    out_ECO = torch.bmm(buf_ECI, w_EIO)
    return out_ECO[expert_of_row_N, pos_in_expert_N]


def grouped_matmul(x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e].T`` for every expert ``e`` in one call.

    Args:
        x_NI: rows sorted by expert.
        w_EOI: stacked weights (``nn.Linear`` layout per expert).
        tokens_per_expert_E: row counts, summing to N.
    Returns:
        ``[N, O]``, in the autocast dtype under autocast.
    """
    dtype = x_NI.dtype
    if torch.is_autocast_enabled(x_NI.device.type):
        dtype = torch.get_autocast_dtype(x_NI.device.type)
    x_NI = x_NI.to(dtype)
    w_EIO = w_EOI.to(dtype).transpose(-2, -1)
    # torch.compile's fake-tensor rule for grouped_mm accepts bf16 only (eager CPU also takes fp32)
    compiling = torch.compiler.is_compiling() and dtype != torch.bfloat16
    if not compiling and grouped_mm_supported(x_NI.device, dtype, w_EOI.shape[-1], w_EOI.shape[-2]):
        offs_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
        return F.grouped_mm(x_NI.contiguous(), w_EIO, offs=offs_E)
    return _padded_bmm(x_NI, w_EIO, tokens_per_expert_E)
