"""RouterAnalyzer: what the routers of a trained MoE model do with some inputs.

    from moe_lab.analytics import RouterAnalyzer
    analyzer = RouterAnalyzer(model)                       # tokenizer: ByteTokenizer by default
    analysis = analyzer.analyze_routing(ids_BS, return_heatmap=True)
    analysis.layers[0].expert_counts, analysis.layers[0].load_imbalance
    analysis.heatmap                                       # [num_moe_layers, num_experts] shares
    analysis.plot("routing.png"); analysis.to_dict()

    spec = analyzer.compute_expert_specialization(eval_ds, num_samples=10000)  # label "domain"
    spec[3]            # {"code": 0.61, "json": 0.22, ...}: where expert 3's tokens came from
    analyzer.compute_layer_specialization(eval_ds)        # {layer: {expert: {label: share}}}
    analyzer.top_tokens_per_expert(eval_ds, k=10)         # {layer: {expert: [(token, count)]}}

Everything is read from the model's own ``forward(..., return_routing_info=True)``: expert
counts are exactly ``routing_info["expert_counts"]`` summed over batches. The model runs in
eval mode under ``torch.no_grad`` (as at inference: no dropout, no router jitter; the
expert-choice router uses its evaluation routing); its train/eval mode is restored after.

Definitions (per MoE layer, real tokens only, padding excluded):
- ``expert_counts[e]``: routed assignments of expert ``e`` (a token routed to k experts counts
  once for each); ``expert_fractions`` = counts / their sum.
- ``load_imbalance``: max(counts) / mean(counts) (1 = perfectly balanced);
  ``load_cv``: std(counts) / mean(counts) (population std).
- ``router_entropy``: mean over tokens of ``-sum_e p_e log p_e`` (nats; at most log E);
  ``mean_top1_prob``: mean over tokens of ``max_e p_e``.
- ``dropped_fraction``: token-weighted mean of the router's dropped fraction.
- ``dead_experts``: no assignments; ``overloaded_experts``: share above
  ``overload_factor / E`` (default 2x the uniform share).

Specialisation: each routed assignment (token, expert) carries the label of the token's row
(e.g. its ``domain``). For expert ``e``, the share of label ``d`` is assignments of ``e`` from
``d`` / all assignments of ``e``, so each expert's dict sums to 1. The per-layer variant
does this per MoE layer; the plain :meth:`RouterAnalyzer.compute_expert_specialization`
pools expert id ``e`` over all MoE layers (sums the assignment counts of the ``e``-th expert
of every layer). Experts that received no tokens map to an empty dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError
from ._inputs import TokenBatch, iter_batches, tensor_batch, token_rows
from .plots import OVERLOAD_FACTOR

#: default sequence length for text inputs (capped at the model's max_position_embeddings)
DEFAULT_MAX_LENGTH = 128


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------


@dataclass
class LayerRoutingStats:
    """Routing statistics of one MoE layer (see the module docstring for definitions)."""

    layer: int  #: transformer layer index
    expert_counts: List[int]  #: [E] routed assignments per expert
    expert_fractions: List[float]  #: [E] counts / sum(counts)
    load_imbalance: float  #: max / mean of counts
    load_cv: float  #: std / mean of counts
    router_entropy: float  #: mean routing entropy, nats
    mean_top1_prob: float  #: mean of the largest router probability
    dropped_fraction: float  #: token-weighted mean
    num_tokens: int  #: real tokens routed
    dead_experts: List[int] = field(default_factory=list)
    overloaded_experts: List[int] = field(default_factory=list)


@dataclass
class RoutingAnalysis:
    """What :meth:`RouterAnalyzer.analyze_routing` returns.

    ``heatmap`` (only with ``return_heatmap=True``) is a float tensor
    [num_moe_layers, num_experts]: each layer's expert fractions (rows sum to 1).
    """

    layers: List[LayerRoutingStats]
    num_experts: int
    experts_per_token: int
    num_tokens: int  #: real tokens analysed
    num_sequences: int
    heatmap: Optional[torch.Tensor] = None  # [L, E]

    @property
    def moe_layer_indices(self) -> List[int]:
        return [lay.layer for lay in self.layers]

    @property
    def expert_counts(self) -> torch.Tensor:
        """[L, E] int64 counts."""
        return torch.tensor([lay.expert_counts for lay in self.layers], dtype=torch.long)

    def heatmap_matrix(self) -> torch.Tensor:
        """[L, E] expert fractions (the heatmap, computed whether or not it was requested)."""
        return torch.tensor([lay.expert_fractions for lay in self.layers], dtype=torch.float64)

    @property
    def max_router_entropy(self) -> float:
        """log(E): the entropy of uniform routing probabilities."""
        return math.log(self.num_experts)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (the heatmap, when present, as nested lists)."""
        return {
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "max_router_entropy": self.max_router_entropy,
            "layers": [asdict(lay) for lay in self.layers],
            "heatmap": self.heatmap.tolist() if self.heatmap is not None else None,
        }

    def plot(self, path: Any) -> str:
        """Write a PNG with the routing heatmap (expert shares per layer); returns the path."""
        from .plots import plot_routing_heatmap

        return plot_routing_heatmap(
            self.heatmap_matrix(), save_path=path, layer_labels=self.moe_layer_indices,
            title=f"Routing heatmap ({self.num_tokens:,} tokens): share of each layer's tokens per expert",
        )


