"""torchtitan 0.3.0 as a benchmark peer, run in the same process as moe_lab's benchmarks.

    python benchmarks/titan_peer.py --tiny        # smoke test on CPU: both benchmarks once, gloo, world size 1
    python benchmarks/titan_peer.py               # GPU: the API reference's default size and the three MoE shapes

``benchmarks/train_step.py`` and ``benchmarks/moe_layer.py`` import the two functions:

- :func:`bench_torchtitan_train`: torchtitan's own Qwen3-MoE model at moe_lab's shape, set up
  and stepped the way ``torchtitan.trainer.Trainer`` sets it up and steps it on one GPU.
  The objects come from torchtitan's public builders, called in the order of
  ``Trainer.__init__``; the step repeats ``Trainer.train_step`` without its data loader,
  metrics and checkpointing:
  * the model's flavor shape is moe_lab's (vocab, hidden, layers, heads, experts, top-k,
    expert ffn), no shared experts. Qwen3 keeps its own QK-norm (RMSNorm on each head's
    queries and keys: 2 x head_dim weights per layer), fused QKV, RMSNorm eps 1e-6,
    softmax routing with renormalised top-k, and aux-loss-free balancing (an expert
    bias updated in an optimizer pre-step hook);
  * ``parallelize_qwen3``: FSDP2 ``fully_shard`` at degree 1 with
    ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (fp32 master weights,
    no autocast), each TransformerBlock ``compile(fullgraph=True)``;
  * the loss of torchtitan's Qwen3 recipes: ``ChunkedLossWrapper`` (8 chunks of lm_head +
    cross-entropy) around a compiled ``CrossEntropyLoss``;
  * ``default_adamw`` (fused, betas 0.9/0.95, weight decay 0.1) with its warmup scheduler,
    gradient clipping at 1.0 (``dist_utils.clip_grad_norm_``, foreach);
  * with ``cuda_graph=True``: the trainer default, ``wrap_with_cuda_graph`` around the
    forward+backward body (``torchtitan.distributed.cudagraph``);
  * flex attention with the block-causal mask of ``Decoder.get_attention_masks``; each
    sequence is one document (positions 0..S-1).
  Activation checkpointing is off by default (moe_lab's rows do not recompute); pass
  ``activation_checkpoint="selective"`` for the Trainer.Config default (SelectiveAC).
  ``spmd_backend`` is ParallelismConfig's default ``"spmd_types"``; ``"partial_dtensor"``
  is the other single-GPU choice (plain FSDP2 DTensors, no spmd_types annotations).
- :func:`bench_torchtitan_moe`: torchtitan's ``MoE`` module (router, local token dispatcher,
  ``GroupedExperts`` on ``torch._grouped_mm``) built with the Qwen3 settings, bf16
  parameters, fp32 buffers, compiled as ``apply_compile`` compiles a block
  (``fullgraph=True``, ``capture_scalar_outputs``), forward+backward timed with CUDA events.

Shims, each applied only where a feature test says it is needed (the GPU image has torch
2.11; torchtitan 0.3.0 was written against a newer torch). :data:`SHIMS_USED` lists the ones
applied in this process, and each benchmark prints them:

- ``DataParallelMeshDims``: when ``torch.distributed.fsdp`` lacks it, a stand-in dataclass so
  that torchtitan imports. At FSDP degree 1 its ``spmd_types`` path passes none to
  ``fully_shard``.
- ``create_block_mask(separate_full_blocks=...)``: when torch's ``create_block_mask`` lacks
  the argument, torchtitan's compiled mask builder is wrapped to drop it (same mask).
- mask built once: when torchtitan's CUDA-graph input check rejects a block mask rebuilt
  for the next step (tested on two masks built from the same positions), the identical
  mask is built once and passed to every step.
- ``[norm, lm_head]`` as two FSDP2 units (torch < 2.13): torchtitan shards them as one unit
  and its chunked loss reshards it before the decoder backward reaches the norm, which torch
  2.11's FSDP2 does not gather again (:func:`_split_norm_lm_head_unit`). A check after the
  warmup steps asserts that the final norm got a finite, non-zero gradient.
- CPU only (the smoke test): torchtitan picks ``cuda`` as its device type when no
  accelerator is found, so its mesh builder is pointed at ``cpu``; flex attention has no
  backward on CPU, so each layer's inner attention is torchtitan's causal
  ``ScaledDotProductAttention`` (no mask); compile is off and
  ``torch.compiler.set_stance("force_eager")`` keeps torchtitan's class-level compiled
  helpers eager; no CUDA graph.

torchtitan and its training-path packages are benchmark-only (not in pyproject.toml):
``torchtitan==0.3.0 spmd_types==0.2.3 tyro docstring_parser typeguard``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import time
from typing import Any, Callable, Dict, Iterator, List

import torch
import torch.distributed as dist

SHIMS_USED: List[str] = []
IGNORE_INDEX = -100  # torchtitan.components.loss.IGNORE_INDEX
SPMD_BACKENDS = ("spmd_types", "partial_dtensor")  # the first is ParallelismConfig's default


def _shim(name: str) -> None:
    if name not in SHIMS_USED:
        SHIMS_USED.append(name)
        print(f"[titan_peer] shim: {name}", flush=True)


def _apply_import_shims() -> None:
    """Make torchtitan 0.3.0 importable and runnable on this torch (see the module docstring)."""
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "DataParallelMeshDims"):
        @dataclasses.dataclass(frozen=True)
        class DataParallelMeshDims:  # the fields torchtitan's full_dtensor path fills in
            shard: Any = None
            replicate: Any = None

        fsdp.DataParallelMeshDims = DataParallelMeshDims
        _shim("torch.distributed.fsdp.DataParallelMeshDims stand-in")

    from torch.nn.attention.flex_attention import create_block_mask

    import torchtitan.models.common.attention as tt_attention

    if ("separate_full_blocks" not in inspect.signature(create_block_mask).parameters
            and not getattr(tt_attention._compiled_create_block_mask, "titan_peer_shim", False)):
        compiled = tt_attention._compiled_create_block_mask

        def create_block_mask_without_separate_full_blocks(*args: Any, **kwargs: Any):
            kwargs.pop("separate_full_blocks", None)
            return compiled(*args, **kwargs)

        create_block_mask_without_separate_full_blocks.titan_peer_shim = True
        tt_attention._compiled_create_block_mask = create_block_mask_without_separate_full_blocks
        _shim("create_block_mask without separate_full_blocks")


def _import_torchtitan(device: torch.device) -> None:
    _apply_import_shims()
    _split_norm_lm_head_unit()
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.models.qwen3  # noqa: F401  (the model registry imports most of torchtitan)

    if device.type == "cpu" and parallel_dims.device_type != "cpu":
        parallel_dims.device_type = "cpu"  # torchtitan falls back to "cuda" when no accelerator is found
        _shim("CPU: torchtitan mesh device type cpu")


def _eager_on_cpu(device: torch.device) -> contextlib.AbstractContextManager:
    """On CPU (the smoke test), torchtitan's class-level torch.compile'd flex attention and
    mask builder run eagerly; on CUDA nothing changes."""
    if device.type == "cuda":
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def _ensure_process_group(device: torch.device) -> None:
    """A world-size-1 process group (nccl on CUDA, gloo on CPU), as torchtitan's
    ``init_distributed`` would create under torchrun with one rank; reused if one exists."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # as Trainer.__init__ does before init_distributed
    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)


