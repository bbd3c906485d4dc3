"""End-to-end training throughput: moe_lab's trainer step vs transformers Mixtral, one process.

    python benchmarks/train_step.py --tiny          # smoke test on CPU (make test runs it)
    python benchmarks/train_step.py                 # GPU: the API reference's default size

Default size: vocab 50257, hidden 768, 12 layers, 12 heads, 8 experts top-2, ffn 3072,
batch 8 x 1024 tokens, bf16 autocast, fused AdamW, grad clipping. Candidates:
- transformers ``MixtralForCausalLM`` with the ``grouped_mm`` and ``eager`` experts backends;
- torchtitan 0.3.0's Qwen3-MoE at the same shape with its own single-GPU settings, compiled
  and with its default CUDA graph of forward+backward (``--torchtitan``; benchmarks/titan_peer.py);
- moe_lab ``moe_lab.training.train_step`` (the exact step ``moe-lab train`` runs) with the fast
  paths (compiled decoder layers) and without them.
Each reports tokens/s, peak memory, and MFU against the card's dense bf16 peak (989 TFLOP/s
for H100 SXM) with two FLOP counts:
- torchtitan: ``6 * (active params - token embedding) + 12 * layers * heads * head_dim * seq``;
- Megatron-style: ``3 * [sum over layers of 2*(2h^2 + 2h*h_kv) + 4*s*h + 6*h*F*k + 2*h*E] + 3*2*h*V``
  (full, not causal, attention as Megatron counts it).
The fast paths are checked against the eager reference by benchmarks/gpu_check.py, not here.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

import torch

from moe_lab.config import MoEConfig
from moe_lab.model import MoEModel
from moe_lab.training import MoETrainer, train_step
from moe_lab.training.runtime import Runtime

H100_BF16_PEAK = 989e12  # dense bf16 peak of an H100/H200 SXM (the torchtitan MFU convention)


def flops_per_token(cfg: MoEConfig, seq: int) -> Dict[str, float]:
    h, l, v = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    f, k, e = cfg.intermediate_size, cfg.experts_per_token, cfg.num_experts
    h_kv = cfg.kv_heads * cfg.head_dim
    attn_params = 2 * h * h + 2 * h * h_kv
    active_params_no_embed = l * (attn_params + 3 * h * f * k + h * e + 2 * h) + h + h * v
    titan = 6 * active_params_no_embed + 12 * l * cfg.num_attention_heads * cfg.head_dim * seq
    megatron = 3 * (l * (2 * attn_params + 4 * seq * h + 6 * h * f * k + 2 * h * e) + 2 * h * v)
    return {"torchtitan": float(titan), "megatron": float(megatron)}


def make_batch(b: int, s: int, vocab: int, device: torch.device) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.clone().to(device)}


def free_memory(device: torch.device) -> None:
    """Drop what the previous row left (its model, optimizer and compiled graphs), so that
    each row's peak memory is its own."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _OneRankFSDPRuntime(Runtime):
    """The one-process runtime for a model under FSDP2 at degree 1: its gradient norm is a
    DTensor, returned here as a plain tensor."""

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: Any) -> torch.Tensor:
        norm = super().clip_grad_norm(model, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _fsdp_one_rank(model: torch.nn.Module, device: torch.device) -> None:
    """torchtitan's single-GPU precision: FSDP2 at degree 1 with ``MixedPrecisionPolicy`` (bf16
    parameters for compute, fp32 master weights and gradient reduction), per decoder layer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from titan_peer import _ensure_process_group  # benchmarks/ is on sys.path when run as a script

    _ensure_process_group(device)
    mesh = init_device_mesh(device.type, (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def bench_moe_lab(cfg: MoEConfig, batch: Dict[str, torch.Tensor], device: torch.device, fast: bool,
                  steps: int, warmup: int, lm_loss: str = "auto", profile: bool = False,
                  cuda_graphs: bool = False, fsdp_bf16: bool = False, micro_batches: int = 1) -> Dict[str, Any]:
    free_memory(device)
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg)
    # fsdp_bf16: bf16 parameters from FSDP2's policy instead of autocast over fp32 parameters
    trainer = MoETrainer(model, device=str(device), mixed_precision=not fsdp_bf16, fast_paths=fast,
                         progress_bar=False, tensorboard=False, seed=0, lm_loss=lm_loss,
                         runtime=_OneRankFSDPRuntime() if fsdp_bf16 else None, cuda_graphs=cuda_graphs)
    if fsdp_bf16:
        _fsdp_one_rank(trainer.model, device)
    trainer.setup_optimizer(3e-4, 10, 1000)

    # micro_batches > 1: the same rows as gradient accumulation (the step's tokens unchanged)
    micro = [dict(zip(batch, parts)) for parts in zip(*(v.chunk(micro_batches) for v in batch.values()))]

    def step() -> float:  # the public step moe-lab train runs, with the trainer's settings
        return train_step(trainer.model, trainer.optimizer, micro, trainer.runtime, scheduler=trainer.scheduler,
                          settings=trainer.settings).loss_share

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if profile:
        print_top_kernels(step, device)
    return {"seconds": dt, "peak_gib": peak, "loss": losses[-1]}


def print_top_kernels(step: Any, device: torch.device, steps: int = 3, top: int = 18) -> None:
    """``torch.profiler`` over a few steps: the kernels that take the most device time per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    total = sum(getattr(e, key, 0) for e in prof.key_averages())
    print(f"profile: {total / 1e3 / steps:.1f} ms of {'GPU kernels' if device.type == 'cuda' else 'CPU'} per step; top kernels")
    for e in events:
        t = getattr(e, key, 0) / 1e3 / steps
        print(f"  {t:8.2f} ms  {e.count // steps:5d}x  {e.key[:100]}")


def bench_hf(cfg: MoEConfig, batch: Dict[str, torch.Tensor], device: torch.device, impl: str,
             steps: int, warmup: int, compiled: bool = False) -> Dict[str, Any]:
    from transformers import MixtralConfig, MixtralForCausalLM

    free_memory(device)

    hcfg = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
        sliding_window=None, attn_implementation="sdpa",
    )
    hcfg._experts_implementation = impl
    torch.manual_seed(0)
    model = MixtralForCausalLM(hcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    run = torch.compile(model) if compiled else model  # the one line a transformers user adds

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = run(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": dt, "peak_gib": peak, "loss": float(last)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-eager", action="store_true", help="skip moe_lab without fast paths")
    p.add_argument("--profile", action="store_true", help="print the top kernels of moe_lab's fastest step")
    p.add_argument("--torchtitan", action="store_true",
                   help="also time torchtitan 0.3.0's Qwen3-MoE at this shape with its single-GPU settings "
                        "(compiled, then its CUDA-graph default; benchmarks/titan_peer.py)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time training.cuda_graphs (the layers as CUDA graphs), with 1 and 2 micro-batches")
    p.add_argument("--spmd-backend", nargs="+", default=["spmd_types"], choices=["spmd_types", "partial_dtensor"],
                   help="torchtitan's ParallelismConfig.spmd_backend for its rows (each one given is timed)")
    p.add_argument("--fsdp-bf16", action="store_true",
                   help="also time moe_lab with torchtitan's precision: FSDP2 at degree 1, bf16 parameters, fp32 master")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        cfg = MoEConfig(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_experts=4,
                        experts_per_token=2, expert_hidden_size=128, max_position_embeddings=64, dropout=0.0)
        b, s, steps, warmup = 2, 32, 2, 1
    else:
        cfg = MoEConfig(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12, num_experts=8,
                        experts_per_token=2, expert_hidden_size=3072, max_position_embeddings=args.seq, dropout=0.0)
        b, s, steps, warmup = args.batch, args.seq, args.steps, args.warmup
    batch = make_batch(b, s, cfg.vocab_size, device)
    fpt = flops_per_token(cfg, s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Training step on {name}, torch {torch.__version__}, batch {b} x {s}, "
          f"flops/token torchtitan {fpt['torchtitan'] / 1e9:.2f} G, megatron {fpt['megatron'] / 1e9:.2f} G")
    print(f"{'implementation':<46}{'tokens/s':>12}{'vs first':>10}{'MFU titan':>11}{'MFU megatron':>14}{'peak GiB':>10}{'loss':>9}")
    rows: List[Dict[str, Any]] = []

    def add(row_name: str, bench: Any, *a: Any, **kw: Any) -> None:
        """Run one row and print it as it comes (so a timeout keeps the rows run); a row that
        fails prints its error and the others still run."""
        try:
            result = bench(*a, **kw)
        except Exception as error:  # noqa: BLE001 - a benchmark row, reported and skipped
            import traceback

            tb = traceback.format_exception(error)
            print(f"{row_name:<46} FAILED: {type(error).__name__}: {str(error)[:300]}\n"
                  + "".join(tb)[-4000:], flush=True)
            free_memory(device)
            return
        rows.append({"name": row_name, **result})
        tps = b * s / result["seconds"]
        print(f"{row_name:<46}{tps:>12,.0f}{rows[0]['seconds'] / result['seconds']:>9.2f}x"
              f"{100 * tps * fpt['torchtitan'] / H100_BF16_PEAK:>10.1f}%{100 * tps * fpt['megatron'] / H100_BF16_PEAK:>13.1f}%"
              f"{result['peak_gib']:>10.1f}{result['loss']:>9.3f}", flush=True)

    # the order puts the headline rows first, so that a run cut short still has them
    if not args.skip_hf:
        add("transformers Mixtral (grouped_mm)", bench_hf, cfg, batch, device, "grouped_mm", steps, warmup)
    add("moe_lab trainer (fast paths, chunked CE)", bench_moe_lab, cfg, batch, device, True, steps, warmup,
        lm_loss="chunked", profile=args.profile)
    if args.torchtitan:
        from titan_peer import bench_torchtitan_train  # benchmarks/ is on sys.path when run as a script

        for backend in args.spmd_backend:
            if device.type == "cuda":
                add(f"torchtitan 0.3.0 (default: + CUDA graph; {backend})", bench_torchtitan_train, cfg, batch, device,
                    steps, warmup, cuda_graph=True, spmd_backend=backend)
            add(f"torchtitan 0.3.0 (compiled, FSDP2 bf16; {backend})", bench_torchtitan_train, cfg, batch, device,
                steps, warmup, cuda_graph=False, spmd_backend=backend)
    if args.fsdp_bf16:
        add("moe_lab (fast, chunked CE, FSDP2 bf16 params)", bench_moe_lab, cfg, batch, device, True, steps, warmup,
            lm_loss="chunked", fsdp_bf16=True)
    if not args.skip_hf and device.type == "cuda":
        add("transformers Mixtral (grouped_mm, compiled)", bench_hf, cfg, batch, device, "grouped_mm", steps, warmup,
            compiled=True)
    add("moe_lab trainer (fast paths, logits CE)", bench_moe_lab, cfg, batch, device, True, steps, warmup,
        lm_loss="logits")
    if not args.skip_eager:
        add("moe_lab trainer (eager)", bench_moe_lab, cfg, batch, device, False, steps, warmup)
    if args.cuda_graphs and device.type == "cuda":
        add("moe_lab (fast paths, chunked CE, cuda_graphs)", bench_moe_lab, cfg, batch, device, True, steps,
            warmup, lm_loss="chunked", cuda_graphs=True, profile=args.profile)
        add("moe_lab (chunked CE, cuda_graphs, 2 micro-batches)", bench_moe_lab, cfg, batch, device, True, steps,
            warmup, lm_loss="chunked", cuda_graphs=True, micro_batches=2)
    if len(rows) < 1 + (not args.skip_hf):
        raise SystemExit("a headline row failed (see above)")

if __name__ == "__main__":
    main()
