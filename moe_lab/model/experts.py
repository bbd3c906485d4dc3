"""Experts: single-expert modules and the stacked ``[E, ...]`` experts an MoE layer runs.

Two expert shapes, no biases:
- FFN: ``y = W_out · dropout(act(W_in · x))`` with act in {relu, gelu}.
- GLU: ``y = W_out · (act(W_gate · x) * (W_up · x))`` with swiglu (act = SiLU) or geglu (GELU).
  The gate and up projections are fused in one weight, gate rows first (the transformers v5
  Mixtral layout).

:class:`GroupedExperts` stacks all experts of a layer: ``w_in [E, I_in, D]`` (``I_in`` = I for
FFN, 2I for GLU) and ``w_out [E, D, I]``. It takes tokens already sorted by expert plus the
number of tokens per expert, and runs one of two paths:

- ``eager``: the reference; a Python loop over experts, two matmuls each.
- ``grouped``: one grouped matmul per projection for all experts at once
  (``torch.nn.functional.grouped_mm`` where the device, dtype and alignment allow it; else a
  padded batched matmul).

Both paths compute the same function; the tests check outputs and gradients agree.
Shape letters: N sorted token rows, D hidden, I intermediate, E experts.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExpertError
from ..types import ActivationType, ExpertType

_FFN_ACTS = {ActivationType.RELU: F.relu, ActivationType.GELU: F.gelu}
_GLU_ACTS = {ActivationType.SWIGLU: F.silu, ActivationType.GEGLU: F.gelu}
BACKENDS = ("auto", "grouped", "eager")


def _activation(expert_type: ExpertType, activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        act = ActivationType(activation)
    except ValueError:
        raise ExpertError(
            f"unknown activation {activation!r}; expected one of {[a.value for a in ActivationType]}"
        ) from None
    table = _GLU_ACTS if expert_type == ExpertType.GLU else _FFN_ACTS
    if act not in table:
        raise ExpertError(
            f"activation {act.value!r} does not fit {expert_type.value} experts "
            f"(expected one of {[a.value for a in table]})"
        )
    return table[act]


def _check_sizes(hidden_size: int, intermediate_size: int) -> None:
    for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ExpertError(f"{name} must be a positive int, got {v!r}")


class FeedForwardExpert(nn.Module):
    """One FFN expert: ``down(dropout(act(up(x))))``, no biases. ``x``: [..., D] -> [..., D]."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, activation: str = "gelu", dropout: float = 0.1
    ) -> None:
        super().__init__()
        _check_sizes(hidden_size, intermediate_size)
        if not 0.0 <= dropout < 1.0:
            raise ExpertError(f"dropout ({dropout!r}) must be in [0, 1)")
        self.act = _activation(ExpertType.FFN, activation)
        self.activation = ActivationType(activation).value
        self.up = nn.Linear(hidden_size, intermediate_size, bias=False)  # weight [I, D]
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)  # weight [D, I]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(self.act(self.up(x))))


class GLUExpert(nn.Module):
    """One gated expert: ``down(act(gate(x)) * up(x))``; gate and up fused in ``gate_up``."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "swiglu") -> None:
        super().__init__()
        _check_sizes(hidden_size, intermediate_size)
        self.act = _activation(ExpertType.GLU, activation)
        self.activation = ActivationType(activation).value
        self.intermediate_size = intermediate_size
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)  # weight [2I, D]
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)  # weight [D, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


# ---------------------------------------------------------------------------------------
# grouped matmul
# ---------------------------------------------------------------------------------------


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


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def _padded_bmm(x_ND: torch.Tensor, w_EKN: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Fallback grouped matmul: scatter rows into ``[E, max_tokens, K]``, one ``bmm``, gather back.

    ``w_EKN`` is ``[E, K, N_out]`` (already transposed for ``x @ w``).
    """
    num_experts = w_EKN.shape[0]
    counts = tokens_per_expert.tolist()
    max_tokens = max(counts) if counts else 0
    if max_tokens == 0:
        return x_ND.new_zeros(x_ND.shape[0], w_EKN.shape[-1])
    expert_of_row = torch.repeat_interleave(
        torch.arange(num_experts, device=x_ND.device), tokens_per_expert.to(x_ND.device)
    )  # [N]
    starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
    pos_in_expert = torch.arange(x_ND.shape[0], device=x_ND.device) - starts.to(x_ND.device)[expert_of_row]
    buf = x_ND.new_zeros(num_experts, max_tokens, x_ND.shape[-1])
    buf = buf.index_put((expert_of_row, pos_in_expert), x_ND)
    out = torch.bmm(buf, w_EKN)  # [E, max_tokens, N_out]
    return out[expert_of_row, pos_in_expert]


