"""The inference engine: every decode in moe_lab runs here.

    engine = InferenceEngine(model, max_batch_size=8, tokenizer=tok, eos_token_id=tok.eos_token_id)
    req = engine.submit([5, 17, 200], SamplingParams(max_new_tokens=32, temperature=0))
    for event in engine.stream(req): print(event.text, end="")        # drives the engine
    outs = engine.generate([[1, 2], [3]], SamplingParams(max_new_tokens=8))   # [Request] done

``generate()``, ``OptimizedMoEModel.generate/complete/stream`` and ``moe-lab generate`` all
run through it. How it works:

- **KV slot pool.** Keys/values are preallocated ``[slots, Hkv, L, Dh]`` per layer. A request
  owns one slot while it runs; its tokens sit at positions ``0..n-1`` of the slot (no
  padding), RoPE positions count its own tokens, and attention reads its slot under a key
  mask ``key_position <= query_position``, so a request decodes exactly as it would alone.
- **Per-iteration scheduling (continuous batching).** Each :meth:`InferenceEngine.step`
  admits waiting requests into free slots, runs up to ``prefill_chunk_size`` prompt tokens
  (chunked prefill: a long prompt is spread over several steps so running streams keep
  going), then one decode step for every running request. A request whose prompt is done
  joins the decode batch at the next step; a finished one frees its slot at once. Free
  slots are taken lowest first, and a decode step covers slots ``0..n-1`` (``n`` = highest
  running slot + 1, rounded up to a captured bucket on CUDA); idle rows (free, or still
  prefilling) are computed but ignored, and write their keys at the scratch position L-1,
  which no request uses.
- **Sampling on the device.** Temperature, top-k, top-p and a seed per request are device
  tensors. Randomness is a counter-based hash of ``(seed, token index, vocab id)`` turned
  into Gumbel noise (Gumbel-max = sampling from the softmax), so a seeded request draws the
  same noise alone or in any batch; unseeded requests get a seed from torch's global RNG.
- **No host sync per token.** Sampled tokens stay on the device as the next step's input;
  a copy to pinned host memory is queued after each step and read ``stream_lag`` steps
  later (at once on CPU). EOS and stop strings are therefore seen a few tokens late: the
  extra tokens are dropped, and ``max_new_tokens`` is exact because the host counts steps.
- **CUDA graphs.** On CUDA, with a top-k router without capacity, every expert resident and
  the grouped-GEMM path available (bf16 on sm90+), the decode step (embedding, attention
  over the slot pool, routing, grouped experts, head, sampling) is captured once per batch
  bucket (1, 2, 4, 8, ... up to ``max_batch_size``) and replayed (``compile_step=True``
  first compiles it with ``torch.compile``: fewer, fused kernels). Elsewhere (CPU, expert
  offload) the same step runs eagerly through the model's own layers, which is the
  reference: tests/inference/test_engine.py checks greedy tokens against step-by-step
  argmax of the full forward.
- **Expert offload in pieces.** With part of the experts resident (an expert cache), the
  decode step is cut at each MoE layer's expert GEMM (:meth:`InferenceEngine._offload_step`):
  attention, routing and the next layer's prediction form one piece, the expert GEMM over
  the resident slots another, and between them the host reads that layer's needed experts
  (one read), copies its misses and issues the next layer's prefetches on a side stream. On
  CUDA every piece is a CUDA graph captured per batch bucket; on CPU the same pieces run as
  plain calls when ``offload_graphs=True`` (tested against step-by-step argmax).

Not thread-safe except :meth:`~InferenceEngine.submit` and :meth:`~InferenceEngine.cancel`;
one thread calls :meth:`~InferenceEngine.step` (or :meth:`~InferenceEngine.start` runs that
loop on a background thread; consumers then read :meth:`Request.events`).

Shape letters: B decode rows, S tokens of a chunk, L slot length, V vocab, D hidden.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InputError
from ..types import RouterType

_M32 = 0xFFFFFFFF
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# requests and their parameters
# ---------------------------------------------------------------------------------------


def validate_sampling(temperature: float, top_p: float, top_k: Optional[int], max_new_tokens: int) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise InputError(f"top_k must be >= 0, got {top_k}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")



@dataclass
class SamplingParams:
    """Per-request decoding parameters (``temperature=0`` is greedy; ``top_k`` None or 0: off)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    seed: Optional[int] = None

    def key(self) -> Tuple[float, float, Optional[int]]:
        return (self.temperature, self.top_p, self.top_k)


@dataclass
class RequestOutput:
    """One event of a request: the tokens (and text) added since the last event."""

    request_id: int
    token_ids: List[int]  #: new tokens (an ending EOS included)
    text: str = ""  #: new text, safe to show (needs a tokenizer; stop strings held back)
    finished: bool = False
    finish_reason: Optional[str] = None  #: "stop" (EOS or a stop string), "length" or "cancelled"
    num_generated: int = 0  #: tokens generated so far (EOS included)


class TextTracker:
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


