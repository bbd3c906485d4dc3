"""Loss parity of the training fast paths: each path's loss curve over N steps of the built-in
corpus against the eager reference, in one process, from the same initial weights and batches.

    python benchmarks/loss_parity.py                 # GPU: default size (byte vocabulary), 200 steps
    python benchmarks/loss_parity.py --tiny          # CPU smoke test (make test runs it)

Runs (same seed, same weights, same batches, bf16 autocast unless noted):
- ``eager fp32``: no autocast, no fast paths: what bf16 is measured against;
- ``eager bf16``: the reference every fast path is compared with;
- ``fast paths, logits CE``: compiled decoder layers + compiled cross-entropy (CUDA);
- ``fast paths, chunked CE``: the same with the chunked linear + cross-entropy (the default
  of ``moe-lab train`` on CUDA);
- ``cuda_graphs, chunked CE`` and ``cuda_graphs, 2 micro-batches``: ``training.cuda_graphs``
  (the layers replay as CUDA graphs), with one micro-batch per step and with the same rows as
  two accumulated micro-batches (CUDA);
- ``chunked CE, eager layers``: the chunked loss alone (the one fast path that also runs on CPU).

"Within bf16 noise" is decided per window of ``--window`` steps: the mean loss of a window
of a fast path may differ from the eager bf16 window by at most
``tolerance = max(noise_factor × noise, floor)``, where ``noise`` is the largest window
difference of eager bf16 to eager fp32, or to eager bf16 started from the same weights
perturbed by about one bf16 rounding step (how far rounding alone moves the curve)
and ``floor`` (0.01 nats) keeps a tiny noise from failing paths on exact-arithmetic
differences. The first step's loss must also agree to 1%, since before any update
every path computes the same function of the same weights. Prints PASS/FAIL per path and
exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List

import torch

from moe_lab.config import MoEConfig
from moe_lab.data import ByteTokenizer, build_corpus, collate_moe_batch, prepare_moe_dataset
from moe_lab.model import MoEModel
from moe_lab.training import MoETrainer, train_step


def make_batches(seq: int, batch: int, steps: int, size_bytes: int) -> List[Dict[str, torch.Tensor]]:
    """``steps`` batches of ``batch`` packed rows of the built-in corpus (cycled when short)."""
    tok = ByteTokenizer()
    corpus = build_corpus(size_bytes=size_bytes, seed=0)
    packed = prepare_moe_dataset(corpus, tok, max_length=seq, num_proc=1)
    rows = [{"input_ids": r["input_ids"]} for r in packed]
    out = []
    for s in range(steps):
        chunk = [rows[(s * batch + i) % len(rows)] for i in range(batch)]
        b = collate_moe_batch(chunk, pad_token_id=tok.pad_token_id or 0)
        out.append({k: b[k] for k in ("input_ids", "attention_mask", "labels")})
    return out


def run_curve(cfg: MoEConfig, init: Dict[str, torch.Tensor], batches: List[Dict[str, torch.Tensor]],
              device: torch.device, bf16: bool, fast: bool, lm_loss: str, cuda_graphs: bool = False,
              micro_batches: int = 1, lr: float = 3e-4) -> List[float]:
    """The step losses of one run; ``micro_batches`` > 1 splits each batch for accumulation
    (the same step, the loss summed over the micro-batches)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MoEModel.from_config(cfg)
    model.load_state_dict(init)
    trainer = MoETrainer(model, device=str(device), mixed_precision=bf16, fast_paths=fast, progress_bar=False,
                         tensorboard=False, seed=0, lm_loss=lm_loss, cuda_graphs=cuda_graphs)
    trainer.setup_optimizer(lr, 10, len(batches))
    losses = []
    for b in batches:
        parts = [{k: v.to(device) for k, v in zip(b, chunk)} for chunk in zip(*(v.chunk(micro_batches) for v in b.values()))]
        losses.append(train_step(trainer.model, trainer.optimizer, parts, trainer.runtime,
                                 scheduler=trainer.scheduler, settings=trainer.settings).loss_share)
    return losses


