"""Decode throughput: OptimizedMoEModel vs the plain generate(), at batch 1 and 8.

    python benchmarks/decode.py                                  # CPU, random model of the demo's shape
    python benchmarks/decode.py --checkpoint outputs/demo/model --new-tokens 128
    python benchmarks/decode.py --tiny                           # smoke run
    python benchmarks/decode.py --device cuda                    # the same runners on a GPU

Decode tokens/s = batch x (new tokens - 1) / time between the first and the last generated
step (the prefill and the first token are excluded), greedy, median of ``--repeats`` runs
after a warm-up. Runners (each a function ``(input_ids [B, S], new_tokens) -> iterator of
[B] tokens``, see ``RUNNERS``):

- ``generate()``: MoEModel with every expert resident + :func:`moe_lab.inference.generate`;
- ``optimized, all experts``: OptimizedMoEModel with ``max_experts_in_memory = E``;
- ``optimized, E/2 experts``: half the experts per layer on the device (expert cache active).

Before timing, every runner's greedy tokens are checked against ``generate()``'s.
A transformers runner (the GPU comparison of the performance issue) plugs in as one more
entry of ``RUNNERS``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, List

import torch

Runner = Callable[[torch.Tensor, int], Iterator[torch.Tensor]]


def _make_checkpoint(path: str, tiny: bool) -> str:
    from moe_lab import MoEModel
    from moe_lab.data import ByteTokenizer
    from moe_lab.checkpoint import write_checkpoint

    torch.manual_seed(0)
    tok = ByteTokenizer()
    if tiny:
        kw = dict(hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4, expert_hidden_size=32)
    else:  # the shape `make demo` trains
        kw = dict(hidden_size=128, num_layers=4, num_attention_heads=4, num_experts=8, expert_hidden_size=256)
    model = MoEModel(vocab_size=len(tok), max_position_embeddings=256, dropout=0.0, **kw)
    write_checkpoint(path, model.config, model.state_dict(), tokenizer=tok)
    return path


def build_runners(ckpt: str, device: str) -> Dict[str, Runner]:
    """name -> runner; every runner decodes greedily on ``device``."""
    from moe_lab import OptimizedMoEModel
    from moe_lab.inference import generate
    from moe_lab.checkpoint import load_pretrained_moe

    plain = load_pretrained_moe(ckpt, dropout=0.0).to(device).eval()
    num_experts = plain.config.num_experts
    full = OptimizedMoEModel(ckpt, device_map=device, max_experts_in_memory=num_experts)
    half = OptimizedMoEModel(ckpt, device_map=device, max_experts_in_memory=max(1, num_experts // 2))
    return {
        "generate() (all resident)": lambda ids, n: generate(plain, ids, max_new_tokens=n, temperature=0, streaming=True),
        f"optimized, {num_experts} experts": lambda ids, n: full.generate(ids, max_new_tokens=n, temperature=0, streaming=True),
        f"optimized, {max(1, num_experts // 2)} experts": lambda ids, n: half.generate(
            ids, max_new_tokens=n, temperature=0, streaming=True),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_tokens_per_s(run: Runner, ids: torch.Tensor, new_tokens: int, device: str) -> float:
    it = run(ids, new_tokens)
    next(it)  # prefill + first token
    _sync(device)
    start = time.perf_counter()
    steps = sum(1 for _ in it)
    _sync(device)
    return ids.shape[0] * steps / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory (default: a random model of the demo's shape)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the same runners on a GPU")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny model, few tokens")
    args = p.parse_args()
    if args.tiny:
        args.new_tokens, args.repeats, args.prompt_len = 6, 1, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="decode-bench-")
    ckpt = args.checkpoint or _make_checkpoint(os.path.join(tmp.name, "model"), args.tiny)
    runners = build_runners(ckpt, args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    results: Dict[str, Dict[int, float]] = {name: {} for name in runners}
    for b in batch_sizes:
        ids = torch.randint(0, 256, (b, args.prompt_len), generator=g).to(args.device)
        ref = torch.stack(list(next(iter(runners.values()))(ids, args.new_tokens)), 1)
        for name, run in runners.items():
            got = torch.stack(list(run(ids, args.new_tokens)), 1)  # also the warm-up
            if not torch.equal(got, ref):
                print(f"error: {name} decodes differently from generate() at batch {b}", file=sys.stderr)
                return 1
            rates: List[float] = [decode_tokens_per_s(run, ids, args.new_tokens, args.device) for _ in range(args.repeats)]
            results[name][b] = statistics.median(rates)
    tmp.cleanup()
    dev = args.device if args.device == "cpu" else torch.cuda.get_device_name(0)
    print(f"decode tokens/s, {dev} ({torch.get_num_threads()} threads), greedy, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}, torch {torch.__version__}")
    base = next(iter(results))
    header = "".join(f"{f'batch {b}':>12}{'ratio':>7}" for b in batch_sizes)
    print(f"  {'runner':<28}{header}")
    for name, per_b in results.items():
        cells = "".join(f"{per_b[b]:>12.1f}{per_b[b] / results[base][b]:>7.2f}" for b in batch_sizes)
        print(f"  {name:<28}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