def free_memory(device: torch.device) -> None:
    """Drop the previous row's model and compiled graphs so that peak memory is this row's."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _titan_process_settings() -> Iterator[None]:
    """Process-wide settings torchtitan changes, restored afterwards for the rows that follow:
    its trainer turns automatic GC off; its ``init_distributed`` turns autograd's device
    threads off (the spmd_types mesh stack is thread-local); its ``apply_compile`` sets two
    dynamo flags."""
    import gc

    gc_enabled = gc.isenabled()
    flags = {k: getattr(torch._dynamo.config, k) for k in _DYNAMO_FLAGS}
    try:
        with torch.autograd.set_multithreading_enabled(False):
            yield
    finally:
        for k, v in flags.items():
            setattr(torch._dynamo.config, k, v)
        if gc_enabled:
            gc.enable()


_DYNAMO_FLAGS = ("capture_scalar_outputs", "skip_fwd_side_effects_in_bwd_under_checkpoint")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the training step ------------------------------------------------------------------


def qwen3_moe_model_spec(cfg: Any, seq_len: int, device: torch.device):
    """torchtitan's Qwen3-MoE ``ModelSpec`` at the shape of a moe_lab ``MoEConfig``, built
    with the helpers its own flavors (``30B-A3B``, ``debugmodel_moe``) use."""
    from torchtitan.components.optimizer import register_moe_load_balancing_hook
    from torchtitan.distributed.pipeline_parallel import pipeline_llm
    from torchtitan.models import qwen3 as tq
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.protocols.model_spec import ModelSpec

    if cfg.num_shared_experts:
        raise ValueError(f"num_shared_experts={cfg.num_shared_experts}: the torchtitan peer has no shared experts")
    dim, head_dim = cfg.hidden_size, cfg.head_dim
    model = tq.Qwen3Model.Config(
        vocab_size=cfg.vocab_size,
        dim=dim,
        norm=tq._qwen3_norm(dim),
        enable_weight_tying=cfg.tie_word_embeddings,
        tok_embeddings=Embedding.Config(num_embeddings=cfg.vocab_size, embedding_dim=dim,
                                        param_init=tq._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=cfg.vocab_size, param_init=tq._LINEAR_INIT),
        layers=tq._build_qwen3_moe_layers(
            n_layers=cfg.num_layers, dim=dim, n_heads=cfg.num_attention_heads, n_kv_heads=cfg.kv_heads,
            head_dim=head_dim, moe_hidden_dim=cfg.intermediate_size, num_experts=cfg.num_experts,
            top_k=cfg.experts_per_token, attn_backend="flex", moe_comm_backend="standard",
            rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=max(seq_len, cfg.max_position_embeddings),
                                   theta=cfg.rope_theta),
        ),
    )
    if device.type == "cpu":  # flex attention has no backward on CPU: torchtitan's causal SDPA module instead
        from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

        for _, _, parent, attr in model.traverse(FlexAttention.Config):
            setattr(parent, attr, ScaledDotProductAttention.Config())
        _shim("CPU: causal SDPA attention instead of flex")
    return ModelSpec(name="qwen3", flavor="moe_lab_shape", model=model, parallelize_fn=tq.parallelize_qwen3,
                     pipelining_fn=pipeline_llm, post_optimizer_build_fn=register_moe_load_balancing_hook,
                     state_dict_adapter=None)


def trainer_config(cfg: Any, batch_size: int, seq_len: int, device: torch.device, cuda_graph: bool,
                   steps: int, activation_checkpoint: str = "none", spmd_backend: str = "spmd_types"):
    """The ``torchtitan.trainer.Trainer.Config`` of this benchmark: torchtitan's defaults and
    its Qwen3 recipes' loss/optimizer, compile on (model and loss) on CUDA."""
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.trainer import Trainer

    if activation_checkpoint not in ("none", "selective"):
        raise ValueError(f"activation_checkpoint={activation_checkpoint!r}: expected 'none' or 'selective'")
    if spmd_backend not in SPMD_BACKENDS:
        raise ValueError(f"spmd_backend={spmd_backend!r}: expected one of {SPMD_BACKENDS}")
    on_cuda = device.type == "cuda"
    optimizer = default_adamw(lr=3e-4)  # implementation "fused" (OptimizersContainer.Config's default)
    return Trainer.Config(
        model_spec=qwen3_moe_model_spec(cfg, seq_len, device),
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=cfg.vocab_size)),
        optimizer=optimizer,
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=max(1, steps // 10)),
        training=TrainingConfig(local_batch_size=batch_size, seq_len=seq_len, steps=steps, max_norm=1.0,
                                disable_cuda_graphs=not (cuda_graph and on_cuda)),
        compile=CompileConfig(enable=on_cuda, components=["model", "loss"]),
        parallelism=ParallelismConfig(spmd_backend=spmd_backend),
        activation_checkpoint=SelectiveAC.Config() if activation_checkpoint == "selective" else None,
    )


