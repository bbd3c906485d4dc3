"""Autoregressive generation: ``generate()`` (through the inference engine) and the KV cache.

    out = generate(model, input_ids, attention_mask, max_new_tokens=32, temperature=0)  # greedy
    for tokens in generate(model, ids, max_new_tokens=32, streaming=True): ...           # [B] per step

Batched prompts of different lengths are left-padded (``pad_batch``); positions count real
tokens only, so a padded prompt generates exactly what it generates alone.
``temperature=0`` (or ``do_sample=False``) is greedy; otherwise temperature, top-k and
top-p (nucleus) sampling with an optional seed.

Shape letters: B batch, S prompt length, Hkv key/value heads, Dh head dim, V vocab.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import InputError
from .engine import SamplingParams, engine_for, validate_sampling


class KVCache:
    """Preallocated keys/values for every layer: ``[B, Hkv, max_len, Dh]`` each.

    Attention calls ``update(layer_idx, k, v)`` with the new keys/values and gets back the
    keys/values of all positions so far; the model calls ``advance(n)`` once per forward.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_length: int, dtype: Optional[torch.dtype] = None) -> "KVCache":
        cfg = model.config
        p = next(model.parameters())
        cache = cls(cfg.num_layers, batch_size, cfg.kv_heads, cfg.head_dim, max_length, p.device, dtype or p.dtype)
        for i, layer in enumerate(model.layers):  # a device_map may split the layers over devices
            d = layer.input_norm.weight.device
            if d != p.device:
                cache.keys[i], cache.values[i] = cache.keys[i].to(d), cache.values[i].to(d)
        return cache

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        s = k.shape[2]
        end = self.length + s
        if end > self.max_length:
            raise InputError(f"KV cache overflow: {end} positions > max_length {self.max_length}")
        self.keys[layer_idx][:, :, self.length : end] = k.to(self.keys[layer_idx].dtype)
        self.values[layer_idx][:, :, self.length : end] = v.to(self.values[layer_idx].dtype)
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


def sample_next_token(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: Optional[int] = None,
    do_sample: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick the next token per row: greedy when ``temperature == 0`` or ``not do_sample``. [B]."""
    if temperature == 0 or not do_sample:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pad_batch(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: ``(input_ids [B, S], attention_mask [B, S])``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), s), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, s - len(p) :] = 1
    return ids, mask


def generate(
    model: nn.Module,
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
    streaming: bool = False,
) -> Union[torch.Tensor, Iterator[torch.Tensor]]:
    """Generate ``max_new_tokens`` after each prompt, through the inference engine.

    Each row of ``input_ids`` (its real tokens per ``attention_mask``, any padding side)
    is one request of a :class:`~moe_lab.inference.engine.InferenceEngine`, so it decodes
    exactly as it would alone. ``seed`` seeds row ``i`` with ``seed + i``.

    Returns ``[B, S + new]`` token ids: the input as given, then the new tokens (rows that
    hit ``eos_token_id`` are padded with ``pad_token_id`` after it; ``new`` is shorter than
    ``max_new_tokens`` when every row stopped early), or with ``streaming=True`` an
    iterator of ``[B]`` tensors, one per step.
    """
    validate_sampling(temperature, top_p, top_k, max_new_tokens)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    it = _generate_steps(model, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k, do_sample,
                         eos_token_id, seed, pad_token_id)
    if streaming:
        return it
    steps: List[torch.Tensor] = list(it)
    new = torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.cat([input_ids.to(new.device), new], dim=1)


def _generate_steps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: Optional[int],
    do_sample: bool,
    eos_token_id: Optional[int],
    seed: Optional[int],
    pad_token_id: int,
) -> Iterator[torch.Tensor]:
    """Yield ``[B]`` per step (``pad_token_id`` for rows past their EOS) from one engine run."""
    if attention_mask is None:
        prompts = input_ids.tolist()
    else:
        prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu())]
    if any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one real token (attention_mask row of zeros)")
    s = input_ids.shape[1]
    if s + max_new_tokens > model.config.max_position_embeddings:
        raise InputError(
            f"prompt ({s}) + max_new_tokens ({max_new_tokens}) = {s + max_new_tokens} exceeds the context "
            f"({model.config.max_position_embeddings})"
        )
    was_training = model.training
    temp = 0.0 if not do_sample else float(temperature)
    model.eval()
    reqs: list = []
    engine = None
    try:
        engine = engine_for(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        reqs = [
            engine.submit(p, SamplingParams(max_new_tokens, temp, float(top_p), top_k, None if seed is None else seed + i),
                          eos_token_id=eos_token_id)
            for i, p in enumerate(prompts)
        ]
        device = engine.device
        for i in range(max_new_tokens):
            while any(not r.finished and len(r.token_ids) <= i for r in reqs):
                engine.step()
            if all(len(r.token_ids) <= i for r in reqs):
                return  # every row ended (EOS) before step i
            yield torch.tensor([r.token_ids[i] if len(r.token_ids) > i else pad_token_id for r in reqs],
                               dtype=torch.long, device=device)
    finally:  # a consumer that stopped early: end its requests so the engine is free again
        if engine is not None:
            for r in reqs:
                if not r.finished:
                    engine.cancel(r)
            engine.run_until_done(reqs)
        model.train(was_training)
