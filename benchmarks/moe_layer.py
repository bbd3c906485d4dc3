"""MoE layer forward+backward, side by side in one process: moe_lab vs transformers vs dense.

    python benchmarks/moe_layer.py                           # CPU: eager loop vs grouped path
    python benchmarks/moe_layer.py --tiny                    # smoke test (make test runs it)
    python benchmarks/moe_layer.py --gpu-suite               # H100: the three issue shapes, bf16

GPU suite, for each shape (tokens T, hidden H, ffn F, experts E, top-k K), in active-FLOP
TFLOP/s (forward+backward = 18·T·K·H·F):
- dense: a SwiGLU MLP with intermediate K·F (the same active FLOPs), the practical ceiling;
- transformers ``MixtralSparseMoeBlock`` with the ``eager`` and ``grouped_mm`` experts backends;
- moe_lab ``MoELayer``: eager reference loop, grouped path, grouped path under torch.compile.
Every fast path is first checked against moe_lab's eager reference on the same inputs.
Also prints, with ``--profile``, the top CUDA kernels of the compiled moe_lab layer.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from moe_lab.config import MoEConfig
from moe_lab.model.moe_layer import MoELayer

GPU_SHAPES = [  # (tokens, hidden, ffn, experts, top_k)
    (16384, 768, 3072, 8, 2),
    (16384, 2048, 5632, 8, 2),
    (16384, 2048, 768, 128, 8),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int, warmup: int) -> float:
    """Seconds per forward+backward (CUDA events on GPU)."""
    grad = torch.randn_like(x)
    for _ in range(warmup):
        fn(x).backward(grad)
    _sync(x.device)
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(x).backward(grad)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x).backward(grad)
    return (time.perf_counter() - t0) / iters


class DenseSwiGLU(torch.nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(hidden, 2 * inner, bias=False)
        self.down = torch.nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def moe_lab_layer(h: int, f: int, e: int, k: int, device: torch.device, dtype: torch.dtype) -> MoELayer:
    cfg = MoEConfig(hidden_size=h, num_attention_heads=max(1, h // 64), num_layers=1, num_experts=e,
                    experts_per_token=k, expert_hidden_size=f, vocab_size=8)
    torch.manual_seed(0)
    return MoELayer(cfg).to(device=device, dtype=dtype)


def hf_block(h: int, f: int, e: int, k: int, impl: str, device: torch.device, dtype: torch.dtype, src: MoELayer):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=h, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    blk = MixtralSparseMoeBlock(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():  # same weights as moe_lab's layer: same routing, same function
        blk.gate.weight.copy_(src.router.gate.weight)
        blk.experts.gate_up_proj.copy_(src.experts.w_in)
        blk.experts.down_proj.copy_(src.experts.w_out)
    return blk


def _check(shape: Tuple[int, ...], name: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    """Print one ``check ...`` line (a fixed format: tests parse it) and return the relative error."""
    max_abs = (out - ref).abs().max().item()
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"check {shape} {name} vs moe_lab eager: max abs err = {max_abs:.1e}, rel err = {rel:.1e}")
    return rel


def run_shape(shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype, iters: int, warmup: int,
              compare_hf: bool, profile: bool, use_compile: bool, torchtitan: bool = False) -> List[Dict[str, object]]:
    t, h, f, e, k = shape
    flops = 18 * t * k * h * f
    x = torch.randn(1, t, h, device=device, dtype=dtype, requires_grad=True)
    layer = moe_lab_layer(h, f, e, k, device, dtype)
    rows: List[Dict[str, object]] = []

    def moe(backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(inp: torch.Tensor) -> torch.Tensor:
            layer.experts.backend = backend
            return layer(inp)[0]
        return fn

    # correctness of the fast paths against the eager reference
    with torch.no_grad():
        ref = moe("eager")(x).float()
        fast = moe("grouped")(x).float()
    err = _check(shape, "moe_lab grouped", fast, ref)
    compiled = err_c = None
    if use_compile:
        compiled = torch.compile(moe("grouped"))
        with torch.no_grad():
            err_c = _check(shape, "moe_lab grouped + compile", compiled(x).float(), ref)
    dense = DenseSwiGLU(h, k * f).to(device=device, dtype=dtype)
    candidates = [("dense SwiGLU (equal FLOPs)", dense, None)]
    if compare_hf:
        candidates += [
            ("transformers eager", hf_block(h, f, e, k, "eager", device, dtype, layer), None),
            ("transformers grouped_mm", hf_block(h, f, e, k, "grouped_mm", device, dtype, layer), None),
        ]
    candidates += [
        ("moe_lab eager (reference)", moe("eager"), None),
        ("moe_lab grouped", moe("grouped"), err),
    ]
    if compiled is not None:
        candidates.append(("moe_lab grouped + compile", compiled, err_c))
    dense_s = None
    for name, fn, rel_err in candidates:
        if "eager" in name and device.type == "cuda" and e >= 64 and "reference" in name:
            it = max(2, iters // 4)  # the Python loop over 128 experts is slow; fewer iterations
        else:
            it = iters
        secs = time_fwd_bwd(fn, x, it, warmup)
        if dense_s is None:
            dense_s = secs
        rows.append({"shape": shape, "name": name, "ms": secs * 1e3, "tflops": flops / secs / 1e12,
                     "vs_dense": dense_s / secs, "rel_err": rel_err})
    if torchtitan:  # torchtitan's MoE module, compiled as torchtitan compiles it (benchmarks/titan_peer.py)
        from titan_peer import bench_torchtitan_moe

        try:
            secs = bench_torchtitan_moe(t, h, f, e, k, device, iters, warmup)["seconds"]
        except Exception as error:  # noqa: BLE001 - the peer's row is reported as failed, the table goes on
            import traceback

            print(f"torchtitan 0.3.0 MoE at {shape} FAILED: {type(error).__name__}: {str(error)[:300]}\n"
                  + "".join(traceback.format_exception(error))[-3000:], flush=True)
        else:
            rows.append({"shape": shape, "name": "torchtitan 0.3.0 MoE", "ms": secs * 1e3, "tflops": flops / secs / 1e12,
                         "vs_dense": dense_s / secs, "rel_err": None})
    if profile and device.type == "cuda" and compiled is not None:
        from torch.profiler import ProfilerActivity, profile as prof

        grad = torch.randn_like(x)
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                compiled(x).backward(grad)
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny shape, 1 iteration")
    p.add_argument("--gpu-suite", action="store_true", help="the issue's three shapes on CUDA, bf16, vs transformers")
    p.add_argument("--compare-hf", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the torch.compile'd layer (default: on CUDA only)")
    p.add_argument("--torchtitan", action="store_true", help="also time torchtitan 0.3.0's MoE module")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.gpu_suite:
        shapes, dtype, compare_hf = GPU_SHAPES, torch.bfloat16, True
        iters, warmup = 20, 5
    else:
        shapes = [(64, 32, 64, 4, 2)] if args.tiny else [(args.tokens, args.hidden, args.ffn, args.experts, args.top_k)]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        compare_hf, iters, warmup = args.compare_hf, (1 if args.tiny else args.iters), (1 if args.tiny else args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"MoE layer fwd+bwd on {name}, {dtype}, torch {torch.__version__}")
    print(f"{'shape (T,H,F,E,K)':<28}{'implementation':<30}{'ms':>9}{'TFLOP/s':>10}{'vs dense':>10}{'rel err':>10}")
    for shape in shapes:
        use_compile = args.compile if args.compile is not None else device.type == "cuda"
        for r in run_shape(shape, device, dtype, iters, warmup, compare_hf, args.profile, use_compile, args.torchtitan):
            err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
            print(f"{str(r['shape']):<28}{r['name']:<30}{r['ms']:>9.3f}{r['tflops']:>10.1f}{r['vs_dense']:>9.0%}{err:>10}")


if __name__ == "__main__":
    main()
