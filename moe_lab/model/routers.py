"""Routers: which expert(s) each token goes to, and with what weight.

Every router is called as ``router(hidden_states_TD, training=True, token_mask=None)``
(``token_mask`` [T] bool, True for real tokens) and returns
``(combine_weights_TK, expert_indices_TK, info)``:

- ``expert_indices_TK`` (int64): the expert of each of the token's K slots, ``-1`` where the
  slot is empty (a padded token, a token dropped over capacity, an expert-choice slot the
  expert did not fill).
- ``combine_weights_TK`` (fp32): the weight that slot's expert output gets in the sum; 0 for
  empty slots.
- ``info``: ``router_logits`` [T, E], ``router_probs`` [T, E], ``load_balancing_loss`` and
  ``router_z_loss`` (scalars in the graph), ``expert_counts`` [E] (tokens processed per expert,
  real tokens only) and ``dropped_fraction`` (scalar).

Router math runs in fp32, also under autocast.

Capacity (token dropping) applies to ``training=True`` calls. With ``training=False``
(evaluation, inference) nothing is dropped unless an ``eval_capacity_factor`` is given, so a
token's output never depends on the other sequences of its batch (the one exception is
expert choice with ``eval_routing="expert_choice"``, which ranks tokens against the batch by
design). Capacity is computed from
the real tokens of the call itself: under data/expert parallelism each rank's micro-batch is
its own capacity group (as in Megatron-Core).

Losses (padding is excluded from both):
- load balancing (Switch Transformer, normalised as in Megatron-Core):
  ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of the router's selections (before any
  capacity dropping) that picked expert ``i`` and ``P_i`` the mean router probability of
  expert ``i``. It is 1 for perfectly uniform routing.
- z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``.

Routers return local statistics and never communicate. ``info`` also carries the sufficient
statistics of both losses: ``selection_counts`` [E] (no gradient), ``prob_sums`` [E] and
``z_sum`` (in the graph) and ``num_tokens`` (real tokens). The losses in ``info`` are the
plain values of this call; under data parallelism the trainer sums the counts and token
numbers over the ranks and recomputes each rank's share of the global loss from these
statistics (:func:`balancing_losses`, called by :mod:`moe_lab.training.losses`), outside the
model's forward.

Shape letters: T tokens, D hidden, E experts, K slots per token.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_groups
from ..errors import RouterError
from ..types import RouterType

RouterInfo = Dict[str, Any]


def load_balancing_loss(
    probs_TE: torch.Tensor,
    selection_counts_E: torch.Tensor,
    num_tokens: torch.Tensor,
    token_mask_T: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_i f_i * P_i``.

    Args:
        probs_TE: router probabilities (fp32, in the graph).
        selection_counts_E: how often each expert was selected, before capacity dropping.
        num_tokens: number of real tokens that ``P_i`` averages over (global when data-parallel).
        token_mask_T: True for real tokens; padded rows are excluded from ``P``.
    """
    num_experts = probs_TE.shape[-1]
    if token_mask_T is not None:
        probs_TE = probs_TE * token_mask_T.unsqueeze(-1).to(probs_TE.dtype)
    f_E = selection_counts_E.to(probs_TE.dtype) / selection_counts_E.sum().clamp(min=1).to(probs_TE.dtype)
    p_sum_E = probs_TE.sum(dim=0)  # [E], local sum
    return num_experts * (f_E * p_sum_E).sum() / num_tokens.clamp(min=1).to(probs_TE.dtype)