class Request:
    """A submitted request. Read ``token_ids``, ``text``, ``finished``, ``finish_reason``."""

    def __init__(self, rid: int, prompt: List[int], params: SamplingParams, eos_token_id: Optional[int],
                 stop: Sequence[str], tokenizer: Any, on_event: Optional[Callable[[RequestOutput], None]]) -> None:
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.eos_token_id = eos_token_id
        self.stop = list(stop)
        self.tracker = TextTracker(tokenizer, stop) if tokenizer is not None else None
        self.on_event = on_event
        self.token_ids: List[int] = []  #: generated tokens (an ending EOS included)
        self.finished = False
        self.finish_reason: Optional[str] = None
        self.seed = 0  # the 32-bit sampling seed (set at submit)
        # scheduler state (engine thread only)
        self.slot = -1
        self.prefilled = 0  # prompt tokens in the KV cache
        self.issued = 0  # tokens sampled on the device (ahead of token_ids by the stream lag)
        self.cancel_requested = False
        self._queue: "queue.SimpleQueue[RequestOutput]" = queue.SimpleQueue()
        self._pending_ids: List[int] = []
        self.done = threading.Event()  #: set when the request finishes
        #: time.monotonic() at submit, first token read, and finish (None until then)
        self.submitted_at = time.monotonic()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        """The generated text so far (stop strings cut; needs a tokenizer)."""
        return self.tracker.text if self.tracker is not None else ""

    @property
    def output_ids(self) -> List[int]:
        """Generated tokens without an ending EOS."""
        ids = self.token_ids
        if ids and self.finish_reason == "stop" and ids[-1] == self.eos_token_id:
            return ids[:-1]
        return list(ids)

    def events(self, timeout: Optional[float] = None) -> Iterator[RequestOutput]:
        """Events as a background loop (:meth:`InferenceEngine.start`) produces them."""
        while True:
            ev = self._queue.get(timeout=timeout)
            yield ev
            if ev.finished:
                return

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, prompt_tokens={len(self.prompt)}, generated={self.num_generated}, "
                f"finished={self.finished}, finish_reason={self.finish_reason!r})")


# ---------------------------------------------------------------------------------------
# sampling on the device
# ---------------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_noise(seed_B: torch.Tensor, index_B: torch.Tensor, vocab_V: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[B, V]`` that depends only on (seed, token index, vocab id)."""
    row_B = _fmix32(seed_B ^ _fmix32(index_B & _M32))  # [B]
    h_BV = _fmix32(row_B[:, None] ^ _mul32(vocab_V, 0x9E3779B1)[None, :])
    u_BV = ((h_BV >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(-torch.log(u_BV))


def sample_tokens(
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    top_p_B: torch.Tensor,
    top_k_B: torch.Tensor,
    seed_B: torch.Tensor,
    index_B: torch.Tensor,
    vocab_V: torch.Tensor,
) -> torch.Tensor:
    """One token per row ``[B]``: argmax where ``temperature <= 0``, else a sample of
    ``softmax(logits / T)`` restricted to the top-k and then the top-p nucleus (as
    :func:`~moe_lab.inference.sample_next_token`). No host synchronisation."""
    logits = logits_BV.float()
    greedy_B = temperature_B <= 0
    scaled = logits / torch.where(greedy_B, torch.ones_like(temperature_B), temperature_B)[:, None]
    v = logits.shape[-1]
    sorted_BV, order_BV = scaled.sort(dim=-1, descending=True)
    k_B = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, v))
    remove_BV = vocab_V[None, :] >= k_B[:, None]  # ranks beyond top-k
    sorted_BV = sorted_BV.masked_fill(remove_BV, float("-inf"))
    p_BV = sorted_BV.softmax(dim=-1)
    remove_BV = remove_BV | ((p_BV.cumsum(dim=-1) - p_BV) >= top_p_B[:, None])  # smallest set reaching top_p
    remove_BV = torch.zeros_like(remove_BV).scatter(-1, order_BV, remove_BV)
    noisy = scaled.masked_fill(remove_BV, float("-inf")) + gumbel_noise(seed_B, index_B, vocab_V)
    return torch.where(greedy_B, logits.argmax(dim=-1), noisy.argmax(dim=-1))


# ---------------------------------------------------------------------------------------
# which models can use the captured step
# ---------------------------------------------------------------------------------------


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


def supports_graph_decode(model: nn.Module) -> bool:
    """Top-k routing that never drops in eval mode, and every expert resident on the device."""
    cfg = model.config
    if cfg.router_type != RouterType.TOP_K or cfg.eval_capacity_factor is not None:
        return False
    if getattr(model, "expert_parallel_group", None) is not None:
        return False
    return all(_all_resident(moe.experts) for moe in model.moe_layers)


def _layer_devices(model: nn.Module) -> List[torch.device]:
    """The device of each decoder layer (a ``device_map`` may split the layers)."""
    return [layer.input_norm.weight.device for layer in model.layers]