class TitanTrainStep:
    """torchtitan's model, loss, optimizer and (optionally) CUDA-graphed forward+backward,
    built like ``Trainer.__init__`` builds them on one rank; calling it runs one
    ``Trainer.train_step`` on a fixed batch and returns the loss (a device tensor)."""

    def __init__(self, job: Any, device: torch.device) -> None:
        from torchtitan.config import TORCH_DTYPE_MAP
        from torchtitan.distributed import ParallelDims, utils as dist_utils
        from torchtitan.distributed.cudagraph import wrap_with_cuda_graph
        from torchtitan.tools import utils

        self.job, self.device = job, device
        dist_utils.set_spmd_backend(job.parallelism.spmd_backend)
        self.parallel_dims = ParallelDims.from_config(job.parallelism, dist.get_world_size())
        dist_utils.set_determinism(self.parallel_dims, device, job.debug, distinct_seed_mesh_dims=["pp"])
        spec = job.model_spec
        spec.model.update_from_config(config=job)
        with torch.device("meta"), utils.set_default_dtype(TORCH_DTYPE_MAP[job.training.dtype]):
            model = spec.model.build()
        self.loss_fn = job.loss.build(compile_config=job.compile)
        model = spec.parallelize_fn(model, parallel_dims=self.parallel_dims, training=job.training,
                                    parallelism=job.parallelism, compile_config=job.compile,
                                    ac_config=job.activation_checkpoint, dump_folder=job.dump_folder)
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights(buffer_device=None)
        model.train()
        self.model = model
        self.loss_fn.set_lm_head(model.lm_head)  # ChunkedLossWrapper: lm_head runs inside the loss
        model._skip_lm_head = True
        self.optimizers = job.optimizer.build(model_parts=[model])
        spec.post_optimizer_build_fn(self.optimizers, [model], self.parallel_dims)
        self.lr_schedulers = job.lr_scheduler.build(optimizers=self.optimizers, training_steps=job.training.steps)
        self.train_context = dist_utils.get_spmd_context(parallel_dims=self.parallel_dims, spmd_typechecking=False)
        self.cuda_graph = not job.training.disable_cuda_graphs
        self.fwd_bwd_fn = wrap_with_cuda_graph(self._forward_backward_body) if self.cuda_graph else \
            self._forward_backward_body
        self._clip = dist_utils.clip_grad_norm_
        # the trainer's GC policy: automatic GC off, a collection every gc_freq steps
        self.gc_handler = utils.GarbageCollection(gc_freq=job.training.gc_freq)
        self.step_count = 0

    def describe(self) -> str:
        from torch.distributed.fsdp import FSDPModule

        blocks = list(self.model.layers.values())
        compiled = sum(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
        mp = getattr(self.model, "_get_fsdp_state", None)
        policy = mp()._mp_policy if mp is not None else None
        ac = self.job.activation_checkpoint
        return (f"FSDP2 {isinstance(self.model, FSDPModule)} "
                f"(param {getattr(policy, 'param_dtype', None)}, reduce {getattr(policy, 'reduce_dtype', None)}), "
                f"blocks compiled {compiled}/{len(blocks)} fullgraph, loss compiled "
                f"{hasattr(self.loss_fn.loss_fn.fn, '_torchdynamo_orig_callable')}, "
                f"{type(self.loss_fn).__name__}({self.loss_fn.num_chunks} chunks), "
                f"AdamW {self.job.optimizer.implementation}, clip {self.job.training.max_norm}, "
                f"CUDA graph of fwd+bwd {self.cuda_graph}, AC {type(ac).__qualname__ if ac else 'none'}, "
                f"spmd backend {self.job.parallelism.spmd_backend}")

    def _forward_backward_body(self, inputs: torch.Tensor, labels: torch.Tensor, global_valid_tokens: torch.Tensor,
                               extra_kwargs: Dict[str, Any]) -> torch.Tensor:
        """``Trainer._forward_backward_body``."""
        import spmd_types as spmd

        with self.train_context():
            pred = self.model(inputs, **extra_kwargs)
            loss, _ = self.loss_fn(pred, labels, global_valid_tokens, positions=extra_kwargs["positions"])
            del pred
            with spmd.no_typecheck():
                loss.backward()
        return loss

    def final_norm_grad_norm(self) -> float:
        """The gradient norm of the decoder's final norm weight after a step (0 or NaN would
        mean that the decoder's backward never reached it)."""
        grad = self.model.norm.weight.grad
        if grad is None:
            return float("nan")
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        return float(grad.float().norm())

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor, extra_kwargs: Dict[str, Any]) -> torch.Tensor:
        """``Trainer.train_step`` for one rank, one micro-batch, no pipeline: returns the loss."""
        self.step_count += 1
        self.gc_handler.run(self.step_count)
        self.optimizers.zero_grad(set_to_none=not self.cuda_graph)
        global_valid_tokens = (labels != IGNORE_INDEX).sum()
        loss = self.fwd_bwd_fn(inputs, labels, global_valid_tokens, extra_kwargs).detach().clone()
        self._clip([p for p in self.model.parameters()], self.job.training.max_norm, foreach=True,
                   pp_mesh=None, ep_enabled=False)
        self.optimizers.step()
        self.lr_schedulers.step()
        return loss


