"""Expert-parallel scaling through Ray Train: tokens/s per GPU at EP 1, 2, 4 (weak scaling).

    python benchmarks/ep_scaling.py --ep 1 2 4          # on a machine with >= 4 GPUs
    python benchmarks/ep_scaling.py --tiny --ep 1 2     # CPU smoke test (gloo)

Each run is a real DistributedMoETrainer job on a local Ray cluster: ``EP`` workers, one GPU
each, NCCL, experts sharded ``num_experts / EP`` per GPU, tokens moved by all-to-all. The
per-GPU batch is fixed (8 x 1024 tokens), so perfect scaling keeps tokens/s/GPU constant.
Model: hidden 768, 12 layers, 8 experts top-2, ffn 3072, vocab 50257, bf16 autocast.
Reported: tokens/s/GPU over the steps after warm-up, and its ratio to EP 1 (goal >= 85% at EP 4).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Dict, List

import torch


def run(ep: int, tiny: bool, steps: int, fast: bool) -> Dict[str, float]:
    from datasets import Dataset

    from moe_lab.model import MoEModel
    from moe_lab.orchestration.train import DistributedMoETrainer

    use_gpu = torch.cuda.is_available() and not tiny
    if tiny:
        kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_experts=4,
                  expert_hidden_size=128, max_position_embeddings=64)
        seq, per_rank = 32, 2
    else:
        kw = dict(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12, num_experts=8,
                  expert_hidden_size=3072, max_position_embeddings=1024)
        seq, per_rank = 1024, 8
    torch.manual_seed(0)
    model = MoEModel(dropout=0.0, **kw)
    g = torch.Generator().manual_seed(0)
    rows = per_rank * ep * (steps + 1)
    data = Dataset.from_dict({"input_ids": torch.randint(0, kw["vocab_size"], (rows, seq), generator=g).tolist()})
    logging_steps = max(1, steps // 4)
    trainer = DistributedMoETrainer(
        model, world_size=ep, expert_parallel_size=ep, use_gpu=use_gpu, mixed_precision=not tiny,
        fast_paths=fast, progress_bar=False, tensorboard=False, logging_steps=logging_steps, seed=0,
        resources_per_worker={"CPU": 1},
    )
    with tempfile.TemporaryDirectory() as out:
        res = trainer.train(data, batch_size=per_rank * ep, learning_rate=3e-4, warmup_steps=2, max_steps=steps,
                            eval_steps=10**6, save_steps=10**6, output_dir=out)
    tps = res.history["tokens_per_s"]
    steady = tps[1:] or tps  # the first window holds start-up (and compilation)
    return {"ep": ep, "tokens_per_s": sum(steady) / len(steady), "per_gpu": sum(steady) / len(steady) / ep}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--fast-paths", action=argparse.BooleanOptionalAction, default=False)
    args = p.parse_args()
    from moe_lab.orchestration.cluster import init_ray, shutdown_ray

    n_gpu = torch.cuda.device_count() if not args.tiny else 0
    eps = [e for e in args.ep if args.tiny or e <= n_gpu]
    init_ray(num_gpus=n_gpu or None)
    results: List[Dict[str, float]] = []
    try:
        for ep in eps:
            results.append(run(ep, args.tiny, 3 if args.tiny else args.steps, args.fast_paths))
    finally:
        shutdown_ray()
    dev = torch.cuda.get_device_name(0) if n_gpu else "CPU (gloo)"
    print(f"EP scaling on {dev} x {max(eps)}, torch {torch.__version__}, weak scaling, fast paths {args.fast_paths}")
    print(f"{'EP':>4}{'tokens/s':>14}{'tokens/s/GPU':>15}{'vs EP 1':>10}")
    base = results[0]["per_gpu"]
    for r in results:
        print(f"{r['ep']:>4}{r['tokens_per_s']:>14,.0f}{r['per_gpu']:>15,.0f}{r['per_gpu'] / base:>9.0%}")
    skipped = sorted(set(args.ep) - set(eps))
    if skipped:
        print(f"skipped EP {skipped}: only {n_gpu} GPU(s)")


if __name__ == "__main__":
    main()