def _shares(row: torch.Tensor, labels: Sequence[Any]) -> Dict[Any, float]:
    total = float(row.sum())
    if total <= 0:
        return {}
    return {label: float(v) / total for label, v in zip(labels, row.tolist())}


@dataclass
class SpecializationAnalysis:
    """Routed assignments per (MoE layer, expert, label), plus per-token counts.

    ``label_counts`` [L, E, num_labels] int64; ``token_counts`` [L, E, V] int64 (routed
    assignments of each vocabulary id to each expert).
    """

    labels: List[Any]
    moe_layer_indices: List[int]
    label_counts: torch.Tensor  # [L, E, NL]
    token_counts: torch.Tensor  # [L, E, V]
    num_tokens: int
    num_sequences: int
    decode: Any = None  # token id -> str, for top tokens

    @property
    def num_experts(self) -> int:
        return self.label_counts.shape[1]

    def by_expert(self) -> Dict[int, Dict[Any, float]]:
        """``{expert_id: {label: share}}`` with expert ``e`` pooled over all MoE layers."""
        pooled = self.label_counts.sum(dim=0)  # [E, NL]
        return {e: _shares(pooled[e], self.labels) for e in range(self.num_experts)}

    def by_layer(self) -> Dict[int, Dict[int, Dict[Any, float]]]:
        """``{layer: {expert_id: {label: share}}}`` (layer = transformer layer index)."""
        return {
            layer: {e: _shares(self.label_counts[i, e], self.labels) for e in range(self.num_experts)}
            for i, layer in enumerate(self.moe_layer_indices)
        }

    def label_shares(self) -> Dict[Any, float]:
        """Each label's share of all routed assignments (the base rate an expert is compared to)."""
        return _shares(self.label_counts.sum(dim=(0, 1)), self.labels)

    def label_routing(self) -> Dict[int, Dict[Any, Dict[int, float]]]:
        """The transposed view: ``{layer: {label: {expert_id: share of the label's assignments}}}``."""
        out: Dict[int, Dict[Any, Dict[int, float]]] = {}
        for i, layer in enumerate(self.moe_layer_indices):
            out[layer] = {}
            for j, label in enumerate(self.labels):
                col = self.label_counts[i, :, j]
                out[layer][label] = _shares(col, list(range(self.num_experts)))
        return out

    def top_tokens(self, k: int = 10) -> Dict[int, Dict[int, List[Tuple[str, int]]]]:
        """``{layer: {expert_id: [(token, count), ...]}}``: each expert's ``k`` most routed tokens."""
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        out: Dict[int, Dict[int, List[Tuple[str, int]]]] = {}
        for i, layer in enumerate(self.moe_layer_indices):
            out[layer] = {}
            for e in range(self.num_experts):
                row = self.token_counts[i, e]
                n = min(k, int((row > 0).sum()))
                vals, ids = row.topk(n) if n else (row[:0], row[:0])
                out[layer][e] = [(self._token_str(int(t)), int(c)) for c, t in zip(vals.tolist(), ids.tolist())]
        return out

    def _token_str(self, token_id: int) -> str:
        if self.decode is None:
            return str(token_id)
        try:
            text = self.decode(token_id)
        except Exception:  # a tokenizer that cannot decode a lone id
            return str(token_id)
        return text if text else f"<{token_id}>"

    def to_dict(self, top_k_tokens: int = 10) -> Dict[str, Any]:
        """JSON-ready dict (labels become strings in the keys)."""
        return {
            "labels": [str(l) for l in self.labels],
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "label_shares": {str(k): v for k, v in self.label_shares().items()},
            "by_expert": {str(e): {str(k): v for k, v in d.items()} for e, d in self.by_expert().items()},
            "by_layer": {
                str(l): {str(e): {str(k): v for k, v in d.items()} for e, d in per.items()}
                for l, per in self.by_layer().items()
            },
            "label_counts": self.label_counts.tolist(),
            "top_tokens": {
                str(l): {str(e): [[t, c] for t, c in toks] for e, toks in per.items()}
                for l, per in self.top_tokens(top_k_tokens).items()
            },
        }