def grouped_matmul(x_ND: torch.Tensor, w_EOK: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e].T`` for every expert ``e`` in one call.

    Args:
        x_ND: [N, K] rows sorted by expert.
        w_EOK: [E, O, K] weights (``nn.Linear`` layout per expert).
        tokens_per_expert: [E] row counts, summing to N.
    Returns:
        [N, O].
    """
    dtype = x_ND.dtype
    if torch.is_autocast_enabled(x_ND.device.type):
        dtype = torch.get_autocast_dtype(x_ND.device.type)
    x_ND = x_ND.to(dtype)
    w_EKO = w_EOK.to(dtype).transpose(-2, -1)
    # torch.compile's fake-tensor rule for grouped_mm accepts bf16 only (eager CPU also takes fp32)
    compiling = torch.compiler.is_compiling() and dtype != torch.bfloat16
    if not compiling and grouped_mm_supported(x_ND.device, dtype, w_EOK.shape[-1], w_EOK.shape[-2]):
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        return F.grouped_mm(x_ND.contiguous(), w_EKO, offs=offs)
    return _padded_bmm(x_ND, w_EKO, tokens_per_expert)


class GroupedExperts(nn.Module):
    """All experts of one MoE layer with stacked weights.

    Args:
        num_experts: experts held by this module (the local shard under expert parallelism).
        hidden_size, intermediate_size: D and I.
        expert_type: "glu" or "ffn".
        activation: see :class:`~moe_lab.types.ActivationType`.
        dropout: dropout on the intermediate activations (FFN experts only).
        backend: "grouped" (fast), "eager" (reference loop) or "auto" (= grouped).

    ``forward(x_ND, tokens_per_expert_E)`` takes rows sorted by expert and returns [N, D].
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        expert_type: str = "glu",
        activation: str = "swiglu",
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_sizes(hidden_size, intermediate_size)
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ExpertError(f"num_experts must be a positive int, got {num_experts!r}")
        try:
            self.expert_type = ExpertType(expert_type)
        except ValueError:
            raise ExpertError(f"unknown expert_type {expert_type!r}; expected 'glu' or 'ffn'") from None
        self.act = _activation(self.expert_type, activation)
        self.activation = ActivationType(activation).value
        if backend not in BACKENDS:
            raise ExpertError(f"unknown expert backend {backend!r}; expected one of {list(BACKENDS)}")
        self.backend = backend
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        in_rows = 2 * intermediate_size if self.expert_type == ExpertType.GLU else intermediate_size
        self.w_in = nn.Parameter(torch.empty(num_experts, in_rows, hidden_size))  # [E, I_in, D]
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # [E, D, I]
        self.dropout = nn.Dropout(dropout if self.expert_type == ExpertType.FFN else 0.0)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: Optional[float] = None) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=std if out_std is None else out_std)

    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        if self.expert_type == ExpertType.GLU:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.dropout(self.act(h))

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        backend = backend or self.backend
        if backend == "eager":
            return self.forward_eager(x_ND, tokens_per_expert)
        return self.forward_grouped(x_ND, tokens_per_expert)

    def forward_eager(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Reference: loop over experts."""
        outs = []
        for e, x_e in enumerate(torch.split(x_ND, tokens_per_expert.tolist(), dim=0)):
            h = self._hidden(F.linear(x_e, self.w_in[e]))  # [n_e, I]
            outs.append(F.linear(h, self.w_out[e]))  # [n_e, D]
        if not outs:
            return x_ND.new_zeros(0, self.hidden_size)
        return torch.cat(outs, dim=0)

    def forward_grouped(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Fast path: one grouped matmul per projection."""
        h = grouped_matmul(x_ND, self.w_in, tokens_per_expert)  # [N, I_in]
        h = self._hidden(_ContiguousGrad.apply(h))  # [N, I]
        return _ContiguousGrad.apply(grouped_matmul(h, self.w_out, tokens_per_expert))  # [N, D]

    # ---- single experts ---------------------------------------------------------------
    def expert(self, idx: int) -> nn.Module:
        """A standalone copy of local expert ``idx`` (a FeedForwardExpert or GLUExpert)."""
        if not 0 <= idx < self.num_experts:
            raise ExpertError(f"expert index {idx} out of range [0, {self.num_experts})")
        if self.expert_type == ExpertType.GLU:
            m: nn.Module = GLUExpert(self.hidden_size, self.intermediate_size, self.activation)
            m.gate_up.weight.data.copy_(self.w_in[idx])
        else:
            m = FeedForwardExpert(self.hidden_size, self.intermediate_size, self.activation, self.dropout.p)
            m.up.weight.data.copy_(self.w_in[idx])
        m.down.weight.data.copy_(self.w_out[idx])
        return m.to(self.w_in.device)

    @torch.no_grad()
    def load_expert(self, idx: int, expert: nn.Module) -> None:
        """Copy a standalone expert's weights into slot ``idx``."""
        w_in = expert.gate_up.weight if isinstance(expert, GLUExpert) else expert.up.weight
        if w_in.shape != self.w_in.shape[1:] or expert.down.weight.shape != self.w_out.shape[1:]:
            raise ExpertError(
                f"expert shapes {tuple(w_in.shape)}/{tuple(expert.down.weight.shape)} do not match "
                f"{tuple(self.w_in.shape[1:])}/{tuple(self.w_out.shape[1:])}"
            )
        self.w_in[idx].copy_(w_in)
        self.w_out[idx].copy_(expert.down.weight)

    def params_per_expert(self) -> int:
        return self.w_in[0].numel() + self.w_out[0].numel()

    def flat_weights(self) -> torch.Tensor:
        """[E, params_per_expert]: ``w_in`` then ``w_out`` of each expert, flattened."""
        return torch.cat([self.w_in.detach().flatten(1), self.w_out.detach().flatten(1)], dim=1)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"type={self.expert_type.value}, activation={self.activation}, backend={self.backend}"
        )


def out_proj_std(std: float, num_layers: int) -> float:
    """GPT-2 style scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2 * num_layers)