def _split_norm_lm_head_unit() -> None:
    """torchtitan shards ``[norm, lm_head]`` as one FSDP2 unit, and ``ChunkedLossWrapper``
    reshards ``lm_head`` after its chunk loop, before the decoder's backward has reached the
    final norm. torch 2.13's FSDP2 gathers the unit again for the norm's backward; torch 2.11's
    does not, and the norm's backward reads the freed bf16 weight ("data is not allocated
    yet"); deferring that reshard instead leaves lm_head's accumulated fp32 gradient in the
    unit's second reduce-scatter ("expects uniform gradient dtype"). On torch < 2.13 the two
    modules are sharded as two units (same policy and reshard setting): the norm's 768 weights
    get their own gather, and lm_head's unit is what the chunked loss manages."""
    import torchtitan.distributed.fsdp as tt_fsdp

    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version >= (2, 13) or getattr(tt_fsdp.fully_shard, "titan_peer_shim", False):
        return
    fully_shard = tt_fsdp.fully_shard

    def fully_shard_norm_and_lm_head_apart(module: Any, **kwargs: Any) -> Any:
        if isinstance(module, (list, tuple)) and len(module) == 2:  # only [model.norm, model.lm_head] (untied)
            for m in module:
                fully_shard(m, **kwargs)
            return module
        return fully_shard(module, **kwargs)

    fully_shard_norm_and_lm_head_apart.titan_peer_shim = True
    tt_fsdp.fully_shard = fully_shard_norm_and_lm_head_apart
    _shim("[norm, lm_head] as two FSDP2 units (torch < 2.13 FSDP2 does not regather the unit for the norm's backward)")


