"""OptimizedMoEModel: load a checkpoint for inference with only a few experts per layer resident.

    model = OptimizedMoEModel("outputs/demo/model", max_experts_in_memory=4, expert_cache_size=8)
    out = model.generate(torch.tensor([ids]), max_length=64, temperature=0)      # [1, 64] greedy
    for step in model.generate(ids, max_length=64, streaming=True): ...           # [B] per step
    model.generate_text("12 + 5 =", max_new_tokens=16, temperature=0)            # str
    model.complete([CompletionRequest("12 + 5 =", max_tokens=8)])                # batched, per-request params

Loading: through :class:`~moe_lab.checkpoint.Checkpoint` (no pickle; every tensor's shape
and dtype checked against the safetensors header before anything is allocated). The dense
weights (embeddings, attention, norms, routers, lm_head) are read onto the compute device;
the experts are *not* read: they stay on the meta device and each MoE layer's experts are
handed to a :class:`~moe_lab.inference.DynamicExpertLoader` backed by a
:class:`~moe_lab.inference.expert_cache.SafetensorsExpertStore` over the checkpoint's lazy
weights.

The two memory knobs (both per MoE layer, both counted in experts):

- ``max_experts_in_memory``: device slots. At most this many experts of a layer are on the
  compute device (GPU memory on a CUDA machine). The DynamicExpertLoader's ``cache_size``.
- ``expert_cache_size``: host copies. At most this many experts of a layer are held
  materialised in host RAM (page-locked on CUDA machines, for fast asynchronous copies),
  outside the memory-mapped file. Experts outside both tiers exist only in the mapped file
  and are read from it on demand. ``0`` disables the host tier.

The two tiers are independent: an expert can be in both (typical on a GPU), in one, or in
neither. ``device_map="auto"`` picks CUDA when available, else CPU.

``generate`` semantics: ``max_length`` is the total length of each output row including the
prompt (as in transformers): ``max_length - S`` new tokens, where S is the (padded) prompt
length of the batch. ``max_new_tokens=`` (keyword) overrides it. ``temperature=0`` is greedy.
Batches of prompts of different lengths are left-padded with an attention mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError, ConfigError, InputError
from .expert_cache import DynamicExpertLoader, SafetensorsExpertStore
from .generate import KVCache, pad_batch, sample_next_token, validate_sampling
from .generate import generate as _generate
from .static_decode import StaticDecoder, supports_static_decode

PromptLike = Union[str, Sequence[int]]

_GENERATE_KWARGS = (
    "top_k",
    "do_sample",
    "eos_token_id",
    "seed",
    "streaming",
    "attention_mask",
    "max_new_tokens",
    "pad_token_id",
)


class FieldError(InputError):
    """An InputError about one named request field (``field``), e.g. ``max_tokens``."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


# ---------------------------------------------------------------------------------------
# batched decoding with per-row parameters
# ---------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """Per-sequence decoding parameters (``temperature=0`` is greedy)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    seed: Optional[int] = None

    def key(self) -> Tuple[float, float, Optional[int]]:
        return (self.temperature, self.top_p, self.top_k)


