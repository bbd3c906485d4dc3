"""Fast decoding: a static KV cache and the one-token step captured as a CUDA graph.

    dec = StaticDecoder(model, batch_size=8, max_length=384)      # model: MoEModel, bf16, on CUDA
    out = dec.generate(input_ids, attention_mask, max_new_tokens=256, temperature=0)

Python-side decoding costs a few microseconds per kernel launch and hundreds of launches per
token; at batch 1 that, not the GPU, bounds speed. Here the whole one-token step (embedding,
every layer's attention and MoE, the head) runs with static shapes and no host
synchronisation, so it is captured once as a CUDA graph and replayed per token:

- the KV cache is preallocated ``[B, Hkv, max_length, Dh]`` per layer; a device tensor holds
  the write slot, and attention reads all ``max_length`` slots under a key mask (padding
  and not-yet-written slots masked out), so no shape ever changes;
- positions are per row (real tokens only, as in :class:`~moe_lab.MoEModel`), so left
  padded batches decode exactly as each prompt alone;
- the MoE layer uses the router's lean ``route`` (no statistics) and the same dispatch and
  grouped expert path as training (top-k routers without capacity; others use
  :func:`~moe_lab.inference.generate`).

The same step runs without a graph on CPU (``use_cuda_graph=False``), which is how the tests
check it against the reference generation. Greedy tokens equal step-by-step argmax of the
full forward (tests/inference/test_static_decode.py).
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch
from torch import nn

from ..errors import InputError
from ..ops.grouped_mm import grouped_mm_supported
from ..types import RouterType
from .generate import decode_loop, pad_batch, validate_sampling


def resident_experts(experts: nn.Module) -> Optional[nn.Module]:
    """The stacked expert module holding every expert of a layer on the device, or None.

    A :class:`~moe_lab.model.GroupedExperts` is its own answer; an expert cache with a slot
    for every expert (:class:`~moe_lab.inference.expert_cache.CachedExperts`) is arranged so
    that slot ``e`` holds expert ``e`` and its slots are returned.
    """
    if hasattr(experts, "w_in") and hasattr(experts, "forward_grouped"):
        return experts if experts.w_in.device.type != "meta" else None
    arrange = getattr(experts, "arrange_identity", None)
    if arrange is not None and arrange():
        return experts.slots
    return None


def _all_resident(experts: nn.Module) -> bool:
    if hasattr(experts, "forward_grouped") and hasattr(experts, "w_in"):
        return experts.w_in.device.type != "meta"
    return hasattr(experts, "arrange_identity") and getattr(experts, "cache_size", 0) >= experts.num_experts


def supports_static_decode(model: nn.Module) -> bool:
    """Top-k routing that never drops in eval mode, and every expert resident on the device."""
    cfg = model.config
    if cfg.router_type != RouterType.TOP_K or cfg.eval_capacity_factor is not None:
        return False
    return all(_all_resident(moe.experts) for moe in model.moe_layers)


class _StaticCache:
    """``update`` writes the new keys/values at the slot held in a device tensor."""

    def __init__(self, model: nn.Module, batch: int, max_length: int, dtype: torch.dtype, device: torch.device):
        cfg = model.config
        shape = (batch, cfg.kv_heads, max_length, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where the next token goes

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)


class StaticDecoder:
    """Batched decoding with a static cache; the step is a CUDA graph on CUDA devices."""

    def __init__(self, model: nn.Module, batch_size: int, max_length: int, use_cuda_graph: Optional[bool] = None) -> None:
        if not supports_static_decode(model):
            raise InputError("static decoding needs a top-k router without capacity and resident experts")
        p = next(model.parameters())
        self.model, self.device, self.dtype = model.eval(), p.device, p.dtype
        self.batch_size, self.max_length = batch_size, max_length
        if use_cuda_graph is None:  # graph capture needs the grouped-GEMM path (no host sync): bf16 on sm90+
            use_cuda_graph = self.device.type == "cuda" and grouped_mm_supported(
                self.device, self.dtype, model.config.hidden_size, model.config.intermediate_size
            )
        self.use_cuda_graph = use_cuda_graph
        self.cache = _StaticCache(model, batch_size, max_length, self.dtype, self.device)
        self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=self.device)  # [B, L]
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # next RoPE position per row
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # step input
        self.logits: Optional[torch.Tensor] = None  # step output [B, V]
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.experts = {}  # MoE layer index -> stacked experts with every expert resident
        for layer in model.layers:
            if layer.is_moe:
                grouped = resident_experts(layer.mlp.experts)
                if grouped is None:
                    raise InputError(f"layer {layer.layer_idx}: not every expert is resident on the device")
                self.experts[layer.layer_idx] = grouped

    # ---- the one-token step ---------------------------------------------------------------
    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        m = self.model
        b = self.batch_size
        x = m.embed_tokens(self.tokens).unsqueeze(1)  # [B, 1, D]
        cos, sin = m.rotary(self.positions.unsqueeze(1))  # [B, 1, Dh]
        self.key_valid.index_fill_(1, self.cache.slot, True)
        attn_mask = self.key_valid[:, None, None, :]  # [B, 1, 1, L]
        from ..model.transformer import apply_rotary

        for i, layer in enumerate(m.layers):
            a = layer.attn
            h = layer.input_norm(x)
            q = a.q_proj(h).view(b, 1, a.num_heads, a.head_dim).transpose(1, 2)  # [B, H, 1, Dh]
            k = a.k_proj(h).view(b, 1, a.num_kv_heads, a.head_dim).transpose(1, 2)  # [B, Hkv, 1, Dh]
            v = a.v_proj(h).view(b, 1, a.num_kv_heads, a.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            self.cache.write(i, k, v)
            y = torch.nn.functional.scaled_dot_product_attention(
                q, self.cache.keys[i], self.cache.values[i], attn_mask=attn_mask,
                enable_gqa=a.num_kv_heads != a.num_heads,
            )  # [B, H, 1, Dh]
            x = x + a.o_proj(y.transpose(1, 2).reshape(b, 1, a.num_heads * a.head_dim))
            h = layer.post_attn_norm(x)
            if layer.is_moe:
                moe = layer.mlp
                h_TD = h.reshape(b, -1)
                weights_TK, experts_TK = moe.router.route(h_TD)
                x_ND, tokens_per_expert, meta = moe.dispatcher.dispatch(h_TD, experts_TK, weights_TK, all_valid=True)
                out = moe.dispatcher.combine(self.experts[i].forward_grouped(x_ND, tokens_per_expert), meta)
                x = x + out.view(b, 1, -1)
            else:
                x = x + layer.mlp(h)
        self.positions.add_(1)
        self.cache.slot.add_(1)
        return m.lm_head(m.norm(x))[:, 0]  # [B, V]

    def _capture(self) -> None:
        """Warm up on a side stream, then capture the step (state is restored afterwards)."""
        saved = (self.positions.clone(), self.cache.slot.clone(), self.key_valid.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
                self.positions.copy_(saved[0]), self.cache.slot.copy_(saved[1]), self.key_valid.copy_(saved[2])
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        self.positions.copy_(saved[0]), self.cache.slot.copy_(saved[1]), self.key_valid.copy_(saved[2])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; returns the next-token logits [B, V] (a reused buffer)."""
        self.tokens.copy_(tokens)
        if not self.use_cuda_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    # ---- prefill and the decode loop -----------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts ``[B, S]`` (left padded) through the model, filling the cache; last logits."""
        b, s = input_ids.shape
        if b != self.batch_size:
            raise InputError(f"this decoder was built for batch {self.batch_size}, got {b}")
        if s >= self.max_length:
            raise InputError(f"prompt length {s} leaves no room in max_length {self.max_length}")
        cache = self.cache
        outer = self

        class _Fill:  # the model's KV-cache protocol, writing into the static buffers
            length = 0

            def update(self, layer_idx, k, v):
                cache.keys[layer_idx][:, :, :s] = k
                cache.values[layer_idx][:, :, :s] = v
                return k, v

            def advance(self, n):
                pass

        mask = attention_mask.to(self.device).long()
        logits = self.model(input_ids.to(self.device), attention_mask=mask, kv_cache=_Fill())[:, -1]
        outer.key_valid.zero_()
        outer.key_valid[:, :s] = mask.bool()
        outer.positions.copy_(mask.sum(dim=1))
        cache.slot.fill_(s)
        return logits

    def generate_iter(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: Optional[int] = None,
        do_sample: bool = True,
        eos_token_id: Optional[int] = None,
        seed: Optional[int] = None,
        pad_token_id: int = 0,
    ) -> Iterator[torch.Tensor]:
        """Yield ``[B]`` tokens per step (finished rows yield ``pad_token_id``)."""
        validate_sampling(temperature, top_p, top_k, max_new_tokens)
        if input_ids.shape[1] + max_new_tokens > self.max_length:
            raise InputError(
                f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_length {self.max_length}"
            )
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        logits = self.prefill(input_ids, mask)
        yield from decode_loop(logits, self.step, max_new_tokens, temperature, top_p, top_k, do_sample,
                               eos_token_id, gen, pad_token_id)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """``[B, S + new]``: the prompts followed by the generated tokens."""
        steps: List[torch.Tensor] = list(self.generate_iter(input_ids, attention_mask, **kwargs))
        return torch.cat([input_ids.to(self.device), torch.stack(steps, dim=1)], dim=1)


def static_generate(model: nn.Module, prompts: List[List[int]], max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Convenience: left-pad ``prompts`` and decode them with a fresh :class:`StaticDecoder`."""
    ids, mask = pad_batch(prompts, kwargs.pop("pad_token_id", 0))
    dec = StaticDecoder(model, ids.shape[0], ids.shape[1] + max_new_tokens)
    return dec.generate(ids, mask, max_new_tokens=max_new_tokens, **kwargs)