def _attention_kwargs(step: TitanTrainStep, positions_BS: torch.Tensor) -> Callable[[], Dict[str, Any]]:
    """The model kwargs of a step (positions and the flex block mask), as
    ``Trainer.post_dataloading_process`` makes them. Returns a function giving each step's
    kwargs: a fresh mask per step like the trainer, or, under a CUDA graph whose input check
    rejects a rebuilt mask (torch 2.11), the identical mask built once."""
    from torchtitan.models.common.attention import FlexAttention

    if not isinstance(step.job.model_spec.model.first_attention.inner_attention, FlexAttention.Config):
        return lambda: {"positions": positions_BS}  # the CPU smoke test's SDPA takes no mask

    def build() -> Dict[str, Any]:
        return {"positions": positions_BS, "attention_masks": step.model.get_attention_masks(positions=positions_BS)}

    if step.cuda_graph:
        from torchtitan.distributed.cudagraph import CUDAGraphInputSpec

        first = build()
        try:
            CUDAGraphInputSpec(first).flatten(build())
        except ValueError:
            _shim("block mask built once (CUDA graph rejects a rebuilt one)")
            return lambda: first
    return build


def bench_torchtitan_train(cfg: Any, batch: Dict[str, torch.Tensor], device: torch.device, steps: int, warmup: int,
                           cuda_graph: bool, activation_checkpoint: str = "none",
                           spmd_backend: str = "spmd_types") -> Dict[str, Any]:
    """Seconds per training step of torchtitan's Qwen3-MoE with torchtitan's single-GPU
    settings (see the module docstring) on ``batch`` (input_ids/labels [B, S], labels as
    in transformers: the model shifts them). Returns {"seconds", "peak_gib", "loss",
    "settings"}."""
    _import_torchtitan(device)
    free_memory(device)
    _ensure_process_group(device)
    ids_BS = batch["input_ids"]
    b, s = ids_BS.shape
    # torchtitan's data loader yields labels already shifted by one; the last token has no target
    labels_BS = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)], dim=1)
    # one document per sequence, so torchtitan's block-causal mask is the causal mask
    positions_BS = torch.arange(s, device=device).expand(b, s).contiguous()
    with _eager_on_cpu(device), _titan_process_settings():
        torch.manual_seed(0)
        job = trainer_config(cfg, b, s, device, cuda_graph, warmup + steps, activation_checkpoint, spmd_backend)
        step = TitanTrainStep(job, device)
        try:
            return _time_steps(step, ids_BS, labels_BS, _attention_kwargs(step, positions_BS), steps, warmup)
        finally:
            if step.cuda_graph:
                from torchtitan.distributed.cudagraph import cudagraph_teardown

                cudagraph_teardown()  # as Trainer.close does