# ---------------------------------------------------------------------------------------
# accumulation
# ---------------------------------------------------------------------------------------


class _Accumulator:
    """Sums routing statistics over batches on the model's device (one host copy at the end)."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device,
                 num_labels: int = 0, vocab_size: int = 0) -> None:
        self.E, self.NL, self.V = num_experts, num_labels, vocab_size
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)  # [L, E]
        self.entropy = torch.zeros(num_layers, dtype=torch.float64, device=device)  # [L] sums
        self.top1 = torch.zeros(num_layers, dtype=torch.float64, device=device)  # [L] sums
        self.dropped = torch.zeros(num_layers, dtype=torch.float64, device=device)  # [L] token-weighted
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.label_counts = torch.zeros(num_layers, num_experts * max(num_labels, 1), dtype=torch.long, device=device)
        self.token_counts = torch.zeros(num_layers, num_experts * max(vocab_size, 1), dtype=torch.long, device=device)
        self.num_sequences = 0

    def add(self, info: Dict[str, Any], ids_BS: torch.Tensor, label_ids_B: Optional[torch.Tensor]) -> None:
        mask_T = info["token_mask"].reshape(-1)  # [T]
        w_T = mask_T.to(torch.float64)
        n_real = w_T.sum()
        self.tokens += n_real
        self.num_sequences += ids_BS.shape[0]
        self.counts += info["expert_counts"].to(self.counts.device)
        self.dropped += info["dropped_fraction"].to(torch.float64) * n_real
        tok_T = ids_BS.reshape(-1)
        lab_T = None
        if label_ids_B is not None:
            lab_T = label_ids_B.unsqueeze(1).expand(ids_BS.shape).reshape(-1)  # [T]
        for l, (probs_TE, idx_TK) in enumerate(zip(info["router_probs"], info["expert_indices"])):
            p = probs_TE.to(torch.float64)
            ent_T = -(p * p.clamp(min=1e-30).log()).sum(-1)  # [T]
            self.entropy[l] += (ent_T * w_T).sum()
            self.top1[l] += (p.max(dim=-1).values * w_T).sum()
            valid_TK = idx_TK >= 0  # padding and dropped slots are -1
            e_N = idx_TK[valid_TK]
            if lab_T is not None and self.NL:
                key = e_N * self.NL + lab_T.unsqueeze(1).expand_as(idx_TK)[valid_TK]
                self.label_counts[l] += torch.bincount(key, minlength=self.E * self.NL)
            if self.V:
                key = e_N * self.V + tok_T.unsqueeze(1).expand_as(idx_TK)[valid_TK]
                self.token_counts[l] += torch.bincount(key, minlength=self.E * self.V)

    def routing(self, moe_layer_indices: List[int], experts_per_token: int, overload_factor: float,
                return_heatmap: bool) -> RoutingAnalysis:
        counts = self.counts.cpu()
        n = float(self.tokens.cpu())
        ent, top1, dropped = (t.cpu() / max(n, 1.0) for t in (self.entropy, self.top1, self.dropped))
        layers = []
        for i, layer in enumerate(moe_layer_indices):
            c = counts[i].double()
            total = float(c.sum())
            mean = max(total / self.E, 1e-12)
            fr = (c / total).tolist() if total > 0 else [0.0] * self.E
            layers.append(LayerRoutingStats(
                layer=int(layer),
                expert_counts=[int(x) for x in counts[i].tolist()],
                expert_fractions=fr,
                load_imbalance=float(c.max()) / mean if total > 0 else 0.0,
                load_cv=float(c.std(unbiased=False)) / mean if total > 0 else 0.0,
                router_entropy=float(ent[i]),
                mean_top1_prob=float(top1[i]),
                dropped_fraction=float(dropped[i]),
                num_tokens=int(n),
                dead_experts=[e for e in range(self.E) if counts[i, e] == 0] if total > 0 else [],
                overloaded_experts=[e for e in range(self.E) if fr[e] > overload_factor / self.E],
            ))
        heat = torch.tensor([lay.expert_fractions for lay in layers], dtype=torch.float32) if return_heatmap else None
        return RoutingAnalysis(layers, self.E, experts_per_token, int(n), self.num_sequences, heat)

    def specialization(self, labels: List[Any], moe_layer_indices: List[int], decode: Any) -> SpecializationAnalysis:
        L = self.counts.shape[0]
        return SpecializationAnalysis(
            labels=list(labels),
            moe_layer_indices=list(moe_layer_indices),
            label_counts=self.label_counts.cpu().reshape(L, self.E, max(self.NL, 1))[:, :, : self.NL],
            token_counts=self.token_counts.cpu().reshape(L, self.E, max(self.V, 1))[:, :, : self.V],
            num_tokens=int(float(self.tokens.cpu())),
            num_sequences=self.num_sequences,
            decode=decode,
        )


# ---------------------------------------------------------------------------------------
# the analyzer
# ---------------------------------------------------------------------------------------


class RouterAnalyzer:
    """Analyse the routing of an :class:`~moe_lab.MoEModel` (or any model with the same
    ``forward(input_ids, attention_mask, return_routing_info=True)`` contract).

    Args:
        model: the model (not modified; its train/eval mode is restored after each call).
        tokenizer: for text inputs and for printing top tokens (default
            :class:`~moe_lab.data.ByteTokenizer`).
        batch_size: sequences per forward for list/dataset inputs.
        max_length: tokens per sequence for text and long rows (default 128, capped at the
            model's ``max_position_embeddings``).
        overload_factor: an expert whose share exceeds ``overload_factor / E`` is overloaded.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        batch_size: int = 16,
        max_length: Optional[int] = None,
        overload_factor: float = OVERLOAD_FACTOR,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"model must be a torch.nn.Module (an MoEModel), got {type(model).__name__}")
        config = getattr(model, "config", None)
        if config is None or not getattr(model, "moe_layer_indices", None):
            raise InputError(f"{type(model).__name__} has no MoE layers to analyse")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        max_pos = int(config.max_position_embeddings)
        if max_length is None:
            max_length = min(DEFAULT_MAX_LENGTH, max_pos)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= max_pos:
            raise InputError(f"max_length must be an int in [1, max_position_embeddings={max_pos}], got {max_length!r}")
        if not overload_factor > 1.0:
            raise InputError(f"overload_factor must be > 1, got {overload_factor!r}")
        self.model = model
        self.config = config
        self._tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.overload_factor = float(overload_factor)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from ..data import ByteTokenizer

            self._tokenizer = ByteTokenizer()
        return self._tokenizer

    @property
    def num_experts(self) -> int:
        return int(self.config.num_experts)

    @property
    def moe_layer_indices(self) -> List[int]:
        return list(self.model.moe_layer_indices)

    # ---- running the model ------------------------------------------------------------
    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover - a model without parameters
            return torch.device("cpu")

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None and 0 <= int(pad) < self.config.vocab_size else 0

    def _run(
        self,
        inputs: Any,
        attention_mask: Optional[torch.Tensor] = None,
        label_column: Optional[str] = None,
        labels: Optional[Sequence[Any]] = None,
        text_column: str = "text",
        num_samples: Optional[int] = None,
        track_tokens: bool = False,
    ) -> Tuple[_Accumulator, List[Any]]:
        """One pass over the inputs; returns the accumulator and the label vocabulary."""
        single = tensor_batch(inputs, attention_mask)
        label_vocab: List[Any] = []
        if single is not None:
            if label_column is not None:
                raise InputError(
                    f"specialisation needs labels: pass a dataset with a {label_column!r} column, not a bare tensor"
                )
            batches = [single]
        else:
            rows = token_rows(inputs, self.tokenizer, self.max_length, label_column=label_column,
                              text_column=text_column, labels=labels, num_samples=num_samples)
            if rows.labels is not None:
                seen: Dict[Any, None] = {}
                for lab in rows.labels:
                    seen.setdefault(lab, None)
                label_vocab = sorted(seen, key=str)
            batches = iter_batches(rows, self.batch_size, self._pad_id())
        device = self._device()
        acc = _Accumulator(len(self.moe_layer_indices), self.num_experts, device,
                           num_labels=len(label_vocab), vocab_size=int(self.config.vocab_size) if track_tokens else 0)
        label_index = {lab: i for i, lab in enumerate(label_vocab)}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    self._forward(batch, acc, label_index, device)
        finally:
            self.model.train(was_training)
        if float(acc.tokens) == 0:
            raise InputError("the inputs have no real tokens (the attention mask is all zeros)")
        return acc, label_vocab

    def _forward(self, batch: TokenBatch, acc: _Accumulator, label_index: Dict[Any, int], device: torch.device) -> None:
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
        _, info = self.model(ids, attention_mask=mask, return_routing_info=True)
        label_ids = None
        if batch.labels is not None and label_index:
            label_ids = torch.tensor([label_index[l] for l in batch.labels], dtype=torch.long, device=device)
        acc.add(info, ids.long(), label_ids)

    # ---- public API -------------------------------------------------------------------
    def analyze_routing(
        self,
        inputs: Any,
        return_heatmap: bool = False,
        attention_mask: Optional[torch.Tensor] = None,
        num_samples: Optional[int] = None,
        text_column: str = "text",
    ) -> RoutingAnalysis:
        """Per-layer routing statistics over ``inputs``.

        Args:
            inputs: a [B, S] token tensor (one forward, ``attention_mask`` [B, S] optional), a
                dict batch with ``input_ids`` (+ ``attention_mask``), a str or list of str
                (tokenized with the analyzer's tokenizer, cut into ``max_length`` chunks), a
                list of row dicts, or a ``datasets.Dataset`` with ``input_ids`` or ``text``.
            return_heatmap: also fill ``heatmap`` [num_moe_layers, num_experts].
            num_samples: for lists/datasets, analyse at most this many sequences (evenly spaced).

        Returns:
            A :class:`RoutingAnalysis`.
        """
        acc, _ = self._run(inputs, attention_mask=attention_mask, num_samples=num_samples, text_column=text_column)
        return acc.routing(self.moe_layer_indices, int(self.config.experts_per_token), self.overload_factor,
                           return_heatmap)

    def analyze(
        self,
        dataset: Any,
        num_samples: Optional[int] = 10000,
        label_column: str = "domain",
        text_column: str = "text",
        labels: Optional[Sequence[Any]] = None,
    ) -> Tuple[RoutingAnalysis, SpecializationAnalysis]:
        """Routing statistics (with heatmap) and specialisation in one pass over ``dataset``."""
        acc, vocab = self._run(dataset, label_column=label_column if labels is None else None, labels=labels,
                               text_column=text_column, num_samples=num_samples, track_tokens=True)
        routing = acc.routing(self.moe_layer_indices, int(self.config.experts_per_token), self.overload_factor, True)
        return routing, acc.specialization(vocab, self.moe_layer_indices, self._decode_one)

    def analyze_specialization(
        self,
        dataset: Any,
        num_samples: Optional[int] = 10000,
        label_column: str = "domain",
        text_column: str = "text",
        labels: Optional[Sequence[Any]] = None,
    ) -> SpecializationAnalysis:
        """Assignments per (layer, expert, label) and per token: the source of all specialisation views.

        Args:
            dataset: a ``datasets.Dataset`` (or dict of columns, or list of row dicts) with
                ``input_ids`` or a text column, and the label column; or a list of texts
                with ``labels`` (one per text).
            num_samples: at most this many sequences of up to ``max_length`` tokens, evenly spaced.
            label_column: the column holding each row's label.
            text_column: the text column, used when there is no ``input_ids``.
            labels: labels of a list of texts.

        Raises:
            InputError: the dataset is empty, or has no label column (the message lists the
                columns it has).
        """
        return self.analyze(dataset, num_samples, label_column, text_column, labels)[1]

    def compute_expert_specialization(
        self,
        dataset: Any,
        num_samples: Optional[int] = 10000,
        label_column: str = "domain",
        **kwargs: Any,
    ) -> Dict[int, Dict[Any, float]]:
        """``{expert_id: {label: share}}``: for each expert, the share of its routed tokens
        that came from each label (each dict sums to 1; an expert with no tokens maps to
        ``{}``). Expert id ``e`` is pooled over all MoE layers; see
        :meth:`compute_layer_specialization` for one matrix per layer. Arguments as
        :meth:`analyze_specialization`.
        """
        return self.analyze_specialization(dataset, num_samples, label_column, **kwargs).by_expert()

    def compute_layer_specialization(
        self,
        dataset: Any,
        num_samples: Optional[int] = 10000,
        label_column: str = "domain",
        **kwargs: Any,
    ) -> Dict[int, Dict[int, Dict[Any, float]]]:
        """``{layer: {expert_id: {label: share}}}`` (layer = transformer layer index)."""
        return self.analyze_specialization(dataset, num_samples, label_column, **kwargs).by_layer()

    def top_tokens_per_expert(
        self,
        dataset: Any,
        k: int = 10,
        num_samples: Optional[int] = 10000,
        text_column: str = "text",
    ) -> Dict[int, Dict[int, List[Tuple[str, int]]]]:
        """``{layer: {expert_id: [(token, count), ...]}}``: the ``k`` tokens routed most often to
        each expert (no labels needed; tokens decoded with the analyzer's tokenizer)."""
        acc, vocab = self._run(dataset, text_column=text_column, num_samples=num_samples, track_tokens=True)
        return acc.specialization(vocab, self.moe_layer_indices, self._decode_one).top_tokens(k)

    def _decode_one(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")
