"""MoE layer throughput: eager expert loop vs the grouped path, side by side in one process.

    python benchmarks/moe_layer.py                      # CPU, small shape
    python benchmarks/moe_layer.py --tokens 4096 --hidden 256 --ffn 1024 --experts 8 --top-k 2

Prints tokens/s of forward+backward for each backend and the ratio grouped/eager. Both
paths are checked against each other before timing. The GPU comparison against
transformers and an equal-FLOPs dense MLP lives in the performance benchmarks.
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_lab.config import MoEConfig
from moe_lab.model.moe_layer import MoELayer


def bench(layer: MoELayer, x: torch.Tensor, backend: str, iters: int, warmup: int) -> float:
    layer.experts.backend = backend
    for _ in range(warmup):
        y, _ = layer(x)
        y.float().square().mean().backward()
    start = time.perf_counter()
    for _ in range(iters):
        y, _ = layer(x)
        y.float().square().mean().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return x.shape[0] * x.shape[1] * iters / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=args.hidden, num_attention_heads=max(1, args.hidden // 64), num_layers=1,
                    num_experts=args.experts, experts_per_token=args.top_k, expert_hidden_size=args.ffn)
    layer = MoELayer(cfg).to(args.device)
    x = torch.randn(1, args.tokens, args.hidden, device=args.device, requires_grad=True)
    # correctness first: the fast path must match the reference
    layer.experts.backend = "eager"
    ref, _ = layer(x)
    layer.experts.backend = "grouped"
    fast, _ = layer(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    rows = [(b, bench(layer, x, b, args.iters, args.warmup)) for b in ("eager", "grouped")]
    print(f"MoE layer fwd+bwd, {args.device}, tokens={args.tokens} hidden={args.hidden} ffn={args.ffn} "
          f"experts={args.experts} top_k={args.top_k}, torch {torch.__version__}")
    print(f"{'backend':<10}{'tokens/s':>14}")
    for name, tps in rows:
        print(f"{name:<10}{tps:>14,.0f}")
    print(f"grouped / eager = {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
