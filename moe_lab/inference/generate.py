"""Autoregressive generation with a KV cache.

    out = generate(model, input_ids, attention_mask, max_new_tokens=32, temperature=0)  # greedy
    for tokens in generate(model, ids, max_new_tokens=32, streaming=True): ...           # [B] per step

Batched prompts of different lengths are left-padded (``pad_batch``); positions count real
tokens only, so a padded prompt generates exactly what it generates alone.
``temperature=0`` (or ``do_sample=False``) is greedy; otherwise temperature, top-k and
top-p (nucleus) sampling with an optional seed.

Shape letters: B batch, S prompt length, Hkv key/value heads, Dh head dim, V vocab.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import InputError


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
        return cls(cfg.num_layers, batch_size, cfg.kv_heads, cfg.head_dim, max_length, p.device, dtype or p.dtype)

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


def validate_sampling(temperature: float, top_p: float, top_k: Optional[int], max_new_tokens: int) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise InputError(f"top_k must be >= 0, got {top_k}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


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


@torch.no_grad()
def _generate_iter(
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
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    b, s = input_ids.shape
    total = s + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise InputError(
            f"prompt ({s}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the context "
            f"({model.config.max_position_embeddings})"
        )
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device).long()
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache.for_model(model, b, total)
    logits = model(input_ids, attention_mask=mask, kv_cache=cache)[:, -1]  # [B, V]

    def step(nxt: torch.Tensor) -> torch.Tensor:
        nonlocal mask
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
        return model(nxt.unsqueeze(1), attention_mask=mask, kv_cache=cache)[:, -1]

    yield from decode_loop(logits, step, max_new_tokens, temperature, top_p, top_k, do_sample, eos_token_id, gen, pad_token_id)


def decode_loop(
    logits_BV: torch.Tensor,
    step: Callable[[torch.Tensor], torch.Tensor],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: Optional[int],
    do_sample: bool,
    eos_token_id: Optional[int],
    generator: Optional[torch.Generator],
    pad_token_id: int,
) -> Iterator[torch.Tensor]:
    """The decoding loop every decoder shares: sample, pad finished rows, yield ``[B]``, step.

    ``step(tokens_B)`` feeds the chosen tokens and returns the next logits ``[B, V]``; it is
    not called after the last token or once every row has hit ``eos_token_id``.
    """
    finished = torch.zeros(logits_BV.shape[0], dtype=torch.bool, device=logits_BV.device)
    for i in range(max_new_tokens):
        nxt = sample_next_token(logits_BV, temperature, top_p, top_k, do_sample, generator)  # [B]
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            finished |= nxt == eos_token_id
        yield nxt
        if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            return
        logits_BV = step(nxt)


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
    """Generate ``max_new_tokens`` after each prompt.

    Returns ``[B, S + new]`` token ids (sequences that hit ``eos_token_id`` are padded with
    ``pad_token_id`` after it), or with ``streaming=True`` an iterator of ``[B]`` tensors,
    one per step.
    """
    validate_sampling(temperature, top_p, top_k, max_new_tokens)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    was_training = model.training
    model.eval()
    it = _generate_iter(
        model, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k, do_sample, eos_token_id, seed, pad_token_id
    )
    if streaming:
        return it
    steps: List[torch.Tensor] = list(it)
    model.train(was_training)
    new = torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.cat([input_ids.to(new.device), new], dim=1)
