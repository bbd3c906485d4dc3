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
neither.

``device_map`` (see :mod:`moe_lab.inference.placement`): ``"auto"`` puts the whole model on
one GPU when it fits, else splits the decoder layers in order across the visible GPUs, and
beyond that keeps fewer experts per layer on the GPUs (the rest behind the expert cache);
the CPU without CUDA. ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and an explicit
``{module prefix: device}`` dict also work.

With part of the experts resident, host-to-device expert copies run on a side CUDA stream
from pinned memory, issued one layer ahead from the next layer's router applied to the
current hidden state (see :class:`~moe_lab.inference.DynamicExpertLoader`).

``generate`` semantics: ``max_length`` is the total length of each output row including the
prompt (as in transformers): ``max_length - S`` new tokens, where S is the (padded) prompt
length of the batch. ``max_new_tokens=`` (keyword) overrides it. ``temperature=0`` is greedy.
Batches of prompts of different lengths are left-padded with an attention mask.

Every call decodes on :attr:`OptimizedMoEModel.engine`, one
:class:`~moe_lab.inference.engine.InferenceEngine` (continuous batching over a KV slot
pool; CUDA graphs when every expert is resident on a CUDA device; with part of the experts
resident, CUDA-graph pieces around the expert caches on CUDA and eager steps on CPU). ``max_experts_in_memory="auto"`` keeps every expert on the device
when the model fits (see :func:`auto_experts_in_memory`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..devices import resolve_dtype
from ..errors import CheckpointError, ConfigError, InputError
from .expert_cache import DynamicExpertLoader, SafetensorsExpertStore
from .engine import InferenceEngine, Request, SamplingParams, TextTracker
from .generate import pad_batch
from .placement import DeviceMapLike, device_for, place_model, resolve_device_map

logger = logging.getLogger(__name__)

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


_TextTracker = TextTracker  # moved to moe_lab.inference.engine


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


def auto_experts_in_memory(model: nn.Module, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
                           headroom: float = 0.8) -> int:
    """``max_experts_in_memory="auto"``: experts per MoE layer to keep on ``device``.

    Every expert when the dense weights already on the device plus all experts fit in
    ``headroom`` of its free memory (always on CPU, where "device memory" is host RAM and
    the mapped file backs everything); otherwise as many as fit, at least 1. Logs the
    residency chosen.
    """
    layers = [m for m in model.moe_layers]
    num_experts = model.config.num_experts
    if device.type != "cuda":
        logger.info("max_experts_in_memory=auto: all %d experts per layer resident (device %s)", num_experts, device)
        return num_experts
    per_expert = 0  # bytes of one expert of every MoE layer, in the compute dtype
    for i in model.moe_layer_indices:
        for name in (f"layers.{i}.mlp.experts.w_in", f"layers.{i}.mlp.experts.w_out"):
            shape = checkpoint.weights(lazy=True).spec(name).shape
            per_expert += int(torch.Size(shape[1:]).numel()) * torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(free * headroom)
    fit = budget // per_expert if per_expert else num_experts
    chosen = int(max(1, min(num_experts, fit)))
    logger.info(
        "max_experts_in_memory=auto: %d of %d experts per layer resident on %s (%d MoE layers, %.1f MiB per "
        "expert across layers, %.1f GiB free)", chosen, num_experts, device, len(layers), per_expert / 2**20,
        free / 2**30,
    )
    return chosen


class OptimizedMoEModel:
    """A moe_lab checkpoint loaded for inference with an expert cache.

    Args:
        model_path: checkpoint directory (``config.json`` + ``model.safetensors``; tokenizer
            files and ``routing_stats.json`` are used when present).
        device_map: "auto" (one GPU when the model fits; else its decoder layers split in
            order across the visible GPUs, then experts behind the cache; the CPU without
            CUDA), "cpu", "cuda", "cuda:N", or a ``{module prefix: device}`` dict (see
            :mod:`moe_lab.inference.placement`).
        max_experts_in_memory: experts per MoE layer resident on the compute device, or
            "auto": all of them when the whole model fits in device memory (always on CPU),
            else as many as fit (see :func:`auto_experts_in_memory`).
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
        device_map: DeviceMapLike = "auto",
        max_experts_in_memory: Union[int, str] = 4,
        expert_cache_size: int = 8,
        eviction_policy: str = "lru",
        prefetch_strategy: str = "usage_based",
        dtype: Union[None, str, torch.dtype] = None,
    ) -> None:
        checks = [("expert_cache_size", expert_cache_size, 0)]
        if max_experts_in_memory != "auto":
            checks.append(("max_experts_in_memory", max_experts_in_memory, 1))
        for name, v, lo in checks:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}" + (" or 'auto'" if name[0] == "m" else "")
                                  + f", got {v!r}")
        if not Path(model_path).expanduser().is_dir():
            raise CheckpointError(f"checkpoint directory not found: {model_path}")
        # a plain device is resolved (and refused) before anything is read; a dict or "auto"
        # with GPUs needs the model's names and sizes: the checkpoint is read on the host first
        planned_later = isinstance(device_map, Mapping) or (device_map == "auto" and torch.cuda.is_available())
        placement, planned = ({}, None) if planned_later else resolve_device_map(device_map, None, dtype)
        dtype = resolve_dtype(dtype)
        ckpt = Checkpoint.open(Path(model_path).expanduser(), dropout=0.0, attention_dropout=0.0, expert_dropout=0.0)
        if ckpt.format != "moe_lab":
            raise CheckpointError(
                f"{ckpt.path} is a transformers checkpoint (model_type {ckpt.model_type!r}); OptimizedMoEModel reads "
                "moe_lab checkpoints: convert it first with moe_lab.import_hf_mixtral(path, out=DIR)"
            )
        dtype = dtype or ckpt.stored_dtype
        # every tensor is checked against the header; the experts stay on the meta device
        if planned_later:  # read on the host, then each part moves to its device
            model = ckpt.build_model(device="cpu", dtype=dtype, exclude=is_expert_weight)
            placement, planned = resolve_device_map(device_map, model, dtype)
        else:
            model = ckpt.build_model(device=placement[""], dtype=dtype, exclude=is_expert_weight)
        devices = list(dict.fromkeys(placement.values()))
        place_model(model, placement)
        #: the input device (embeddings); the model may span more (:attr:`placement`)
        self.device = device_for("embed_tokens.weight", placement)
        if max_experts_in_memory == "auto":
            max_experts_in_memory = planned if planned is not None else auto_experts_in_memory(
                model, ckpt, self.device, dtype)
        elif planned is not None and planned < max_experts_in_memory:
            logger.info("device_map=auto: %d experts per layer fit on the devices (asked for %d)", planned,
                        max_experts_in_memory)
            max_experts_in_memory = planned
        #: {module prefix: device} the model runs with
        self.placement = placement
        store = SafetensorsExpertStore(
            ckpt.weights(lazy=True), model.moe_layer_indices, host_cache_size=expert_cache_size,
            pin_memory=any(d.type == "cuda" for d in devices), dtype=dtype,
        )
        self.expert_loader = DynamicExpertLoader(
            model,
            cache_size=max_experts_in_memory,
            eviction_policy=eviction_policy,
            prefetch_strategy=prefetch_strategy,
            routing_stats=ckpt.routing_stats(),
            store=store,
            device=self.device if len(devices) == 1 else None,  # None: each layer's slots where its router is
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
        #: slots of the inference engine (requests decoded together); settable before first use
        self.max_batch_size = 8
        self._engine: Optional[InferenceEngine] = None

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
        """Expert-cache statistics (see :meth:`DynamicExpertLoader.stats`: hits, misses,
        hit_rate, ...) plus ``engine``: the inference engine's counters (empty before use)."""
        st = self.expert_loader.stats()
        st["engine"] = self._engine.stats() if self._engine is not None else {}
        return st

    @property
    def engine(self) -> InferenceEngine:
        """The inference engine every generate/complete/stream call runs on (built on first
        use with ``max_batch_size`` slots of the model's context)."""
        if self._engine is None or self._engine.max_batch_size < self.max_batch_size:
            tok = self.tokenizer
            self._engine = InferenceEngine(self.model, max_batch_size=self.max_batch_size, tokenizer=tok,
                                           eos_token_id=getattr(tok, "eos_token_id", None))
        return self._engine

    @property
    def static_decode(self) -> bool:
        """Whether decoding replays captured CUDA graphs (CUDA, every expert resident, top-k)."""
        return self.engine.use_cuda_graph

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
        it = self._generate_steps(ids, mask, new, temperature, top_p, kwargs, pad)
        if kwargs.get("streaming", False):
            return it
        steps = list(it)
        out = torch.stack(steps, dim=1) if steps else ids.new_zeros(ids.shape[0], 0).to(self.device)
        return torch.cat([ids.to(self.device), out], dim=1)

    def _generate_steps(self, ids: torch.Tensor, mask: Optional[torch.Tensor], new: int, temperature: float,
                        top_p: float, kwargs: Dict[str, Any], pad: int) -> Iterator[torch.Tensor]:
        """``[B]`` per step from one engine run (``pad`` for rows past their EOS)."""
        from .generate import validate_sampling

        validate_sampling(temperature, top_p, kwargs.get("top_k"), new)
        rows = ids.tolist() if mask is None else [r[m.bool()].tolist() for r, m in zip(ids, mask)]
        ctx = self.config.max_position_embeddings
        if ids.shape[1] + new > ctx:
            raise InputError(f"prompt ({ids.shape[1]}) + max_new_tokens ({new}) = {ids.shape[1] + new} exceeds the "
                             f"context ({ctx})")
        temp = float(temperature) if kwargs.get("do_sample", True) else 0.0
        seed = kwargs.get("seed")
        eng = self.engine
        reqs = [eng.submit(r, SamplingParams(new, temp, float(top_p), kwargs.get("top_k"),
                                             None if seed is None else seed + i),
                           eos_token_id=kwargs.get("eos_token_id"), detokenize=False)
                for i, r in enumerate(rows)]
        try:
            for i in range(new):
                while any(not r.finished and len(r.token_ids) <= i for r in reqs):
                    eng.advance()
                if all(len(r.token_ids) <= i for r in reqs):
                    return
                yield torch.tensor([r.token_ids[i] if len(r.token_ids) > i else pad for r in reqs],
                                   dtype=torch.long, device=self.device)
        finally:  # a consumer that stopped early frees the slots
            for r in reqs:
                if not r.finished:
                    eng.cancel(r)
            eng.run_until_done(reqs)

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

    def submit(self, request: CompletionRequest, max_tokens_limit: Optional[int] = None,
               on_event: Optional[Callable[[Any], None]] = None) -> Request:
        """Validate ``request`` and queue it on :attr:`engine` (see
        :meth:`InferenceEngine.submit`); returns the engine's :class:`Request`."""
        ids = self.check_request(request, max_tokens_limit)
        return self.engine.submit(ids, self._params(request), stop=list(request.stop), on_event=on_event)

    @staticmethod
    def completion(req: Request) -> Completion:
        """The :class:`Completion` of a finished engine request (cancelled counts as "length")."""
        reason = "length" if req.finish_reason in (None, "cancelled") else req.finish_reason
        ids = req.output_ids if req.tracker is None else list(req.tracker.ids)
        return Completion(req.text, ids, len(req.prompt), reason, req.num_generated)

    @staticmethod
    def chunk(event: Any, prompt_tokens: int) -> CompletionChunk:
        """The :class:`CompletionChunk` of an engine event (the last one carries finish_reason)."""
        reason = None
        if event.finished:
            reason = "length" if event.finish_reason == "cancelled" else event.finish_reason
        return CompletionChunk(event.text, reason, prompt_tokens, event.num_generated)

    def complete(
        self,
        requests: Sequence[CompletionRequest],
        max_tokens_limit: Optional[int] = None,
        should_stop: Optional[Callable[[int], bool]] = None,
    ) -> List[Completion]:
        """Run text completions together on the engine (continuous batching: more requests
        than slots wait for a free slot).

        Args:
            requests: the completions to run; each is validated first (FieldError names the field).
            max_tokens_limit: the largest ``max_tokens`` allowed.
            should_stop: called with a request's index after each step; True stops that
                request (finish_reason "length"), e.g. at a deadline.
        """
        prompts = [self.check_request(r, max_tokens_limit) for r in requests]
        eng = self.engine
        reqs = [eng.submit(ids, self._params(r), stop=list(r.stop)) for ids, r in zip(prompts, requests)]

        def check() -> None:
            for i, r in enumerate(reqs):
                if not r.finished and not r.cancel_requested and should_stop(i):
                    eng.cancel(r)

        try:
            eng.run_until_done(reqs, on_step=check if should_stop is not None else None)
        finally:
            for r in reqs:
                if not r.finished:
                    eng.cancel(r)
            eng.run_until_done(reqs)
        return [self.completion(r) for r in reqs]

    def stream(self, request: CompletionRequest, max_tokens_limit: Optional[int] = None) -> Iterator[CompletionChunk]:
        """Stream one completion as text chunks; the last chunk has ``finish_reason``.

        Closing the iterator early cancels the request and frees its slot.
        """
        ids = self.check_request(request, max_tokens_limit)
        eng = self.engine
        req = eng.submit(ids, self._params(request), stop=list(request.stop))
        try:
            for ev in eng.stream(req):
                if ev.finished or ev.text:
                    yield self.chunk(ev, len(ids))
        finally:
            if not req.finished:
                eng.cancel(req)
                eng.run_until_done([req])

    def generate_text(self, prompt: PromptLike, max_new_tokens: int = 64, temperature: float = 1.0,
                      top_p: float = 1.0, top_k: Optional[int] = None, stop: Sequence[str] = (),
                      seed: Optional[int] = None) -> str:
        """The completion text of one prompt (stops at eos, a stop string or ``max_new_tokens``)."""
        req = CompletionRequest(prompt, max_new_tokens, temperature, top_p, top_k, list(stop), seed)
        return self.complete([req])[0].text