def _time_steps(step: TitanTrainStep, ids_BS: torch.Tensor, labels_BS: torch.Tensor,
                kwargs: Callable[[], Dict[str, Any]], steps: int, warmup: int) -> Dict[str, Any]:
    """Run ``warmup`` steps, then time ``steps`` steps (as train_step.py's bench_hf does)."""
    device = step.device
    settings = step.describe()
    print(f"[titan_peer] torchtitan train step: {settings}", flush=True)
    if step.cuda_graph and warmup < 2:
        print(f"[titan_peer] warmup {warmup} -> 2: the graph is captured on the second step", flush=True)
        warmup = 2
    for _ in range(warmup):
        step(ids_BS, labels_BS, kwargs())
    _sync(device)
    norm_grad = step.final_norm_grad_norm()
    print(f"[titan_peer] final norm weight grad norm after warmup: {norm_grad:.4g}", flush=True)
    if not math.isfinite(norm_grad) or norm_grad == 0.0:
        raise RuntimeError(f"torchtitan's final norm got no gradient ({norm_grad}): its decoder backward did not run")
    if step.cuda_graph:
        from torchtitan.distributed.cudagraph import _manager

        graphs = sum(w._graph is not None for w in _manager._wrappers)
        print(f"[titan_peer] CUDA graphs of fwd+bwd captured after warmup: {graphs}", flush=True)
        if graphs != 1:
            raise RuntimeError(f"expected torchtitan's one CUDA graph of forward+backward, found {graphs}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(ids_BS, labels_BS, kwargs())
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": dt, "peak_gib": peak, "loss": float(loss), "settings": settings}


# ---- the MoE layer ----------------------------------------------------------------------


def titan_moe_layer(hidden: int, ffn: int, experts: int, top_k: int, device: torch.device, dtype: torch.dtype):
    """torchtitan's ``MoE`` module with the Qwen3-MoE settings (softmax router, renormalised
    top-k, aux-loss-free bias, local token dispatcher, grouped-mm experts), parameters in
    ``dtype`` (as FSDP's mixed precision gives them to the forward), buffers fp32."""
    from torchtitan.models import qwen3 as tq
    from torchtitan.models.common.config_utils import (make_moe_config, make_routed_experts_config,
                                                       make_router_config)

    config = make_moe_config(
        num_experts=experts,
        router=make_router_config(dim=hidden, num_experts=experts, gate_param_init=tq._LINEAR_INIT, top_k=top_k,
                                  score_func="softmax", route_norm=True),
        routed_experts=make_routed_experts_config(dim=hidden, hidden_dim=ffn, num_experts=experts, top_k=top_k,
                                                  param_init=tq._moe_experts_init(1), comm_backend="standard"),
    )
    with torch.device("meta"):
        moe = config.build()
    moe.to_empty(device=device)
    with torch.no_grad():
        moe.init_states(buffer_device=device)
    for p in moe.parameters():
        p.data = p.data.to(dtype)
    return moe.train()


def bench_torchtitan_moe(tokens: int, hidden: int, ffn: int, experts: int, top_k: int, device: torch.device,
                         iters: int, warmup: int) -> Dict[str, Any]:
    """Seconds per forward+backward of torchtitan's MoE layer on a bf16 input [1, tokens,
    hidden] (compiled with fullgraph=True on CUDA, as torchtitan compiles its blocks;
    eager on CPU). Returns {"seconds", "compiled", "tflops"} (active FLOPs 18*T*K*H*F)."""
    _import_torchtitan(device)
    free_memory(device)
    on_cuda = device.type == "cuda"
    with _eager_on_cpu(device), _titan_process_settings():
        torch.manual_seed(0)
        moe = titan_moe_layer(hidden, ffn, experts, top_k, device, torch.bfloat16)
        if on_cuda:
            torch._dynamo.config.capture_scalar_outputs = True  # as torchtitan's apply_compile sets it
            moe.compile(fullgraph=True)
        print(f"[titan_peer] torchtitan MoE ({tokens},{hidden},{ffn},{experts},{top_k}): "
              f"compiled fullgraph {on_cuda}", flush=True)
        x = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        for _ in range(warmup):
            moe(x).backward(grad)
        _sync(device)
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                moe(x).backward(grad)
            end.record()
            torch.cuda.synchronize(device)
            secs = start.elapsed_time(end) / 1e3 / iters
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                moe(x).backward(grad)
            secs = (time.perf_counter() - t0) / iters
    return {"seconds": secs, "compiled": on_cuda, "tflops": 18 * tokens * top_k * hidden * ffn / secs / 1e12}


def main() -> None:
    from moe_lab.config import MoEConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="each benchmark once at a tiny size")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--spmd-backend", choices=SPMD_BACKENDS, default=SPMD_BACKENDS[0])
    p.add_argument("--activation-checkpoint", choices=("none", "selective"), default="none")
    p.add_argument("--skip-moe", action="store_true", help="only the training step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        cfg = MoEConfig(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_experts=4,
                        experts_per_token=2, expert_hidden_size=128, max_position_embeddings=64, dropout=0.0)
        b, s, steps, warmup = 2, 32, 2, 1
        shapes, iters, layer_warmup = [(64, 32, 64, 4, 2)], 1, 1
    else:
        cfg = MoEConfig(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12, num_experts=8,
                        experts_per_token=2, expert_hidden_size=3072, max_position_embeddings=args.seq, dropout=0.0)
        b, s, steps, warmup = args.batch, args.seq, args.steps, args.warmup
        shapes, iters, layer_warmup = [(16384, 768, 3072, 8, 2), (16384, 2048, 5632, 8, 2),
                                       (16384, 2048, 768, 128, 8)], 20, 5
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    import torchtitan

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torchtitan {torchtitan.__version__} on {card}, torch {torch.__version__}, batch {b} x {s}")
    graph_options = [False, True] if device.type == "cuda" else [False]
    for cuda_graph in graph_options:
        r = bench_torchtitan_train(cfg, batch, device, steps, warmup, cuda_graph, args.activation_checkpoint,
                                   args.spmd_backend)
        print(f"train (cuda_graph={cuda_graph}): {b * s / r['seconds']:,.0f} tokens/s, "
              f"{r['seconds'] * 1e3:.1f} ms/step, peak {r['peak_gib']:.1f} GiB, loss {r['loss']:.3f}", flush=True)
        if not math.isfinite(r["loss"]):
            raise SystemExit(f"torchtitan train loss is {r['loss']}")
    for t, h, f, e, k in [] if args.skip_moe else shapes:
        r = bench_torchtitan_moe(t, h, f, e, k, device, iters, layer_warmup)
        print(f"moe layer {(t, h, f, e, k)}: {r['seconds'] * 1e3:.3f} ms, {r['tflops']:.1f} TFLOP/s "
              f"(compiled {r['compiled']})", flush=True)
    print(f"shims used: {SHIMS_USED or 'none'}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
