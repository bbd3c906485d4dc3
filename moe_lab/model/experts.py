"""Experts: single-expert modules and the stacked ``[E, ...]`` experts an MoE layer runs.

Two expert shapes, no biases:
- FFN: ``y = W_out · dropout(act(W_in · x))`` with act in {relu, gelu}.
- GLU: ``y = W_out · (act(W_gate · x) * (W_up · x))`` with swiglu (act = SiLU) or geglu (GELU).
  The gate and up projections are fused in one weight, gate rows first (the transformers v5
  Mixtral layout).

:class:`GroupedExperts` stacks all experts of a layer: ``w_in`` ``[E, I_in, D]`` (``I_in`` = I
for FFN, 2I for GLU) and ``w_out`` ``[E, D, I]``. It takes tokens already sorted by expert
plus the number of tokens per expert, and runs one of the backends of :data:`EXPERT_BACKENDS`
(chosen by name, all with one signature):

- ``eager``: the reference; a Python loop over experts, two matmuls each.
- ``grouped``: one grouped matmul per projection for all experts at once
  (:func:`moe_lab.ops.grouped_mm.grouped_matmul`); ``auto`` means ``grouped``.

Both compute the same function; the tests check outputs and gradients agree.
``GroupedExperts.EXPERT_PARAMS`` declares which parameters are stacked over experts (dim 0):
expert parallelism shards exactly those (:meth:`GroupedExperts.shard`), and
:func:`moe_lab.model.transformer.expert_parameter_names` lists them for a whole model.

Shape letters: N sorted token rows, D hidden, I intermediate, E experts.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExpertError
from ..ops.grouped_mm import contiguous_grad, grouped_matmul
from ..types import ActivationType, ExpertType

_FFN_ACTS = {ActivationType.RELU: F.relu, ActivationType.GELU: F.gelu}
_GLU_ACTS = {ActivationType.SWIGLU: F.silu, ActivationType.GEGLU: F.gelu}


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


class GroupedExperts(nn.Module):
    """All experts of one MoE layer with stacked weights.

    Args:
        num_experts: experts held by this module (the local shard under expert parallelism).
        hidden_size, intermediate_size: D and I.
        expert_type: "glu" or "ffn".
        activation: see :class:`~moe_lab.types.ActivationType`.
        dropout: dropout on the intermediate activations (FFN experts only).
        backend: a name in :data:`EXPERT_BACKENDS` ("grouped", the fast path; "eager", the
            reference loop) or "auto" (= grouped).

    ``forward(x_ND, tokens_per_expert_E)`` takes rows sorted by expert and returns [N, D].
    """

    #: parameters stacked over experts along dim 0 (what expert parallelism shards)
    EXPERT_PARAMS = ("w_in", "w_out")

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
        _resolve_backend(backend)
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
        return EXPERT_BACKENDS[_resolve_backend(backend or self.backend)](self, x_ND, tokens_per_expert)

    def local_weights(self) -> tuple:
        """``(w_in, w_out)`` as this rank multiplies by them: the parameters, or this rank's
        pieces when they are DTensors (expert tensor parallelism splits them along the
        intermediate dim, and its hooks sum the partial outputs; see
        moe_lab.parallel.tensor_parallel.ExpertTensorParallel). A GLU's piece keeps the
        ``[gate; up]`` row order, so ``_hidden`` splits it as the whole weight."""
        return tuple(w.to_local() if hasattr(w, "to_local") else w for w in (self.w_in, self.w_out))

    def forward_eager(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Reference: loop over experts."""
        w_in_EID, w_out_EDI = self.local_weights()
        outs = []
        for e, x_nD in enumerate(torch.split(x_ND, tokens_per_expert.tolist(), dim=0)):
            h_nI = self._hidden(F.linear(x_nD, w_in_EID[e]))
            outs.append(F.linear(h_nI, w_out_EDI[e]))  # [n_e, D]
        if not outs:
            return x_ND.new_zeros(0, self.hidden_size)
        return torch.cat(outs, dim=0)

    def forward_grouped(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Fast path: one grouped matmul per projection."""
        w_in_EID, w_out_EDI = self.local_weights()  # I here is I_in (2I for GLU) for w_in
        h_NI = self._hidden(contiguous_grad(grouped_matmul(x_ND, w_in_EID, tokens_per_expert)))
        return contiguous_grad(grouped_matmul(h_NI, w_out_EDI, tokens_per_expert))  # [N, D]

    # ---- expert parallelism ------------------------------------------------------------
    def shard(self, rank: int, size: int) -> int:
        """Keep experts ``[rank * E/size, (rank + 1) * E/size)`` only (each of
        :attr:`EXPERT_PARAMS` becomes a new parameter holding those rows). Returns the first
        global expert id kept."""
        if size < 1 or self.num_experts % size or not 0 <= rank < size:
            raise ExpertError(f"cannot shard {self.num_experts} experts as rank {rank} of {size}")
        local = self.num_experts // size
        rows = slice(rank * local, (rank + 1) * local)
        for name in self.EXPERT_PARAMS:
            setattr(self, name, nn.Parameter(getattr(self, name).data[rows].clone()))
        self.num_experts = local
        return rank * local

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


#: expert computation backends by name, all called as ``fn(experts, x_ND, tokens_per_expert_E)``
EXPERT_BACKENDS: Dict[str, Callable[[GroupedExperts, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "eager": GroupedExperts.forward_eager,
    "grouped": GroupedExperts.forward_grouped,
}
#: backend names a config may give ("auto" resolves to "grouped")
BACKENDS = ("auto", *EXPERT_BACKENDS)


def _resolve_backend(name: str) -> str:
    if name == "auto":
        return "grouped"
    if name not in EXPERT_BACKENDS:
        raise ExpertError(f"unknown expert backend {name!r}; expected one of {list(BACKENDS)}")
    return name