class BatchedDecoder:
    """Decode a batch of prompts step by step, each row with its own parameters.

    Iterating yields, per step, a list of B token ids (``None`` for rows already finished).
    A row finishes after its ``max_new_tokens``, on ``eos_token_id``, or when the consumer
    calls :meth:`finish` (a stop string, a client that went away). Finished rows are
    dropped from the batch (and the KV cache), so they cost nothing afterwards.

    Seeded rows use their own generator, so a seeded request gives the same tokens alone
    or inside a batch (up to floating-point noise from padding).
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        eos_token_id: Optional[int] = None,
        pad_token_id: int = 0,
    ) -> None:
        if len(prompts) != len(params):
            raise InputError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        for p in params:
            validate_sampling(p.temperature, p.top_p, p.top_k, p.max_new_tokens)
        self.model = model
        self.prompts = [list(p) for p in prompts]
        self.params = list(params)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.batch_size = len(prompts)
        self.finished = [False] * self.batch_size
        self.num_generated = [0] * self.batch_size
        ids, _ = pad_batch(self.prompts, pad_token_id)
        self.context = model.config.max_position_embeddings
        total = ids.shape[1] + max(p.max_new_tokens for p in self.params)
        if total > self.context:
            raise InputError(
                f"padded prompt ({ids.shape[1]}) + max_new_tokens ({max(p.max_new_tokens for p in self.params)}) = "
                f"{total} exceeds the context ({self.context})"
            )

    def finish(self, row: int) -> None:
        """Stop generating for ``row`` (its later steps yield None)."""
        self.finished[row] = True

    @torch.no_grad()
    def __iter__(self) -> Iterator[List[Optional[int]]]:
        model = self.model
        device = next(model.parameters()).device
        ids, mask = pad_batch(self.prompts, self.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        total = ids.shape[1] + max(p.max_new_tokens for p in self.params)
        cache = KVCache.for_model(model, self.batch_size, total)
        gens: List[Optional[torch.Generator]] = [
            torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None for p in self.params
        ]
        rows = list(range(self.batch_size))  # batch position -> original row
        logits_BV = model(ids, attention_mask=mask, kv_cache=cache)[:, -1]
        while True:
            nxt = self._sample(logits_BV, rows, gens)  # [b]
            step: List[Optional[int]] = [None] * self.batch_size
            for i, r in enumerate(rows):
                if self.finished[r]:
                    continue
                tok = int(nxt[i])
                step[r] = tok
                self.num_generated[r] += 1
                if self.num_generated[r] >= self.params[r].max_new_tokens or tok == self.eos_token_id:
                    self.finished[r] = True
            yield step  # the consumer may call finish() here
            keep = [i for i, r in enumerate(rows) if not self.finished[r]]
            if not keep:
                return
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=device)
                cache.keys = [k.index_select(0, idx) for k in cache.keys]
                cache.values = [v.index_select(0, idx) for v in cache.values]
                mask, nxt = mask.index_select(0, idx), nxt.index_select(0, idx)
                rows = [rows[i] for i in keep]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=device)], dim=1)
            logits_BV = model(nxt.unsqueeze(1), attention_mask=mask, kv_cache=cache)[:, -1]

    def _sample(self, logits_BV: torch.Tensor, rows: List[int], gens: List[Optional[torch.Generator]]) -> torch.Tensor:
        params = [self.params[r] for r in rows]
        if all(gens[r] is None for r in rows) and len({p.key() for p in params}) == 1:
            p = params[0]
            return sample_next_token(logits_BV, p.temperature, p.top_p, p.top_k)
        out = []
        for i, r in enumerate(rows):
            p = self.params[r]
            out.append(sample_next_token(logits_BV[i : i + 1], p.temperature, p.top_p, p.top_k, True, gens[r]))
        return torch.cat(out)


# ---------------------------------------------------------------------------------------
# text-level requests
# ---------------------------------------------------------------------------------------


@dataclass
class CompletionRequest:
    """One text completion: a prompt (text or token ids) and its decoding parameters."""

    prompt: PromptLike
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    stop: Sequence[str] = ()
    seed: Optional[int] = None


@dataclass
class Completion:
    """The result of a :class:`CompletionRequest`."""

    text: str
    token_ids: List[int]  #: generated ids (eos excluded)
    prompt_tokens: int
    finish_reason: str  #: "stop" (eos or a stop string) or "length"
    completion_tokens: int = 0  #: tokens generated (eos included)


@dataclass
class CompletionChunk:
    """A streamed piece of a completion; the last chunk carries ``finish_reason``."""

    text: str
    finish_reason: Optional[str] = None  #: set on the last chunk: "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0  #: tokens generated so far (eos included)


class _TextTracker:
    """Incremental detokenisation with stop strings; holds back text that may start a stop."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text

    def pending(self, final: bool) -> str:
        """New text safe to show (all of it when ``final``)."""
        text = self.text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                end = len(text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a suffix that could begin a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end = min(end, len(text[:end]) - k)
                        break
        end = max(end, self.emitted)
        out = text[self.emitted : end]
        self.emitted = end
        return out


def _check_int(name: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise FieldError(name, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise FieldError(name, f"must be <= {hi}, got {value}")
    return value


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------


def is_expert_weight(name: str) -> bool:
    """The stacked expert tensors (``layers.{i}.mlp.experts.w_in`` / ``w_out``): read on demand."""
    return ".mlp.experts." in name


class OptimizedMoEModel:
    """A moe_lab checkpoint loaded for inference with an expert cache.

    Args:
        model_path: checkpoint directory (``config.json`` + ``model.safetensors``; tokenizer
            files and ``routing_stats.json`` are used when present).
        device_map: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
        max_experts_in_memory: experts per MoE layer resident on the compute device.
        expert_cache_size: experts per MoE layer kept as materialised host copies (see the
            module docstring); 0 reads every load from the mapped file.
        eviction_policy, prefetch_strategy: passed to :class:`DynamicExpertLoader`.
        dtype: compute dtype ("float32", "bfloat16", "float16" or a torch.dtype); default:
            the stored dtype.

    Attributes:
        model: the underlying :class:`~moe_lab.model.MoEModel` (experts managed in place).
        expert_loader: its :class:`DynamicExpertLoader`.
        checkpoint: the :class:`~moe_lab.checkpoint.Checkpoint` it was read from.
        tokenizer: the checkpoint's tokenizer (the byte tokenizer when none was saved).
    """

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        device_map: Union[str, torch.device] = "auto",
        max_experts_in_memory: int = 4,
        expert_cache_size: int = 8,
        eviction_policy: str = "lru",
        prefetch_strategy: str = "usage_based",
        dtype: Union[None, str, torch.dtype] = None,
    ) -> None:
        for name, v, lo in (("max_experts_in_memory", max_experts_in_memory, 1), ("expert_cache_size", expert_cache_size, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        if not Path(model_path).expanduser().is_dir():
            raise CheckpointError(f"checkpoint directory not found: {model_path}")
        self.device = resolve_device(device_map, "device_map")
        dtype = resolve_dtype(dtype)
        ckpt = Checkpoint.open(Path(model_path).expanduser(), dropout=0.0, attention_dropout=0.0, expert_dropout=0.0)
        if ckpt.format != "moe_lab":
            raise CheckpointError(
                f"{ckpt.path} is a transformers checkpoint (model_type {ckpt.model_type!r}); OptimizedMoEModel reads "
                "moe_lab checkpoints: convert it first with moe_lab.import_hf_mixtral(path, out=DIR)"
            )
        dtype = dtype or ckpt.stored_dtype
        # every tensor is checked against the header; the experts stay on the meta device
        model = ckpt.build_model(device=self.device, dtype=dtype, exclude=is_expert_weight)
        store = SafetensorsExpertStore(
            ckpt.weights(lazy=True), model.moe_layer_indices, host_cache_size=expert_cache_size,
            pin_memory=self.device.type == "cuda", dtype=dtype,
        )
        self.expert_loader = DynamicExpertLoader(
            model,
            cache_size=max_experts_in_memory,
            eviction_policy=eviction_policy,
            prefetch_strategy=prefetch_strategy,
            routing_stats=ckpt.routing_stats(),
            store=store,
            device=self.device,
            dtype=dtype,
        )
        leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftovers:
            raise CheckpointError(f"weights left unloaded: {leftovers[:8]}")
        self.checkpoint = ckpt
        self.path = ckpt.path
        self.config = ckpt.config
        self.max_experts_in_memory = max_experts_in_memory
        self.expert_cache_size = expert_cache_size
        self.model = model.eval()
        self.dtype = dtype
        self._tokenizer: Any = None
        #: decode with the static KV cache + CUDA-graph step when every expert is resident
        #: (``max_experts_in_memory >= num_experts``), the router is top-k without capacity,
        #: and the device is CUDA (settable, e.g. to test the static path on CPU)
        self.static_decode = self.device.type == "cuda" and supports_static_decode(model)
        self._decoders: Dict[Tuple[int, int], StaticDecoder] = {}

    # ---- conveniences -----------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (loaded on first use); the byte tokenizer if none was saved."""
        if self._tokenizer is None:
            self._tokenizer = self.checkpoint.tokenizer()
        return self._tokenizer

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        """The model's forward: logits [B, S, V] (see :meth:`MoEModel.forward`)."""
        with torch.no_grad():
            return self.model(input_ids.to(self.device), attention_mask=None if attention_mask is None else attention_mask.to(self.device), **kwargs)

    def stats(self) -> Dict[str, Any]:
        """Expert-cache statistics (see :meth:`DynamicExpertLoader.stats`)."""
        return self.expert_loader.stats()

    def __repr__(self) -> str:
        return (
            f"OptimizedMoEModel({str(self.path)!r}, device={self.device}, dtype={self.dtype}, "
            f"max_experts_in_memory={self.max_experts_in_memory}, expert_cache_size={self.expert_cache_size})"
        )

    # ---- token-level generation -------------------------------------------------------
    def _prepare_ids(
        self, input_ids: Any, attention_mask: Optional[torch.Tensor], pad_token_id: int
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
            if input_ids.dim() != 2:
                raise InputError(f"input_ids must have shape [batch, seq] or [seq], got {tuple(input_ids.shape)}")
            if attention_mask is None:
                return input_ids, None
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise InputError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        elif isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(i, int) for i in input_ids):
            rows = [list(input_ids)]
        elif isinstance(input_ids, (list, tuple)) and all(isinstance(r, (list, tuple, torch.Tensor)) for r in input_ids):
            rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in input_ids]
        else:
            raise InputError("input_ids must be a tensor [batch, seq], a list of token ids, or a list of such lists")
        ids, mask = pad_batch(rows, pad_token_id)  # left padding: generation appends on the right
        return ids, (None if bool(mask.all()) else mask)

    def generate(
        self,
        input_ids: Any,
        max_length: int = 100,
        temperature: float = 1.0,
        top_p: float = 0.9,
        **kwargs: Any,
    ) -> Union[torch.Tensor, Iterator[torch.Tensor]]:
        """Generate with the KV cache and the expert cache.

        Args:
            input_ids: [B, S] or [S] tensor, a list of ids, or a list of id lists of different
                lengths (left-padded here).
            max_length: total length of each output row, prompt included (like transformers).
            temperature: 0 = greedy.
            top_p: nucleus mass in (0, 1].
            **kwargs: ``top_k``, ``do_sample`` (False = greedy), ``eos_token_id`` (default
                None: no early stop), ``seed``, ``streaming`` (yield [B] tensors per step),
                ``attention_mask`` [B, S] (1 real, 0 pad; any padding side),
                ``max_new_tokens`` (overrides ``max_length``), ``pad_token_id``.

        Returns:
            [B, S + new] token ids, or with ``streaming=True`` an iterator of [B] tensors.
        """
        unknown = sorted(set(kwargs) - set(_GENERATE_KWARGS))
        if unknown:
            raise InputError(f"unknown generate() arguments {unknown}; expected some of {list(_GENERATE_KWARGS)}")
        pad = kwargs.get("pad_token_id")
        if pad is None:
            pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        ids, mask = self._prepare_ids(input_ids, kwargs.get("attention_mask"), pad)
        new = kwargs.get("max_new_tokens")
        if new is None:
            _check_int("max_length", max_length, lo=1)
            new = max_length - ids.shape[1]
            if new < 1:
                raise InputError(
                    f"max_length ({max_length}) counts the prompt and must exceed the prompt length ({ids.shape[1]}); "
                    "raise it or pass max_new_tokens="
                )
        if self.static_decode:
            key = (ids.shape[0], ids.shape[1] + new)
            if key not in self._decoders:
                if len(self._decoders) >= 8:  # each holds a KV cache and a captured graph
                    self._decoders.pop(next(iter(self._decoders)))
                self._decoders[key] = StaticDecoder(self.model, key[0], key[1])
            it = self._decoders[key].generate_iter(
                ids, mask, max_new_tokens=new, temperature=temperature, top_p=top_p, top_k=kwargs.get("top_k"),
                do_sample=kwargs.get("do_sample", True), eos_token_id=kwargs.get("eos_token_id"),
                seed=kwargs.get("seed"), pad_token_id=pad,
            )
            if kwargs.get("streaming", False):
                return it
            steps = list(it)
            return torch.cat([ids.to(self.device), torch.stack(steps, dim=1)], dim=1)
        return _generate(
            self.model,
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            temperature=temperature,
            top_p=top_p,
            top_k=kwargs.get("top_k"),
            do_sample=kwargs.get("do_sample", True),
            eos_token_id=kwargs.get("eos_token_id"),
            seed=kwargs.get("seed"),
            pad_token_id=pad,
            streaming=bool(kwargs.get("streaming", False)),
        )

    # ---- text-level helpers (used by the server and the CLI) ---------------------------
    def encode_prompt(self, prompt: PromptLike) -> List[int]:
        """Token ids of a prompt given as text or as ids; FieldError("prompt") when unusable."""
        vocab = self.config.vocab_size
        if isinstance(prompt, str):
            if not prompt:
                raise FieldError("prompt", "is empty")
            ids = list(self.tokenizer.encode(prompt))
            if not ids:
                raise FieldError("prompt", "encodes to no tokens")
            return ids
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise FieldError("prompt", "is an empty token list")
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)]
            if bad:
                raise FieldError("prompt", f"token ids must be integers, got {bad[0]!r}")
            out = [t for t in prompt if not 0 <= t < vocab]
            if out:
                raise FieldError("prompt", f"token id {out[0]} is outside the vocabulary [0, {vocab})")
            return list(prompt)
        raise FieldError("prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}")

    def check_request(self, req: CompletionRequest, max_tokens_limit: Optional[int] = None) -> List[int]:
        """Validate a request; returns the prompt's ids. FieldError names the bad field."""
        ids = self.encode_prompt(req.prompt)
        ctx = self.config.max_position_embeddings
        if len(ids) >= ctx:
            raise FieldError("prompt", f"is {len(ids)} tokens; the context is {ctx} tokens (prompt + max_tokens)")
        _check_int("max_tokens", req.max_tokens, lo=1, hi=max_tokens_limit)
        if len(ids) + req.max_tokens > ctx:
            raise FieldError(
                "max_tokens",
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the context ({ctx}); "
                f"at most {ctx - len(ids)}",
            )
        for name, v in (("temperature", req.temperature), ("top_p", req.top_p)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise FieldError(name, f"must be a number, got {v!r}")
        if req.temperature < 0:
            raise FieldError("temperature", f"must be >= 0, got {req.temperature}")
        if not 0 < req.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1], got {req.top_p}")
        if req.top_k is not None:
            _check_int("top_k", req.top_k, lo=0)
        if req.seed is not None:
            _check_int("seed", req.seed, lo=0)
        if isinstance(req.stop, str) or any(not isinstance(s, str) for s in req.stop):
            raise FieldError("stop", "must be a list of strings")
        return ids

    def _params(self, req: CompletionRequest) -> SamplingParams:
        return SamplingParams(req.max_tokens, float(req.temperature), float(req.top_p), req.top_k, req.seed)

    def complete(
        self,
        requests: Sequence[CompletionRequest],
        max_tokens_limit: Optional[int] = None,
        should_stop: Optional[Callable[[int], bool]] = None,
    ) -> List[Completion]:
        """Run text completions as padded batches (rows grouped so each batch fits the context).

        Args:
            requests: the completions to run; each is validated (FieldError names the field).
            max_tokens_limit: the largest ``max_tokens`` allowed.
            should_stop: called with a request's index after each step; True stops that
                request (finish_reason "length"), e.g. at a deadline.
        """
        prompts = [self.check_request(r, max_tokens_limit) for r in requests]
        tok = self.tokenizer
        results: List[Optional[Completion]] = [None] * len(requests)
        ctx = self.config.max_position_embeddings
        order = sorted(range(len(requests)), key=lambda i: len(prompts[i]))
        groups: List[List[int]] = []
        for i in order:  # prompts ascending: a group fits when longest prompt + largest max_tokens does
            if groups:
                g = groups[-1] + [i]
                if len(prompts[i]) + max(requests[j].max_tokens for j in g) <= ctx:
                    groups[-1] = g
                    continue
            groups.append([i])
        for g in groups:
            dec = BatchedDecoder(self.model, [prompts[i] for i in g], [self._params(requests[i]) for i in g],
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0)
            trackers = [_TextTracker(tok, requests[i].stop) for i in g]
            reasons = ["length"] * len(g)
            for step in dec:
                for row, token in enumerate(step):
                    if token is None:
                        continue
                    if should_stop is not None and should_stop(g[row]):
                        dec.finish(row)
                    if token == tok.eos_token_id:
                        reasons[row] = "stop"
                        continue
                    trackers[row].add(token)
                    if trackers[row].stopped:
                        reasons[row] = "stop"
                        dec.finish(row)
            for row, i in enumerate(g):
                tr = trackers[row]
                results[i] = Completion(tr.text, tr.ids, len(prompts[i]), reasons[row], dec.num_generated[row])
        return [r for r in results if r is not None]

    def stream(self, request: CompletionRequest, max_tokens_limit: Optional[int] = None) -> Iterator[CompletionChunk]:
        """Stream one completion as text chunks; the last chunk has ``finish_reason``."""
        ids = self.check_request(request, max_tokens_limit)
        tok = self.tokenizer
        dec = BatchedDecoder(self.model, [ids], [self._params(request)], eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id or 0)
        tracker = _TextTracker(tok, request.stop)
        reason = "length"
        for step in dec:
            token = step[0]
            if token is None:
                break
            if token == tok.eos_token_id:
                reason = "stop"
                break
            tracker.add(token)
            if tracker.stopped:
                reason = "stop"
                dec.finish(0)
                break
            text = tracker.pending(final=False)
            if text:
                yield CompletionChunk(text, prompt_tokens=len(ids), completion_tokens=dec.num_generated[0])
        yield CompletionChunk(tracker.pending(final=True), reason, len(ids), dec.num_generated[0])

    def generate_text(self, prompt: PromptLike, max_new_tokens: int = 64, temperature: float = 1.0,
                      top_p: float = 1.0, top_k: Optional[int] = None, stop: Sequence[str] = (),
                      seed: Optional[int] = None) -> str:
        """The completion text of one prompt (stops at eos, a stop string or ``max_new_tokens``)."""
        req = CompletionRequest(prompt, max_new_tokens, temperature, top_p, top_k, list(stop), seed)
        return self.complete([req])[0].text