def router_z_loss(
    logits_TE: torch.Tensor, num_tokens: torch.Tensor, token_mask_T: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t logsumexp(logits_t)^2`` over real tokens."""
    z_T = torch.logsumexp(logits_TE, dim=-1).square()
    if token_mask_T is not None:
        z_T = z_T * token_mask_T.to(z_T.dtype)
    return z_T.sum() / num_tokens.clamp(min=1).to(z_T.dtype)


def balancing_losses(
    prob_sums_LE: torch.Tensor, selection_counts_LE: torch.Tensor, z_sums_L: torch.Tensor, num_tokens: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load-balancing and z-loss per layer from their sufficient statistics: ``(lb_L, z_L)``.

    ``lb = E * sum_i f_i * prob_sums_i / num_tokens`` with ``f`` the selection counts as
    fractions, and ``z = z_sums / num_tokens``. With the counts and ``num_tokens`` summed over
    data-parallel ranks and the ``prob_sums``/``z_sums`` of this rank, each rank gets its share
    of the global loss (the shares sum to the loss of the whole global batch).
    """
    counts = selection_counts_LE.to(prob_sums_LE.dtype)
    f_LE = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    n = num_tokens.to(prob_sums_LE.dtype).clamp(min=1)
    lb_L = prob_sums_LE.shape[-1] * (f_LE * prob_sums_LE).sum(dim=-1) / n
    return lb_L, z_sums_L / n


#: router score functions (TopKRouter)
SCORE_FUNCTIONS = ("softmax", "sigmoid")


def limit_to_top_groups(scores_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """``scores`` with every expert outside the token's ``topk_groups`` best groups set to -inf.

    A group's score is the sum of its two best expert scores (DeepSeek-V3), or its best one
    when a group holds a single expert."""
    t, e = scores_TE.shape
    grouped_TGX = scores_TE.view(t, num_groups, e // num_groups)
    best = grouped_TGX.topk(min(2, e // num_groups), dim=-1).values.sum(dim=-1)  # [T, G]
    keep_TG = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(topk_groups, dim=-1).indices, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(t, num_groups, e // num_groups).reshape(t, e)
    return scores_TE.masked_fill(~keep_TE, float("-inf"))


@torch.no_grad()
def update_expert_bias(router: nn.Module, load_E: torch.Tensor) -> None:
    """Aux-loss-free balancing step: ``bias += rate * sign(mean(load) - load)`` (DeepSeek-V3).

    ``load_E``: the expert load of the optimizer step (selections before capacity, summed over
    micro-batches and data-parallel ranks, so every rank applies the same update)."""
    bias = getattr(router, "expert_bias", None)
    if bias is None:
        return
    load = load_E.to(bias.device, torch.float32)
    bias.add_(router.bias_update_rate * torch.sign(load.mean() - load))


def count_assignments(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of non-empty slots per expert: int64 [E] (slots holding -1 are skipped).

    A scatter-add rather than ``bincount``: no device-to-host sync, so it can run inside CUDA
    graphs and compiled regions.
    """
    flat = expert_indices.reshape(-1)
    flat = torch.where(flat >= 0, flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]


def capacity_positions(expert_indices_KT: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of each assignment in its expert's queue, in priority order.

    ``expert_indices_KT`` is slot-major (all first choices, then all second choices, ...) and
    may hold -1 for empty slots. Returns int64 [K, T]; -1 slots get an arbitrary position.
    """
    flat = expert_indices_KT.reshape(-1)
    one_hot = F.one_hot(flat.clamp(min=0), num_experts) * (flat >= 0).unsqueeze(-1)  # [K*T, E]
    pos = one_hot.cumsum(dim=0) - 1  # [K*T, E]
    return pos.gather(1, flat.clamp(min=0).unsqueeze(-1)).squeeze(-1).reshape(expert_indices_KT.shape)


class Router(nn.Module):
    """Shared parts of the routers: the gate projection, jitter, fp32 logits, losses."""

    router_type: RouterType

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        router_bias: bool = False,
        jitter_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise RouterError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise RouterError(f"num_experts must be a positive int, got {num_experts!r}")
        from ..constants import MAX_EXPERTS_SUPPORTED

        if num_experts > MAX_EXPERTS_SUPPORTED:
            raise RouterError(f"num_experts ({num_experts}) must be <= {MAX_EXPERTS_SUPPORTED}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise RouterError(f"top_k ({top_k!r}) must be an int in [1, num_experts ({num_experts})]")
        if not 0.0 <= jitter_noise < 1.0:
            raise RouterError(f"jitter noise ({jitter_noise!r}) must be in [0, 1)")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter_noise = float(jitter_noise)
        self.gate = nn.Linear(hidden_size, num_experts, bias=router_bias)

    def compute_logits(self, x_TD: torch.Tensor, training: bool) -> torch.Tensor:
        """fp32 router logits [T, E]; multiplicative jitter on the input when training."""
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.hidden_size:
            raise RouterError(
                f"router expects hidden states [tokens, {self.hidden_size}], got {tuple(x_TD.shape)}"
            )
        x_TD = x_TD.float()
        if training and self.jitter_noise > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            bias = None if self.gate.bias is None else self.gate.bias.float()
            return F.linear(x_TD, self.gate.weight.float(), bias)

    def _prepare(
        self, hidden_states: torch.Tensor, token_mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        if token_mask is not None:
            token_mask = token_mask.reshape(-1).to(torch.bool)
            if token_mask.numel() != x_TD.shape[0]:
                raise RouterError(
                    f"token_mask has {token_mask.numel()} entries but there are {x_TD.shape[0]} tokens"
                )
        return x_TD, token_mask

    def _num_real(self, x_TD: torch.Tensor, token_mask_T: Optional[torch.Tensor]) -> torch.Tensor:
        if token_mask_T is None:
            return torch.tensor(x_TD.shape[0], device=x_TD.device, dtype=torch.float32)
        return token_mask_T.sum().to(torch.float32)

    def _info(
        self,
        logits_TE: torch.Tensor,
        probs_TE: torch.Tensor,
        selection_counts_E: torch.Tensor,
        expert_indices_TK: torch.Tensor,
        token_mask_T: Optional[torch.Tensor],
        num_real_local: torch.Tensor,
        dropped_fraction: torch.Tensor,
        selected_TK: Optional[torch.Tensor] = None,
        num_sequences: Optional[int] = None,
    ) -> RouterInfo:
        real_TE = probs_TE if token_mask_T is None else probs_TE * token_mask_T.unsqueeze(-1).to(probs_TE.dtype)
        z_T = torch.logsumexp(logits_TE, dim=-1).square()
        if token_mask_T is not None:
            z_T = z_T * token_mask_T.to(z_T.dtype)
        prob_sums_E, z_sum = real_TE.sum(dim=0), z_T.sum()
        counts_E = selection_counts_E.detach()
        lb, z = balancing_losses(prob_sums_E.unsqueeze(0), counts_E.unsqueeze(0), z_sum.view(1), num_real_local)
        extra: Dict[str, Any] = {}
        if num_sequences and selected_TK is not None:  # sequence-wise balancing statistics
            b = num_sequences
            extra["seq_prob_sums"] = real_TE.view(b, -1, self.num_experts).sum(dim=1)  # [B, E], in the graph
            sel_BSK = selected_TK.view(b, -1, selected_TK.shape[-1])
            extra["seq_selection_counts"] = torch.stack(
                [count_assignments(sel_BSK[i], self.num_experts) for i in range(b)]
            ).detach()  # [B, E]
            mask_BS = token_mask_T.view(b, -1) if token_mask_T is not None else None
            extra["seq_num_tokens"] = (
                mask_BS.sum(dim=1).float() if mask_BS is not None else torch.full((b,), float(z_T.numel() // b),
                                                                                   device=z_T.device)
            )
        return {**extra, 
            "router_logits": logits_TE,
            "router_probs": probs_TE,
            "load_balancing_loss": lb[0],
            "router_z_loss": z[0],
            "selection_counts": counts_E,
            "prob_sums": prob_sums_E,
            "z_sum": z_sum,
            "num_tokens": num_real_local.detach(),
            "expert_counts": count_assignments(expert_indices_TK, self.num_experts),
            "dropped_fraction": dropped_fraction,
        }


class TopKRouter(Router):
    """Token choice: each token takes its ``top_k`` best, distinct experts (Mixtral, GShard,
    DeepSeek-V3, Qwen3-MoE).

    Scores: ``score_function="softmax"`` (the default) or ``"sigmoid"`` (DeepSeek-V3: each
    expert's affinity on its own; the balancing loss then uses the affinities normalised to
    sum to 1 per token). Weights: with ``normalize_weights=True`` (the default) the k scores are
    renormalised to sum to 1, otherwise they are the raw scores; then multiplied by
    ``scaling_factor`` (1.0).

    Aux-loss-free balancing (DeepSeek-V3): with ``bias_update_rate`` set, a per-expert bias
    buffer ``expert_bias`` [E] is added to the scores for *selection only* (never to the
    weights). :func:`update_expert_bias` moves it after each optimizer step by
    ``rate * sign(mean load - load)`` from the global expert load.

    Group-limited routing: with ``num_groups`` and ``topk_groups``, the experts form
    ``num_groups`` equal groups; each token first keeps its ``topk_groups`` best groups (a
    group's score is the sum of its two best biased scores, or its best when a group holds one
    expert), then picks its ``top_k`` experts among them.

    Capacity: ``capacity_factor=None`` (the default) never drops. With a factor and
    ``drop_tokens=True`` each expert takes at most ``ceil(capacity_factor * tokens * k / E)``
    assignments in a training call; first choices have priority over second choices, then
    earlier tokens win. Dropped slots are empty (the residual stream carries the token), and
    ``dropped_fraction`` is dropped slots / (real tokens * k). Calls with ``training=False``
    use ``eval_capacity_factor`` instead (None, the default: no dropping).
    """

    router_type = RouterType.TOP_K

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        router_bias: bool = False,
        router_jitter_noise: float = 0.0,
        normalize_weights: bool = True,
        capacity_factor: Optional[float] = None,
        drop_tokens: bool = True,
        eval_capacity_factor: Optional[float] = None,
        score_function: str = "softmax",
        scaling_factor: float = 1.0,
        bias_update_rate: Optional[float] = None,
        num_groups: Optional[int] = None,
        topk_groups: Optional[int] = None,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, router_bias, router_jitter_noise)
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor),
                            ("bias_update_rate", bias_update_rate)):
            if value is not None and not value > 0:
                raise RouterError(f"{name} ({value!r}) must be > 0 or None")
        if score_function not in SCORE_FUNCTIONS:
            raise RouterError(f"score_function must be one of {list(SCORE_FUNCTIONS)}, got {score_function!r}")
        if not scaling_factor > 0:
            raise RouterError(f"scaling_factor ({scaling_factor!r}) must be > 0")
        check_groups(num_experts, top_k, num_groups, topk_groups, RouterError)
        self.normalize_weights = normalize_weights
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.drop_tokens = drop_tokens
        self.score_function = score_function
        self.scaling_factor = float(scaling_factor)
        self.bias_update_rate = bias_update_rate
        self.num_groups, self.topk_groups = num_groups, topk_groups
        #: per-sequence statistics for the sequence-wise balancing loss (set from the config)
        self.sequence_stats = False
        if bias_update_rate is not None:
            self.register_buffer("expert_bias", torch.zeros(num_experts))

    def select(self, logits_TE: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weights_TK, experts_TK, probs_TE)``: the token-choice selection, before capacity.

        ``probs_TE`` are what the balancing loss averages (softmax probabilities, or the
        normalised sigmoid affinities)."""
        if self.score_function == "sigmoid":
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        else:
            scores_TE = probs_TE = logits_TE.softmax(dim=-1)
        choice_TE = scores_TE.detach()
        if getattr(self, "expert_bias", None) is not None:
            choice_TE = choice_TE + self.expert_bias  # selection only
        if self.num_groups is not None:
            choice_TE = limit_to_top_groups(choice_TE, self.num_groups, self.topk_groups)
        experts_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(-1, experts_TK)
        if self.normalize_weights:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.scaling_factor != 1.0:
            weights_TK = weights_TK * self.scaling_factor
        return weights_TK, experts_TK, probs_TE

    def active_capacity_factor(self, training: bool) -> Optional[float]:
        """The capacity factor a call uses: None means no dropping."""
        if not self.drop_tokens:
            return None
        return self.capacity_factor if training else self.eval_capacity_factor

    def route(self, x_TD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inference routing without statistics, jitter or capacity: ``(weights_TK, experts_TK)``.

        Equal to ``forward(x, training=False)`` unless ``eval_capacity_factor`` is set; it
        has no host synchronisation, so decoding can capture it in a CUDA graph.
        """
        weights_TK, experts_TK, _ = self.select(self.compute_logits(x_TD, training=False))
        return weights_TK, experts_TK

    def forward(
        self,
        hidden_states: torch.Tensor,
        training: bool = True,
        token_mask: Optional[torch.Tensor] = None,
        num_sequences: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, RouterInfo]:
        x_TD, mask_T = self._prepare(hidden_states, token_mask)
        logits_TE = self.compute_logits(x_TD, training)
        weights_TK, top_i_TK, probs_TE = self.select(logits_TE)
        if mask_T is not None:
            top_i_TK = top_i_TK.masked_fill(~mask_T.unsqueeze(-1), -1)
        num_real = self._num_real(x_TD, mask_T)
        selection_counts_E = count_assignments(top_i_TK, self.num_experts)
        expert_indices_TK = top_i_TK
        dropped = torch.zeros((), device=x_TD.device)
        capacity_factor = self.active_capacity_factor(training)
        if capacity_factor is not None:
            capacity = torch.ceil(capacity_factor * num_real * self.top_k / self.num_experts)
            pos_KT = capacity_positions(top_i_TK.t(), self.num_experts)
            over_TK = (pos_KT.t() >= capacity) & (top_i_TK >= 0)
            expert_indices_TK = top_i_TK.masked_fill(over_TK, -1)
            dropped = over_TK.sum().float() / (num_real * self.top_k).clamp(min=1)
        weights_TK = weights_TK * (expert_indices_TK >= 0).to(weights_TK.dtype)
        info = self._info(logits_TE, probs_TE, selection_counts_E, expert_indices_TK, mask_T, num_real, dropped,
                          top_i_TK, num_sequences if self.sequence_stats else None)
        info["all_valid"] = mask_T is None and capacity_factor is None
        return weights_TK, expert_indices_TK, info


class SwitchRouter(TopKRouter):
    """Switch Transformer routing: top-1 with capacity.

    The combine weight is the raw softmax probability of the chosen expert (so the router
    gets a gradient). Multiplicative jitter ``U(1 - jitter_noise, 1 + jitter_noise)`` on the
    router input during training only. Capacity per expert: ``ceil(capacity_factor * tokens /
    E)``, real tokens only; with ``drop_tokens`` the later tokens over capacity skip the
    experts (the residual carries them) and count in ``dropped_fraction``. In eval mode
    nothing is dropped unless ``eval_capacity_factor`` is set.
    """

    router_type = RouterType.SWITCH

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        drop_tokens: bool = True,
        jitter_noise: float = 0.1,
        router_bias: bool = False,
        eval_capacity_factor: Optional[float] = None,
    ) -> None:
        if capacity_factor is None or not capacity_factor > 0:
            raise RouterError(f"capacity_factor ({capacity_factor!r}) must be > 0")
        super().__init__(
            hidden_size,
            num_experts,
            top_k=1,
            router_bias=router_bias,
            router_jitter_noise=jitter_noise,
            normalize_weights=False,
            capacity_factor=capacity_factor,
            drop_tokens=drop_tokens,
            eval_capacity_factor=eval_capacity_factor,
        )


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al., 2022): each expert picks its ``C`` best tokens.

    ``C = ceil(capacity_factor * tokens * k / E)``, clamped to [1, tokens], with ``tokens`` the
    real tokens in the call and ``k = top_k`` (the average number of experts per token at
    capacity_factor 1). A token may get 0, 1 or several experts; its weight for each is the
    softmax probability (over experts) of that expert. Output slots: ``K = E``, slot ``e`` holds
    ``e`` when expert ``e`` picked the token, else -1.

    Tokens no expert picks are dropped (``dropped_fraction`` = such tokens / real tokens); with
    ``drop_tokens=False`` each of them goes to its top-1 expert instead, over capacity.

    **Causality.** Expert choice ranks tokens against the whole batch, so in a causal LM a
    token's routing depends on later positions and on other sequences: training under it
    leaks information from the future. Use it for research on routing, not for models you
    will sample from with the same routing.

    **Evaluation and decoding.** With ``eval_routing="token_choice"`` (the default), calls with
    ``training=False`` route causally: each token goes to its ``top_k`` experts by the same
    router probabilities, weighted by those raw probabilities. A full forward and a
    one-token-at-a-time decode then give the same result. With ``eval_routing="expert_choice"``,
    evaluation uses expert choice too; a single-token call then has ``C = 1``, so every expert
    picks that one token.
    """

    router_type = RouterType.EXPERT_CHOICE

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        capacity_factor: float = 1.0,
        drop_tokens: bool = True,
        top_k: int = 1,
        router_bias: bool = False,
        jitter_noise: float = 0.0,
        eval_routing: str = "token_choice",
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, router_bias, jitter_noise)
        if capacity_factor is None or not capacity_factor > 0:
            raise RouterError(f"capacity_factor ({capacity_factor!r}) must be > 0")
        if eval_routing not in ("token_choice", "expert_choice"):
            raise RouterError(f"eval_routing must be 'token_choice' or 'expert_choice', got {eval_routing!r}")
        self.capacity_factor = float(capacity_factor)
        self.drop_tokens = drop_tokens
        self.eval_routing = eval_routing

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert picks for a call with ``num_tokens`` real tokens."""
        c = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(1, min(num_tokens, c))

    def forward(
        self,
        hidden_states: torch.Tensor,
        training: bool = True,
        token_mask: Optional[torch.Tensor] = None,
        num_sequences: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, RouterInfo]:
        x_TD, mask_T = self._prepare(hidden_states, token_mask)
        logits_TE = self.compute_logits(x_TD, training)
        probs_TE = logits_TE.softmax(dim=-1)
        num_tokens, num_experts = probs_TE.shape
        num_real = self._num_real(x_TD, mask_T)
        if not training and self.eval_routing == "token_choice":
            top_p_TK, top_i_TK = probs_TE.topk(self.top_k, dim=-1)
            if mask_T is not None:
                top_i_TK = top_i_TK.masked_fill(~mask_T.unsqueeze(-1), -1)
            weights_TK = top_p_TK * (top_i_TK >= 0).to(top_p_TK.dtype)
            counts_E = count_assignments(top_i_TK, num_experts)
            info = self._info(
                logits_TE, probs_TE, counts_E, top_i_TK, mask_T, num_real, torch.zeros((), device=x_TD.device)
            )
            info["all_valid"] = mask_T is None
            return weights_TK, top_i_TK, info

        n_real = int(num_real.item())
        chosen_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=x_TD.device)
        if n_real > 0:
            scores_ET = probs_TE.detach().t()
            if mask_T is not None:
                scores_ET = scores_ET.masked_fill(~mask_T.unsqueeze(0), -1.0)
            _, picked_EC = scores_ET.topk(self.capacity(n_real), dim=-1)  # [E, C]
            chosen_TE[picked_EC, torch.arange(num_experts, device=x_TD.device).unsqueeze(-1)] = True
        unrouted_T = ~chosen_TE.any(dim=-1)
        if mask_T is not None:
            unrouted_T &= mask_T
        if self.drop_tokens:
            dropped = unrouted_T.sum().float() / num_real.clamp(min=1)
        else:
            top1_T = probs_TE.argmax(dim=-1)
            chosen_TE[unrouted_T, top1_T[unrouted_T]] = True
            dropped = torch.zeros((), device=x_TD.device)
        experts_TE = torch.arange(num_experts, device=x_TD.device).expand(num_tokens, -1)
        expert_indices_TE = torch.where(chosen_TE, experts_TE, -1)
        weights_TE = probs_TE * chosen_TE.to(probs_TE.dtype)
        counts_E = chosen_TE.sum(dim=0)
        info = self._info(logits_TE, probs_TE, counts_E, expert_indices_TE, mask_T, num_real, dropped)
        info["all_valid"] = False
        return weights_TE, expert_indices_TE, info


def build_router(config: Any) -> Router:
    """Build the router that a :class:`~moe_lab.config.MoEConfig` asks for."""
    rt = RouterType(config.router_type)
    jitter = config.router_jitter_noise
    if rt == RouterType.TOP_K:
        router = TopKRouter(
            config.hidden_size,
            config.num_experts,
            top_k=config.experts_per_token,
            router_bias=config.router_bias,
            router_jitter_noise=0.0 if jitter is None else jitter,
            normalize_weights=config.normalize_router_weights,
            capacity_factor=config.capacity_factor,
            drop_tokens=config.drop_tokens,
            eval_capacity_factor=config.eval_capacity_factor,
            score_function=config.router_score_function,
            scaling_factor=config.router_scaling_factor,
            bias_update_rate=config.router_bias_update_rate,
            num_groups=config.router_num_groups,
            topk_groups=config.router_topk_groups,
        )
        router.sequence_stats = config.load_balancing_scope == "sequence"
        return router
    if rt == RouterType.SWITCH:
        router = SwitchRouter(
            config.hidden_size,
            config.num_experts,
            capacity_factor=1.25 if config.capacity_factor is None else config.capacity_factor,
            drop_tokens=config.drop_tokens,
            jitter_noise=0.1 if jitter is None else jitter,
            router_bias=config.router_bias,
            eval_capacity_factor=config.eval_capacity_factor,
        )
        router.sequence_stats = config.load_balancing_scope == "sequence"
        return router
    return ExpertChoiceRouter(
        config.hidden_size,
        config.num_experts,
        capacity_factor=1.0 if config.capacity_factor is None else config.capacity_factor,
        drop_tokens=config.drop_tokens,
        top_k=config.experts_per_token,
        router_bias=config.router_bias,
        jitter_noise=0.0 if jitter is None else jitter,
        eval_routing=config.expert_choice_eval_routing,
    )