def window_means(xs: List[float], w: int) -> List[float]:
    return [sum(xs[i:i + w]) / len(xs[i:i + w]) for i in range(0, len(xs), w)]


def max_window_gap(a: List[float], b: List[float], w: int) -> float:
    return max(abs(x - y) for x, y in zip(window_means(a, w), window_means(b, w)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, few steps")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--noise-factor", type=float, default=1.5)
    p.add_argument("--floor", type=float, default=0.01)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    vocab = ByteTokenizer().vocab_size
    if args.tiny:
        cfg = MoEConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_attention_heads=4, num_experts=4,
                        experts_per_token=2, expert_hidden_size=128, max_position_embeddings=64, dropout=0.0)
        args.steps, args.batch, args.seq, args.window, size = 6, 2, 64, 3, 20_000
    else:
        cfg = MoEConfig(vocab_size=vocab, hidden_size=768, num_layers=12, num_attention_heads=12, num_experts=8,
                        experts_per_token=2, expert_hidden_size=3072, max_position_embeddings=args.seq, dropout=0.0)
        size = 2_500_000
    batches = make_batches(args.seq, args.batch, args.steps, size)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in MoEModel.from_config(cfg).state_dict().items()}
    # the same weights moved by about one bf16 rounding step (relative 2^-9, random sign):
    # how far a bf16-sized perturbation alone moves the curve
    g = torch.Generator().manual_seed(1)
    perturbed = {k: v * (1 + 2.0 ** -9 * (torch.randint(0, 2, v.shape, generator=g) * 2 - 1)) if v.is_floating_point()
                 else v for k, v in init.items()}
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"Loss parity on {name}, torch {torch.__version__}: {args.steps} steps, batch {args.batch} x {args.seq}, "
          f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.experts_per_token}, "
          f"window {args.window}", flush=True)
    runs: Dict[str, Any] = {}
    # name: (bf16 autocast, fast paths, lm_loss, cuda_graphs, micro-batches per step)
    plan = {"eager fp32": (False, False, "logits", False, 1), "eager bf16": (True, False, "logits", False, 1),
            "eager bf16, perturbed": (True, False, "logits", False, 1)}
    if cuda:
        plan["fast paths, logits CE"] = (True, True, "logits", False, 1)
        plan["fast paths, chunked CE"] = (True, True, "chunked", False, 1)
        plan["cuda_graphs, chunked CE"] = (True, True, "chunked", True, 1)
        plan["cuda_graphs, 2 micro-batches"] = (True, True, "chunked", True, 2)
    plan["chunked CE, eager layers"] = (True, False, "chunked", False, 1)
    for run_name, (bf16, fast, lm_loss, mode, micro) in plan.items():
        runs[run_name] = run_curve(cfg, init if run_name != "eager bf16, perturbed" else perturbed, batches, device,
                                   bf16, fast, lm_loss, mode, micro, args.lr)
        c = runs[run_name]
        print(f"  {run_name:<34} first {c[0]:.4f}  window means {[round(x, 3) for x in window_means(c, args.window)]}",
              flush=True)
    ref = runs["eager bf16"]
    noise = max(max_window_gap(ref, runs["eager fp32"], args.window),
                max_window_gap(ref, runs["eager bf16, perturbed"], args.window))
    tol = max(args.noise_factor * noise, args.floor)
    print(f"bf16 noise (largest window gap of eager bf16 to eager fp32 or to eager bf16 from perturbed weights): "
          f"{noise:.4f}; tolerance {tol:.4f}")
    print(f"{'path':<28}{'first-step rel':>16}{'max window gap':>16}  verdict")
    failed = False
    for run_name, curve in runs.items():
        if run_name in ("eager bf16", "eager fp32", "eager bf16, perturbed"):
            continue
        first_rel = abs(curve[0] - ref[0]) / abs(ref[0])
        gap = max_window_gap(curve, ref, args.window)
        ok = first_rel <= 1e-2 and gap <= tol
        failed |= not ok
        print(f"{run_name:<28}{first_rel:>16.2e}{gap:>16.4f}  {'PASS' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