def _graph_capable(model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or not supports_graph_decode(model):
        return False
    if any(d != device for d in _layer_devices(model)):  # split across devices: eager steps
        return False
    from ..ops.grouped_mm import grouped_mm_supported  # capture needs the sync-free grouped GEMM

    return grouped_mm_supported(device, dtype, model.config.hidden_size, model.config.intermediate_size)


def _offload_capable(model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the offload step can be captured piecewise: top-k routing that never drops,
    one device, and every MoE layer behind a partly resident expert cache (CUDA: with the
    sync-free grouped GEMM)."""
    cfg = model.config
    if cfg.router_type != RouterType.TOP_K or cfg.eval_capacity_factor is not None:
        return False
    if getattr(model, "expert_parallel_group", None) is not None:
        return False
    if any(d != device for d in _layer_devices(model)):
        return False
    caches = [moe.experts for moe in model.moe_layers]
    if not caches or not all(hasattr(c, "forward_resident") and c.cache_size < c.num_experts for c in caches):
        return False
    if device.type != "cuda":
        return True
    from ..ops.grouped_mm import grouped_mm_supported

    return grouped_mm_supported(device, dtype, cfg.hidden_size, cfg.intermediate_size)


class _SlotView:
    """The model's KV-cache protocol over rows ``row0 .. row0+B`` of the slot pool.

    ``update`` writes the new keys/values at each row's positions and returns the first
    ``key_len`` positions of those rows. ``positions`` is an int (a chunk of one row at
    ``positions .. positions+S``) or a device tensor ``[B]`` (one token per row).
    """

    length = 0  # the model's forward reads this; positions here are explicit

    def __init__(self, engine: "InferenceEngine", row0: int, rows: int, positions: Any, key_len: int) -> None:
        self.engine, self.row0, self.rows, self.positions, self.key_len = engine, row0, rows, positions, key_len

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        eng = self.engine
        keys = eng.keys[layer_idx][self.row0 : self.row0 + self.rows]  # [B, Hkv, L, Dh]
        values = eng.values[layer_idx][self.row0 : self.row0 + self.rows]
        if isinstance(self.positions, int):
            s = k.shape[2]
            keys[:, :, self.positions : self.positions + s] = k
            values[:, :, self.positions : self.positions + s] = v
        else:  # one token per row, at its own position (a scatter: capturable)
            idx = self.positions.to(k.device).view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
            keys.scatter_(2, idx, k)
            values.scatter_(2, idx, v)
        return keys[:, :, : self.key_len], values[:, :, : self.key_len]

    def advance(self, n: int) -> None:
        pass


# ---------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------


class InferenceEngine:
    """Continuous-batching decoder over a static KV slot pool (see the module docstring).

    Args:
        model: a :class:`~moe_lab.model.MoEModel` (experts may be managed by a
            :class:`~moe_lab.inference.DynamicExpertLoader`); put in eval mode.
        max_batch_size: KV slots, i.e. requests decoded together.
        max_seq_len: slot length L (prompt + new tokens); default the model's context.
        prefill_chunk_size: prompt tokens processed per step.
        eos_token_id: default end-of-sequence token of submitted requests (None: no EOS).
        tokenizer: decodes text for stop strings and events (optional).
        use_cuda_graph: None = when supported (CUDA, bf16 grouped GEMM, top-k router,
            every expert resident); False = eager.
        stream_lag: decode steps between a token's sampling and its host read on CUDA
            at most (EOS and stop strings are seen up to this late; earlier when the copy is
            done). Default 4 on CUDA, 0 on CPU (a CPU engine with a lag reads exactly that late,
            which is how the tests exercise the trimming).
        compile_step: with CUDA graphs, compile the decode step with ``torch.compile``
            (fewer, fused kernels) before capturing it; costs a compilation per bucket.
        offload_graphs: with part of the experts resident (an expert cache), decode in
            pieces cut at each MoE layer's expert GEMM (see :meth:`_offload_step`): on CUDA the
            pieces are CUDA graphs and only the host work between them (one read per MoE
            layer, copies of misses and prefetches) runs eagerly. None = on CUDA when
            possible; True also runs the pieces eagerly on CPU (the tests); False = the
            model's own layers, eagerly.
    """

    def __init__(
        self,
        model: nn.Module,
        max_batch_size: int = 8,
        max_seq_len: Optional[int] = None,
        prefill_chunk_size: int = 256,
        eos_token_id: Optional[int] = None,
        tokenizer: Any = None,
        use_cuda_graph: Optional[bool] = None,
        stream_lag: Optional[int] = None,
        compile_step: bool = False,
        offload_graphs: Optional[bool] = None,
    ) -> None:
        cfg = model.config
        ctx = cfg.max_position_embeddings
        max_seq_len = ctx if max_seq_len is None else max_seq_len
        for name, v, lo, hi in (("max_batch_size", max_batch_size, 1, None), ("max_seq_len", max_seq_len, 2, ctx),
                                ("prefill_chunk_size", prefill_chunk_size, 1, None)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                raise InputError(f"{name} must be an int in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
        p = next(p for p in model.parameters() if p.device.type != "meta")
        self.model = model.eval()
        self.device, self.dtype = p.device, p.dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.prefill_chunk_size = prefill_chunk_size
        self.eos_token_id = eos_token_id
        self.tokenizer = tokenizer
        capable = _graph_capable(model, self.device, self.dtype)
        if use_cuda_graph and not capable:
            raise InputError("use_cuda_graph=True needs CUDA, bf16 grouped GEMM, a top-k router without capacity "
                             "and every expert resident on the device")
        self.use_cuda_graph = capable if use_cuda_graph is None else bool(use_cuda_graph)
        on_cuda = self.device.type == "cuda"
        offload = not self.use_cuda_graph and _offload_capable(model, self.device, self.dtype)
        if offload_graphs and not offload:
            raise InputError("offload_graphs=True needs a top-k router without capacity, one device and every MoE "
                             "layer behind a partly resident expert cache")
        #: decode in pieces around the expert caches (CUDA graphs on CUDA; see _offload_step)
        self.use_offload_graphs = offload and (on_cuda if offload_graphs is None else bool(offload_graphs))
        self._offload_graphs: Dict[Tuple[int, bool], List[Any]] = {}
        self.stream_lag = (4 if on_cuda else 0) if stream_lag is None else max(0, int(stream_lag))

        n, dev = max_batch_size, self.device
        shape = (n, cfg.kv_heads, max_seq_len, cfg.head_dim)
        # each layer's keys/values live on that layer's device
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=d) for d in _layer_devices(model)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=d) for d in _layer_devices(model)]
        # per-slot device state, read by the (captured) decode step
        self.next_tok = torch.zeros(n, dtype=torch.long, device=dev)  # the step's input token
        # where that token goes; idle rows (free or still prefilling) write at the scratch
        # position L-1, which no request ever uses (its last sampled token is never fed)
        self.scratch = max_seq_len - 1
        self.pos = torch.full((n,), self.scratch, dtype=torch.long, device=dev)
        self.gen_idx = torch.zeros(n, dtype=torch.long, device=dev)  # index of the token being sampled
        self.active = torch.zeros(n, dtype=torch.bool, device=dev)
        self.temperature = torch.zeros(n, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(n, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(n, dtype=torch.long, device=dev)
        self.seed = torch.zeros(n, dtype=torch.long, device=dev)
        self.vocab_ids = torch.arange(cfg.vocab_size, device=dev)
        self.key_positions = torch.arange(max_seq_len, device=dev)
        # host mirrors
        self._pos_host = [self.scratch] * n
        self._slots: List[Optional[Request]] = [None] * n
        self._waiting: Deque[Request] = collections.deque()
        self._prefilling: List[Request] = []
        self._running: List[Request] = []
        self._inflight: Deque[Tuple[torch.Tensor, Any, List[Tuple[int, Request]]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stop_loop = False
        # CUDA graphs: (bucket, sampling) -> graph
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < n} | {n})
        self._graphs: Dict[Tuple[int, bool], Any] = {}
        self._graph_pool: Any = None
        self._step_fn: Callable[..., None] = self._decode_step
        if compile_step and self.use_cuda_graph:
            self._step_fn = torch.compile(self._decode_step, dynamic=False)
        self._experts: Dict[int, nn.Module] = {}
        if self.use_cuda_graph:
            for layer in model.layers:
                if layer.is_moe:
                    self._experts[layer.layer_idx] = resident_experts(layer.mlp.experts)
        self.counters = {"steps": 0, "decode_steps": 0, "decode_rows": 0, "prefill_tokens": 0,
                         "generated_tokens": 0, "requests": 0, "finished": 0, "graph_replays": 0,
                         "offload_steps": 0}

    # ---- submission ----------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: Optional[SamplingParams] = None,
        eos_token_id: Any = "default",
        stop: Sequence[str] = (),
        on_event: Optional[Callable[[RequestOutput], None]] = None,
        detokenize: Optional[bool] = None,
    ) -> Request:
        """Queue a request (thread-safe); it joins the running batch at the next step.

        Args:
            prompt: token ids (at least one, each in the vocabulary).
            params: sampling parameters (default :class:`SamplingParams`).
            eos_token_id: ends the request (the engine's default unless given; None: none).
            stop: stop strings (need the engine's tokenizer); text is cut before them.
            on_event: called with each :class:`RequestOutput` on the engine thread.
            detokenize: track the text (default: when the engine has a tokenizer); False
                for token-level callers such as ``generate()``.
        """
        params = params or SamplingParams()
        validate_sampling(params.temperature, params.top_p, params.top_k, params.max_new_tokens)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise InputError("prompt must have at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InputError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_new_tokens > self.max_seq_len:
            raise InputError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the engine's "
                f"max_seq_len ({self.max_seq_len})"
            )
        if stop and self.tokenizer is None:
            raise InputError("stop strings need an engine built with a tokenizer")
        eos = self.eos_token_id if eos_token_id == "default" else eos_token_id
        if detokenize is None:
            detokenize = self.tokenizer is not None
        if stop and not detokenize:
            raise InputError("stop strings need detokenize=True")
        req = Request(next(self._ids), prompt, params, eos, stop, self.tokenizer if detokenize else None, on_event)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        req.seed = (seed ^ (seed >> 32)) & _M32
        with self._wake:
            self._waiting.append(req)
            self.counters["requests"] += 1
            self._wake.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop ``req`` at the next step (thread-safe); it ends with finish_reason "cancelled"."""
        req.cancel_requested = True
        with self._wake:
            self._wake.notify()

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._inflight)

    @property
    def loop_alive(self) -> bool:
        """Whether the background step loop (:meth:`start`) runs; False before ``start``, after
        :meth:`shutdown`, and after a step raised."""
        return self._thread is not None and self._thread.is_alive()

    # ---- driving -------------------------------------------------------------------------
    def stream(self, req: Request) -> Iterator[RequestOutput]:
        """``req``'s events; drives :meth:`step` itself unless a background loop runs."""
        if self._thread is not None:
            yield from req.events()
            return
        while True:
            while True:
                try:
                    ev = req._queue.get_nowait()
                except queue.Empty:
                    break
                yield ev
                if ev.finished:
                    return
            self.step()

    def advance(self) -> None:
        """One :meth:`step`, or a short wait while a background loop does the stepping."""
        if self._thread is None:
            self.step()
        else:
            time.sleep(0.0005)

    def run_until_done(self, requests: Optional[Sequence[Request]] = None,
                       on_step: Optional[Callable[[], None]] = None) -> None:
        """Step until ``requests`` (default: everything queued) have finished. With a
        background loop running, wait for them instead (``on_step`` every 10 ms)."""
        if self._thread is not None:
            for r in list(requests if requests is not None else []):
                while not r.done.wait(0.01):
                    if on_step is not None:
                        on_step()
            return
        while (any(not r.finished for r in requests) if requests is not None else self.has_work()):
            self.step()
            if on_step is not None:
                on_step()

    def generate(self, prompts: Sequence[Sequence[int]], params: Any = None, **submit_kwargs: Any) -> List[Request]:
        """Run ``prompts`` (one :class:`SamplingParams` for all, or one each) to completion."""
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        reqs = [self.submit(p, sp, **submit_kwargs) for p, sp in zip(prompts, plist)]
        self.run_until_done(reqs)
        return reqs

    def start(self) -> None:
        """Run the step loop on a background thread (consumers use :meth:`Request.events`)."""
        if self._thread is not None:
            return
        self._stop_loop = False
        self._thread = threading.Thread(target=self._loop, name="moe-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the background loop (requests in flight stay where they are)."""
        t = self._thread
        if t is None:
            return
        with self._wake:
            self._stop_loop = True
            self._wake.notify()
        t.join()
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop_loop and not self.has_work():
                    self._wake.wait()
                if self._stop_loop:
                    return
            self.step()

    # ---- one iteration -------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> List[RequestOutput]:
        """One scheduling iteration: admit, prefill a chunk, decode one token per running
        request, then read finished host copies. Returns the events produced."""
        events: List[RequestOutput] = []
        self.counters["steps"] += 1
        self._handle_cancels(events)
        self._admit()
        self._prefill(events)
        self._decode()
        self._drain(events, force=not self._running and not self._prefilling)
        return events

    def _handle_cancels(self, events: List[RequestOutput]) -> None:
        with self._lock:
            cancelled = [r for r in self._waiting if r.cancel_requested]
            for r in cancelled:
                self._waiting.remove(r)
        for r in cancelled + [r for r in self._prefilling + self._running if r.cancel_requested]:
            if not r.finished:
                self._finish(r, "cancelled", events)

    def _admit(self) -> None:
        while True:
            free = next((s for s, r in enumerate(self._slots) if r is None), None)
            if free is None:
                return
            with self._lock:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            req.slot = free
            self._slots[free] = req
            p = req.params
            self.temperature[free] = float(p.temperature)
            self.top_p[free] = float(p.top_p)
            self.top_k[free] = int(p.top_k or 0)
            self.seed[free] = req.seed
            self._prefilling.append(req)

    def _prefill(self, events: List[RequestOutput]) -> None:
        budget = self.prefill_chunk_size
        for req in list(self._prefilling):
            if budget <= 0:
                break
            start = req.prefilled
            chunk = req.prompt[start : start + budget]
            logits_1V = self._forward_chunk(req.slot, chunk, start)
            budget -= len(chunk)
            req.prefilled += len(chunk)
            self.counters["prefill_tokens"] += len(chunk)
            if req.prefilled < len(req.prompt):
                continue
            s = req.slot
            sl = slice(s, s + 1)
            self.gen_idx[sl] = 0
            tok = sample_tokens(logits_1V, self.temperature[sl], self.top_p[sl], self.top_k[sl], self.seed[sl],
                                self.gen_idx[sl], self.vocab_ids)
            self.next_tok[sl] = tok
            self.pos[sl] = len(req.prompt)
            self.gen_idx[sl] = 1
            self._pos_host[s] = len(req.prompt)
            req.issued = 1
            self._prefilling.remove(req)
            self._queue_read(self.next_tok[sl], [(0, req)])
            if req.issued < req.params.max_new_tokens:
                self.active[sl] = True
                self._running.append(req)
            else:
                self._release_slot(req)

    def _decode(self) -> None:
        if not self._running:
            return
        n = max(r.slot for r in self._running) + 1
        if self.use_cuda_graph:
            n = next(b for b in self.buckets if b >= n)
            sampling = any(r.params.temperature > 0 for r in self._running)
            self._replay(n, sampling)
        elif self.use_offload_graphs:
            sampling = any(r.params.temperature > 0 for r in self._running)
            if self.device.type == "cuda":
                n = next(b for b in self.buckets if b >= n)
                self._offload_step(n, self.max_seq_len, sampling)
            else:
                key_len = max(self._pos_host[r.slot] for r in self._running) + 1
                self._offload_step(n, key_len, sampling)
        else:
            # CPU: attend over the positions in use; CUDA: over the whole slot, as the graph
            # does, so that eager and captured steps reduce attention in the same order
            key_len = max(self._pos_host[r.slot] for r in self._running) + 1 if self.device.type != "cuda" \
                else self.max_seq_len
            self._decode_step(n, key_len, sampling=True, graph=False)
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(self._running)
        rows = []
        for r in list(self._running):
            self._pos_host[r.slot] += 1
            r.issued += 1
            rows.append((r.slot, r))
            if r.issued >= r.params.max_new_tokens:  # its last token is on the way: free the slot now
                self._release_slot(r)
        self._queue_read(self.next_tok[:n], rows)

    def _queue_read(self, tokens: torch.Tensor, rows: List[Tuple[int, Request]]) -> None:
        """Copy ``tokens`` to the host without waiting; :meth:`_drain` reads it later."""
        if self.device.type == "cuda":
            buf = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            buf.copy_(tokens, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._inflight.append((buf, ev, rows))
        else:
            self._inflight.append((tokens.clone(), None, rows))

    def _drain(self, events: List[RequestOutput], force: bool) -> None:
        while self._inflight:
            buf, ev, rows = self._inflight[0]
            ready = ev.query() if ev is not None else self.stream_lag == 0
            if not (ready or force or len(self._inflight) > self.stream_lag):
                return
            if ev is not None:
                ev.synchronize()
            self._inflight.popleft()
            toks = buf.tolist()
            for i, req in rows:
                if not req.finished:
                    self._accept(req, int(toks[i]), events)
            for i, req in rows:  # one event per request per read
                if req._pending_ids and not req.finished:
                    self._emit(req, events)

    def _accept(self, req: Request, token: int, events: List[RequestOutput]) -> None:
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        req.token_ids.append(token)
        req._pending_ids.append(token)
        self.counters["generated_tokens"] += 1
        if req.eos_token_id is not None and token == req.eos_token_id:
            self._finish(req, "stop", events)
            return
        if req.tracker is not None:
            req.tracker.add(token)
            if req.tracker.stopped:
                self._finish(req, "stop", events)
                return
        if len(req.token_ids) >= req.params.max_new_tokens:
            self._finish(req, "length", events)

    def _emit(self, req: Request, events: List[RequestOutput], reason: Optional[str] = None) -> None:
        text = req.tracker.pending(final=reason is not None) if req.tracker is not None else ""
        ev = RequestOutput(req.id, req._pending_ids, text, reason is not None, reason, len(req.token_ids))
        req._pending_ids = []
        events.append(ev)
        req._queue.put(ev)
        if req.on_event is not None:
            req.on_event(ev)

    def _finish(self, req: Request, reason: str, events: List[RequestOutput]) -> None:
        req.finished, req.finish_reason = True, reason
        req.finished_at = time.monotonic()
        if req in self._prefilling:
            self._prefilling.remove(req)
        self._release_slot(req)
        self.counters["finished"] += 1
        self._emit(req, events, reason)
        req.done.set()

    def _release_slot(self, req: Request) -> None:
        if req in self._running:
            self._running.remove(req)
        if req.slot >= 0 and self._slots[req.slot] is req:
            self.active[req.slot] = False
            self.pos[req.slot] = self.scratch
            self._pos_host[req.slot] = self.scratch
            self._slots[req.slot] = None
        req.slot = -1

    # ---- the forward passes --------------------------------------------------------------
    def _forward_chunk(self, slot: int, tokens: List[int], start: int) -> torch.Tensor:
        """Prompt tokens ``start .. start+S`` of the request in ``slot``; last logits ``[1, V]``."""
        m = self.model
        s = len(tokens)
        ids_1S = torch.tensor([tokens], dtype=torch.long, device=self.device)
        pos_1S = torch.arange(start, start + s, device=self.device)[None]
        key_len = start + s
        mask_11SK = (self.key_positions[None, :key_len] <= pos_1S[0][:, None])[None, None]  # causal
        view = _SlotView(self, slot, 1, start, key_len)
        x = m.embed_tokens(ids_1S)  # [1, S, D]
        cos, sin = m.rotary(pos_1S)
        for layer in m.layers:
            x, _ = layer(x, cos, sin, mask_11SK, None, view)
        return m.lm_head(m.norm(x[:, -1])).to(self.device)  # [1, V]

    def _decode_step(self, n: int, key_len: int, sampling: bool, graph: bool) -> None:
        """One token for rows ``0..n-1``: reads ``next_tok``/``pos``, writes the sampled
        tokens back to ``next_tok`` (active rows only) and advances ``pos``/``gen_idx``."""
        m = self.model
        tok_B, pos_B, act_B = self.next_tok[:n], self.pos[:n], self.active[:n]
        mask_B11K = (self.key_positions[None, :key_len] <= pos_B[:, None])[:, None, None, :]
        view = _SlotView(self, 0, n, pos_B, key_len)
        x = m.embed_tokens(tok_B)[:, None]  # [B, 1, D]
        cos, sin = m.rotary(pos_B[:, None])
        for layer in m.layers:
            if graph:  # capturable: the lean router and the resident grouped experts
                x = x + layer.attn(layer.input_norm(x), cos, sin, mask_B11K, view)
                h = layer.post_attn_norm(x)
                x = x + (self._graph_moe(layer, h) if layer.is_moe else layer.mlp(h))
            else:  # the model's own layer (expert cache, look-ahead hooks, any router)
                x, _ = layer(x, cos, sin, mask_B11K, act_B[:, None], view)
        self._sample_and_advance(n, m.lm_head(m.norm(x[:, 0])), sampling)

    def _sample_and_advance(self, n: int, logits_BV: torch.Tensor, sampling: bool) -> None:
        """Sample rows ``0..n-1`` into ``next_tok`` (running rows only); advance ``pos``/``gen_idx``."""
        logits_BV = logits_BV.to(self.device)  # no-op unless the head is on another device
        tok_B, pos_B, act_B = self.next_tok[:n], self.pos[:n], self.active[:n]
        if sampling:
            new_B = sample_tokens(logits_BV, self.temperature[:n], self.top_p[:n], self.top_k[:n], self.seed[:n],
                                  self.gen_idx[:n], self.vocab_ids)
        else:
            new_B = logits_BV.argmax(dim=-1)
        step_B = act_B.long()
        tok_B.copy_(torch.where(act_B, new_B, tok_B))
        pos_B.add_(step_B)
        self.gen_idx[:n].add_(step_B)

    def _graph_moe(self, layer: nn.Module, h_BSD: torch.Tensor) -> torch.Tensor:
        moe = layer.mlp
        h_TD = h_BSD.reshape(-1, h_BSD.shape[-1])
        weights_TK, experts_TK = moe.router.route(h_TD)
        x_ND, tokens_per_expert, meta = moe.dispatcher.dispatch(h_TD, experts_TK, weights_TK, all_valid=True)
        out_TD = moe.dispatcher.combine(self._experts[layer.layer_idx].forward_grouped(x_ND, tokens_per_expert), meta)
        if moe.shared_experts is not None:
            out_TD = out_TD + moe.shared_output(h_TD)
        return out_TD.view_as(h_BSD)

    # ---- expert offload: the decode step in pieces around the expert caches ---------------
    def _offload_pieces(self, n: int, key_len: int, sampling: bool) -> List[Callable[[Dict[str, Any]], None]]:
        """The decode step of rows ``0..n-1`` cut at each MoE layer's expert GEMM.

        Returns ``[P_0, X_0, P_1, X_1, ..., P_K]`` for K MoE layers. ``P_k`` finishes MoE layer
        k-1 (combine, shared experts, residual), runs the layers up to MoE layer k's attention,
        routing and dispatch, and the next MoE layer's prediction (its router on this residual
        stream); ``X_k`` runs layer k's experts on their device slots
        (:meth:`CachedExperts.forward_resident`). Each piece reads and writes tensors in the
        dict it is given, and none synchronises with the host, so each can be captured.
        """
        m = self.model
        layers = list(m.layers)
        moe_at = [i for i, layer in enumerate(layers) if layer.is_moe]
        view = _SlotView(self, 0, n, self.pos[:n], key_len)
        num_e = m.config.num_experts

        def attention(st: Dict[str, Any], layer: nn.Module) -> torch.Tensor:
            x = st["x"]
            return x + layer.attn(layer.input_norm(x), st["cos"], st["sin"], st["mask"], view)

        def run_dense(st: Dict[str, Any], lo: int, hi: int) -> None:
            for layer in layers[lo:hi]:
                x = attention(st, layer)
                st["x"] = x + layer.mlp(layer.post_attn_norm(x))

        def finish_moe(st: Dict[str, Any], k: int) -> None:
            moe = layers[moe_at[k]].mlp
            y_TD = moe.dispatcher.combine(st[f"y{k}"], st[f"meta{k}"])
            if moe.shared_experts is not None:
                y_TD = y_TD + moe.shared_output(st[f"h{k}"])
            st["x"] = st[f"res{k}"] + y_TD.view_as(st[f"res{k}"])

        def start_moe(st: Dict[str, Any], k: int) -> None:
            layer = layers[moe_at[k]]
            moe = layer.mlp
            x = attention(st, layer)
            h_TD = layer.post_attn_norm.forward(x).reshape(-1, x.shape[-1])  # .forward: no look-ahead hooks
            weights_TK, experts_TK = moe.router.route(h_TD)
            x_ND, tpe_E, meta = moe.dispatcher.dispatch(h_TD, experts_TK, weights_TK, all_valid=True)
            act_TK = self.active[:n, None].expand_as(experts_TK).reshape(-1).to(torch.float32)
            needed_E = torch.zeros(num_e, dtype=torch.float32, device=x.device)
            needed_E.scatter_add_(0, experts_TK.reshape(-1), act_TK)  # the running rows' experts only
            nxt = getattr(moe.experts, "next_cache", None)
            if nxt is not None:  # the next MoE layer's router on this residual stream
                from .expert_cache import DynamicExpertLoader

                votes_E = DynamicExpertLoader._votes(layers[moe_at[k + 1]], x, self.active[:n, None])
                needed_E = torch.cat([needed_E, votes_E])
            st.update({f"res{k}": x, f"h{k}": h_TD, f"xN{k}": x_ND, f"tpe{k}": tpe_E, f"meta{k}": meta,
                       f"read{k}": needed_E})

        def first(st: Dict[str, Any]) -> None:
            tok_B, pos_B = self.next_tok[:n], self.pos[:n]
            st["mask"] = (self.key_positions[None, :key_len] <= pos_B[:, None])[:, None, None, :]
            st["cos"], st["sin"] = m.rotary(pos_B[:, None])
            st["x"] = m.embed_tokens(tok_B)[:, None]  # [B, 1, D]
            run_dense(st, 0, moe_at[0])
            start_moe(st, 0)

        def experts(k: int) -> Callable[[Dict[str, Any]], None]:
            def piece(st: Dict[str, Any]) -> None:
                st[f"y{k}"] = layers[moe_at[k]].mlp.experts.forward_resident(st[f"xN{k}"], st[f"tpe{k}"])
            return piece

        def middle(k: int) -> Callable[[Dict[str, Any]], None]:
            def piece(st: Dict[str, Any]) -> None:
                finish_moe(st, k - 1)
                run_dense(st, moe_at[k - 1] + 1, moe_at[k])
                start_moe(st, k)
            return piece

        def last(st: Dict[str, Any]) -> None:
            finish_moe(st, len(moe_at) - 1)
            run_dense(st, moe_at[-1] + 1, len(layers))
            self._sample_and_advance(n, m.lm_head(m.norm(st["x"][:, 0])), sampling)

        pieces: List[Callable[[Dict[str, Any]], None]] = [first, experts(0)]
        for k in range(1, len(moe_at)):
            pieces += [middle(k), experts(k)]
        return pieces + [last]

    def _offload_step(self, n: int, key_len: int, sampling: bool) -> None:
        """One decode step through the expert caches, in pieces (:meth:`_offload_pieces`).

        Between ``P_k`` and ``X_k`` the host reads MoE layer k's needed experts with the next
        layer's prediction (one read), loads its misses and issues the next layer's
        prefetches (:meth:`CachedExperts.prepare`); the pieces themselves are CUDA graphs on
        CUDA (captured per batch bucket on first use) and plain calls on CPU. A layer that
        needs more experts than it has slots runs its rounds eagerly instead of ``X_k``.
        """
        key = (n, sampling)
        graphs = None
        if self.device.type == "cuda":
            if key not in self._offload_graphs:
                try:
                    self._capture_offload(n, sampling)
                except RuntimeError as err:  # e.g. a kernel that cannot be captured: decode eagerly from now on
                    logger.warning("offload step capture failed (%s); decoding eagerly", str(err).splitlines()[0])
                    self.use_offload_graphs = False
                    self._decode_step(n, key_len, sampling=True, graph=False)
                    return
            graphs, st = self._offload_graphs[key]
            pieces = None
        else:
            st, pieces = {}, self._offload_pieces(n, key_len, sampling)
        caches = [moe.experts for moe in self.model.moe_layers]
        num_e = caches[0].num_experts

        def run(i: int) -> None:
            if graphs is not None:
                graphs[i].replay()
                self.counters["graph_replays"] += 1
            else:
                pieces[i](st)

        for k, cache in enumerate(caches):
            run(2 * k)
            read = st[f"read{k}"].tolist()  # the host read of this layer: needed experts (+ prediction)
            counts, votes = [int(c) for c in read[:num_e]], (read[num_e:] or None)
            nxt = cache.next_cache if votes is not None else None
            if cache.prepare(counts, votes, nxt):
                run(2 * k + 1)
            else:  # more experts than slots: rounds, eagerly (every routed row, idle ones included)
                y = cache.forward_rounds(st[f"xN{k}"], st[f"tpe{k}"].tolist())
                if graphs is not None:
                    st[f"y{k}"].copy_(y)
                else:
                    st[f"y{k}"] = y
                if nxt is not None:
                    nxt.prefetch_votes(votes)
        run(2 * len(caches))
        self.counters["offload_steps"] += 1

    def _capture_offload(self, n: int, sampling: bool) -> None:
        """Warm up once eagerly on a side stream, then capture every piece (state restored)."""
        state = (self.next_tok, self.pos, self.gen_idx)
        saved = [t.clone() for t in state]
        pieces = self._offload_pieces(n, self.max_seq_len, sampling)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            warm: Dict[str, Any] = {}
            for i, piece in enumerate(pieces):
                if i % 2 and i < len(pieces) - 1:  # the host part, so the experts piece has its slots
                    k = i // 2
                    cache = self.model.moe_layers[k].experts
                    counts = [int(c) for c in warm[f"tpe{k}"].tolist()]
                    if not cache.prepare(counts):
                        warm[f"y{k}"] = cache.forward_rounds(warm[f"xN{k}"], counts)
                        continue
                piece(warm)
            for t, s in zip(state, saved):
                t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        st: Dict[str, Any] = {}
        graphs = []
        for piece in pieces:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._graph_pool):
                piece(st)
            graphs.append(g)
        for t, s in zip(state, saved):
            t.copy_(s)
        self._offload_graphs[(n, sampling)] = [graphs, st]

    # ---- CUDA graphs ---------------------------------------------------------------------
    def _replay(self, n: int, sampling: bool) -> None:
        key = (n, sampling)
        if key not in self._graphs:
            self._capture(n, sampling)
        self._graphs[key].replay()
        self.counters["graph_replays"] += 1

    def _capture(self, n: int, sampling: bool) -> None:
        """Warm up on a side stream, then capture the step (the step's state is restored)."""
        state = (self.next_tok, self.pos, self.gen_idx)
        saved = [t.clone() for t in state]

        def restore() -> None:
            for t, s in zip(state, saved):
                t.copy_(s)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step_fn(n, self.max_seq_len, sampling, True)
                restore()
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._graph_pool):
            self._step_fn(n, self.max_seq_len, sampling, True)
        restore()
        self._graphs[(n, sampling)] = g

    # ---- reporting -----------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Counters: steps, decode_steps, mean_batch (running rows per decode step),
        prefill_tokens, generated_tokens, requests, finished, graph_replays, plus the
        current queue depth, running and prefilling counts and whether graphs are used."""
        c = dict(self.counters)
        c["mean_batch"] = c["decode_rows"] / c["decode_steps"] if c["decode_steps"] else 0.0
        c.update(waiting=len(self._waiting), running=len(self._running), prefilling=len(self._prefilling),
                 cuda_graph=self.use_cuda_graph, offload_graphs=self.use_offload_graphs,
                 max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len)
        return c

    def __repr__(self) -> str:
        return (f"InferenceEngine(slots={self.max_batch_size}, max_seq_len={self.max_seq_len}, device={self.device}, "
                f"dtype={self.dtype}, cuda_graph={self.use_cuda_graph})")


# ---------------------------------------------------------------------------------------
# one engine per model, reused across calls
# ---------------------------------------------------------------------------------------

_ENGINES: "weakref.WeakKeyDictionary[nn.Module, InferenceEngine]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> Tuple[Any, ...]:
    p = model.embed_tokens.weight
    return (p.device, p.dtype, p.data_ptr(), model.lm_head.weight.data_ptr())


def engine_for(model: nn.Module, batch_size: int, seq_len: int, **kwargs: Any) -> InferenceEngine:
    """A cached engine for ``model`` with at least ``batch_size`` slots of ``seq_len``
    positions (rebuilt when the model moved or a larger one is needed)."""
    ctx = model.config.max_position_embeddings
    if seq_len > ctx:
        raise InputError(f"prompt + max_new_tokens = {seq_len} exceeds the context ({ctx})")
    eng = _ENGINES.get(model)
    if (eng is None or eng.has_work() or eng.max_batch_size < batch_size or eng.max_seq_len < seq_len
            or getattr(eng, "_fp", None) != _fingerprint(model) or any(getattr(eng, k) != v for k, v in kwargs.items())):
        old_len = eng.max_seq_len if eng is not None and getattr(eng, "_fp", None) == _fingerprint(model) else 0
        length = min(ctx, max(old_len, -(-seq_len // 64) * 64))
        slots = max(batch_size, eng.max_batch_size if eng is not None else 1)
        eng = InferenceEngine(model, max_batch_size=slots, max_seq_len=length, **kwargs)
        eng._fp = _fingerprint(model)  # type: ignore[attr-defined]
        _ENGINES[model] = eng
    return eng
