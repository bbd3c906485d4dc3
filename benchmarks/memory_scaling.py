"""Memory per rank under FSDP2: parameters, gradients and AdamW state for 1, 2 and 4 ranks,
and (on a GPU) peak memory and the largest model one GPU trains.

    python benchmarks/memory_scaling.py                  # CPU: 1, 2, 4 gloo ranks (spawned), table + PASS/FAIL
    python benchmarks/memory_scaling.py --tiny --ranks 1 2 --json out.json   # the smoke test's run
    python benchmarks/memory_scaling.py --gpu            # one GPU: peak memory at the default size, then
                                                         # the largest model without FSDP and with FSDP + AC

CPU mode. Every rank builds the same model, shards it with ``parallel_runtime(model,
dims=ParallelDims(dp_shard=N))`` (FSDP2 per decoder layer, the experts a nested unit; N = 1 is
one process without FSDP), takes one AdamW step with ``moe_lab.training.step.train_step`` (so
the optimizer state exists), then one more forward/backward (so the gradients exist), and counts
the bytes it holds: the storages of its parameters, gradients, optimizer state and buffers
(local shards of DTensors, each storage once). The target for N ranks is

    per-rank bytes <= 1.15 * (single-process bytes / N) + remainder(N)

where single-process bytes are the parameters, gradients and AdamW state of one process, and
the remainder is what FSDP does not divide by N:
- the buffers (replicated on every rank: RoPE's ``inv_freq``, the routers' ``expert_bias``);
- AdamW's ``step`` counter, one float32 scalar per parameter tensor, on every rank;
- FSDP's padding: each parameter's dim 0 is padded to a multiple of N, so a rank holds
  ``ceil(d0 / N)`` rows of the parameter, its gradient and both Adam moments (4 copies).
The per-rank figure is the largest over the ranks. Each N prints PASS or FAIL.

GPU mode (``--gpu``, one GPU, bf16). At the API reference's default size (vocab 50257, hidden
768, 12 layers, 12 heads, 8 experts top-2, ffn 3072, batch 8 x 1024) it prints the peak memory
(``torch.cuda.max_memory_allocated`` over building the model and two train steps) of: the
trainer as ``moe-lab train`` runs it (fp32 weights, bf16 autocast, fast paths), the same with
activation checkpointing, and FSDP2 at degree 1 with ``MixedPrecisionPolicy`` (bf16 compute,
fp32 master weights and reduction) plus activation checkpointing. Then it searches (doubling,
then bisection, eager) for the largest ``num_layers`` (``--grow hidden``: hidden size, in
steps of two 64-wide heads, ffn = 4 x hidden) that trains one step without FSDP, and with
FSDP(1 rank, mixed precision) + AC full; ``--grow seq`` searches instead for the longest
sequence (in units of 1,024 tokens) that trains one step at batch 1 with the default model and
the chunked LM loss. Multi-GPU runs belong to the multi-GPU benchmarks.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lab.config import MoEConfig
from moe_lab.model import MoEModel
from moe_lab.training import MoETrainer
from moe_lab.training.runtime import Runtime
from moe_lab.training.step import StepSettings, forward_loss, train_step

#: the target's slack on the sharded part
SLACK = 1.15
MIB = 2**20


# ---------------------------------------------------------------------------------------
# CPU: bytes per rank under FSDP
# ---------------------------------------------------------------------------------------

def cpu_config(tiny: bool) -> MoEConfig:
    """The CPU model: ~14M parameters (big enough that the remainder is small, a step takes
    seconds on 2 cores), or a tiny one for the smoke test."""
    if tiny:
        return MoEConfig(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                         experts_per_token=2, expert_hidden_size=48, max_position_embeddings=64, dropout=0.0)
    return MoEConfig(vocab_size=2048, hidden_size=256, num_layers=4, num_attention_heads=4, num_experts=8,
                     experts_per_token=2, expert_hidden_size=512, max_position_embeddings=64, dropout=0.0)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors: List[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors`` (DTensors: their local shard), each storage
    counted once (so views of one flat buffer count as that buffer)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        s = _local(t).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """What this rank holds: parameters, gradients, optimizer state and buffers, in bytes."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "params": storage_bytes(params),
        "grads": storage_bytes([p.grad for p in params if p.grad is not None]),
        "optimizer": storage_bytes(state),
        "buffers": storage_bytes(list(model.buffers())),
    }


def remainder_bytes(config: MoEConfig, world: int) -> Dict[str, int]:
    """What FSDP over ``world`` ranks does not divide (see the module docstring): buffers,
    AdamW's per-parameter step scalars, and the dim-0 padding of parameter, gradient and
    both moments."""
    with torch.device("meta"):
        model = MoEModel.from_config(config)
    params = list(model.parameters())
    padding = 0.0
    for p in params:
        rows = p.shape[0] if p.dim() else 1
        per_row = p.numel() // max(rows, 1)
        padding += (math.ceil(rows / world) * per_row - p.numel() / world) * p.element_size() * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    steps = len(params) * 4
    return {"buffers": buffers, "steps": steps, "padding": int(math.ceil(padding)),
            "total": buffers + steps + int(math.ceil(padding))}


def target_bytes(single: int, world: int, remainder: int) -> float:
    """The per-rank budget: ``SLACK * single / world + remainder``."""
    return SLACK * single / world + remainder


def meets_target(per_rank: int, single: int, world: int, remainder: int) -> bool:
    return per_rank <= target_bytes(single, world, remainder)


def _batch(config: MoEConfig, rank: int, rows: int = 2, seq: int = 32) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, config.vocab_size, (rows, min(seq, config.max_position_embeddings)), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def measure_rank(config: MoEConfig, world: int, rank: int = 0) -> Dict[str, int]:
    """Build, shard (``world`` > 1: FSDP over the process group), one AdamW step, one more
    forward/backward; the bytes this rank holds."""
    torch.manual_seed(0)
    model = MoEModel.from_config(config)
    if world > 1:
        from moe_lab.parallel import ParallelDims
        from moe_lab.parallel.runtime import parallel_runtime

        runtime: Runtime = parallel_runtime(model, dims=ParallelDims(dp_shard=world))
    else:
        runtime = Runtime()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    settings = StepSettings(max_grad_norm=1.0)
    batch = _batch(config, rank)
    train_step(model, optimizer, [batch], runtime, settings=settings)  # creates the AdamW state
    labels = float(runtime.all_reduce_sum(torch.tensor([float(batch["labels"][:, 1:].numel())]))[0])
    loss, _, _ = forward_loss(model, batch, labels, settings, runtime)
    loss.backward()  # gradients, reduce-scattered to this rank's shards under FSDP
    return held_bytes(model, optimizer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, config: Dict[str, Any], results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # one line per unit and step
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results.put((rank, measure_rank(MoEConfig.from_dict(config), world, rank)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(config: MoEConfig, world: int, timeout: float = 600) -> List[Dict[str, int]]:
    """Each rank's bytes for ``world`` ranks (1: this process; more: spawned gloo ranks)."""
    if world == 1:
        return [measure_rank(config, 1)]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, config.to_dict(), results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"ranks of the {world}-rank run failed: exit codes {[p.exitcode for p in procs]}")
    got = dict(results.get() for _ in range(world))
    return [got[r] for r in range(world)]


def run_cpu(config: MoEConfig, ranks: List[int]) -> List[Dict[str, Any]]:
    """The CPU table: one row per number of ranks, with the target and PASS/FAIL."""
    single_rank = measure(config, 1)[0]
    single = single_rank["params"] + single_rank["grads"] + single_rank["optimizer"]
    with torch.device("meta"):
        n_params = MoEModel.from_config(config).num_parameters()
    print(f"model: {n_params / 1e6:.2f}M parameters (hidden {config.hidden_size}, {config.num_layers} layers, "
          f"{config.num_experts} experts of {config.intermediate_size}, vocab {config.vocab_size}); "
          f"one process holds {single / MIB:.2f} MiB of parameters + gradients + AdamW state", flush=True)
    rows = []
    for world in ranks:
        per = [single_rank] if world == 1 else measure(config, world)
        worst = max(per, key=lambda r: sum(r.values()))
        per_rank = sum(worst.values())
        rem = remainder_bytes(config, world)
        target = target_bytes(single, world, rem["total"])
        rows.append({"ranks": world, **worst, "per_rank": per_rank, "single": single, "ideal": single / world,
                     "remainder": rem, "target": target, "ratio": per_rank / (single / world),
                     "pass": meets_target(per_rank, single, world, rem["total"])})
    print_table(rows)
    return rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    head = (f"{'ranks':>5} {'params':>9} {'grads':>9} {'AdamW':>9} {'buffers KiB':>11} {'per rank':>9} "
            f"{'single/N':>9} {'remainder KiB':>13} {'target':>9} {'per rank/(single/N)':>20}  result")
    print("MiB per rank (FSDP2, fp32, AdamW); target = 1.15 x single/N + remainder")
    print(head)
    for r in rows:
        print(f"{r['ranks']:>5} {r['params'] / MIB:>9.2f} {r['grads'] / MIB:>9.2f} {r['optimizer'] / MIB:>9.2f} "
              f"{r['buffers'] / 1024:>11.2f} {r['per_rank'] / MIB:>9.2f} {r['ideal'] / MIB:>9.2f} "
              f"{r['remainder']['total'] / 1024:>13.2f} {r['target'] / MIB:>9.2f} {r['ratio']:>20.4f}  "
              f"{'PASS' if r['pass'] else 'FAIL'}")
    rem = rows[-1]["remainder"]
    print(f"remainder at {rows[-1]['ranks']} ranks: buffers {rem['buffers']} B, AdamW step scalars {rem['steps']} B, "
          f"FSDP dim-0 padding {rem['padding']} B", flush=True)


# ---------------------------------------------------------------------------------------
# GPU: peak memory and the largest model that trains
# ---------------------------------------------------------------------------------------

def reference_config(seq: int = 1024) -> MoEConfig:
    """The API reference's default size: vocab 50257, hidden 768, 12 layers, 12 heads, 8
    experts top-2, ffn 3072."""
    return MoEConfig(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12, num_experts=8,
                     experts_per_token=2, expert_hidden_size=3072, max_position_embeddings=seq, dropout=0.0)


class OneRankFSDPRuntime(Runtime):
    """One process whose model is under FSDP2 at degree 1: the gradient norm comes back as a
    DTensor, returned here as a plain tensor."""

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: Any) -> torch.Tensor:
        norm = super().clip_grad_norm(model, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def one_rank_fsdp(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 at degree 1 with bf16 compute and fp32 master weights / reduction, per decoder
    layer and its experts (moe_lab's FSDP units), on a one-rank process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        if layer.is_moe:
            fully_shard(layer.mlp.experts, mesh=mesh, mp_policy=policy)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def free(device: torch.device) -> None:
    """Drop what the previous trial left (model, optimizer, compiled graphs)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_steps(config: MoEConfig, device: torch.device, variant: str, batch: int, seq: int, steps: int,
                fast_paths: bool, lm_loss: str = "auto") -> Dict[str, Any]:
    """Build ``config`` on ``device`` and train ``steps`` steps as ``variant`` ("plain": fp32
    weights + bf16 autocast; "ac": the same + AC full; "fsdp+ac": FSDP(1 rank, bf16 mixed
    precision) + AC full). Returns the peak memory (GiB; NaN off CUDA) and the last loss."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device(device):
        model = MoEModel.from_config(config)
    fsdp = variant == "fsdp+ac"
    trainer = MoETrainer(model, device=str(device), mixed_precision=not fsdp, fast_paths=fast_paths,
                         progress_bar=False, tensorboard=False, seed=0,
                         activation_checkpointing="none" if variant == "plain" else "full", lm_loss=lm_loss,
                         runtime=OneRankFSDPRuntime() if fsdp else None)
    if fsdp:
        one_rank_fsdp(trainer.model, device)
    trainer.setup_optimizer(3e-4, 10, 1000)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    micro = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss = float("nan")
    for _ in range(steps):
        loss = train_step(trainer.model, trainer.optimizer, [micro], trainer.runtime, scheduler=trainer.scheduler,
                          settings=trainer.settings).loss_share
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"peak_gib": peak, "loss": loss, "params": model.num_parameters()}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def fits(config: MoEConfig, device: torch.device, variant: str, batch: int, seq: int,
         fast_paths: bool, lm_loss: str = "auto") -> Optional[Dict[str, Any]]:
    """One train step of ``config`` as ``variant``: its result, or None when it runs out of memory."""
    try:
        result: Optional[Dict[str, Any]] = train_steps(config, device, variant, batch, seq, 1, fast_paths, lm_loss)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        result = None
    free(device)
    return result


#: ``--grow seq`` counts the sequence length in units of this many tokens
SEQ_UNIT = 1024


def grown_config(base: MoEConfig, grow: str, n: int) -> MoEConfig:
    """``base`` with ``n`` layers (``grow="layers"``), a hidden size of ``n`` units of two
    heads (``grow="hidden"``; the head width stays, the ffn keeps its ratio to the hidden size),
    or positions for ``n * SEQ_UNIT`` tokens (``grow="seq"``; the model is otherwise ``base``)."""
    if grow == "layers":
        return base.replace(num_layers=n)
    if grow == "seq":
        return base.replace(max_position_embeddings=n * SEQ_UNIT)
    head_dim = base.hidden_size // base.num_attention_heads
    hidden = n * 2 * head_dim
    ffn = base.intermediate_size * hidden // base.hidden_size
    return base.replace(hidden_size=hidden, num_attention_heads=hidden // head_dim, num_key_value_heads=None,
                        expert_hidden_size=ffn)


def grown_size(base: MoEConfig, grow: str) -> int:
    """``base``'s size in the units of :func:`grown_config`."""
    if grow == "seq":
        return 1
    return base.num_layers if grow == "layers" else base.num_attention_heads // 2


def largest_model(base: MoEConfig, device: torch.device, variant: str, grow: str, batch: int, seq: int,
                  limit: int, fast_paths: bool, lm_loss: str = "auto") -> Dict[str, Any]:
    """The largest ``num_layers`` (or hidden size) that trains one step: double from ``base``
    until a step runs out of memory (or passes ``limit`` units), then bisect to ~6%."""

    def trial(n: int) -> Optional[Dict[str, Any]]:
        t0 = time.perf_counter()
        config = grown_config(base, grow, n)
        r = fits(config, device, variant, batch, n * SEQ_UNIT if grow == "seq" else seq, fast_paths, lm_loss)
        what = {"layers": f"{n} layers", "hidden": f"hidden {config.hidden_size}",
                "seq": f"seq {n * SEQ_UNIT}"}[grow]
        status = "OOM" if r is None else f"fits, {r['params'] / 1e9:.2f}B params, peak {r['peak_gib']:.1f} GiB"
        print(f"  {variant:8s} {what:>12}: {status} ({time.perf_counter() - t0:.0f}s)", flush=True)
        return r

    lo, best = 0, None
    n = grown_size(base, grow)
    while n <= limit:
        r = trial(n)
        if r is None:
            break
        lo, best = n, r
        n *= 2
    if best is None:
        return {"variant": variant, "grow": grow, "size": None}
    hi = min(n, limit + 1)
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        r = trial(mid)
        if r is None:
            hi = mid
        else:
            lo, best = mid, r
    config = grown_config(base, grow, lo)
    size = {"layers": lo, "hidden": config.hidden_size, "seq": lo * SEQ_UNIT}[grow]
    return {"variant": variant, "grow": grow, "size": size,
            "params": best["params"], "peak_gib": best["peak_gib"], "limited": lo >= limit}


def run_gpu(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA (no GPU visible)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else float("nan")
    config = cpu_config(True) if args.tiny else reference_config(seq=args.seq)
    seq = min(args.seq, config.max_position_embeddings)
    print(f"device: {name} ({total:.0f} GiB); batch {args.batch} x {seq}; vocab {config.vocab_size}, hidden "
          f"{config.hidden_size}, {config.num_layers} layers, {config.num_experts} experts top-"
          f"{config.experts_per_token}, ffn {config.intermediate_size}", flush=True)
    if not args.skip_peak:
        print(f"{'variant':<44} {'peak GiB':>9} {'loss':>8}")
        labels = {"plain": "fp32 weights + bf16 autocast (moe-lab train)", "ac": "the same + activation checkpointing",
                  "fsdp+ac": "FSDP(1 rank, bf16 mixed precision) + AC full"}
        for variant in ("plain", "ac", "fsdp+ac"):
            r = train_steps(config, device, variant, args.batch, seq, 2, fast_paths=not args.eager)
            print(f"{labels[variant]:<44} {r['peak_gib']:>9.2f} {r['loss']:>8.4f}", flush=True)
            free(device)
    if not args.skip_search:
        # the sequence search: batch 1 and the chunked LM loss (the logits of one long sequence alone
        # would fill the card), eager (no recompile per length)
        batch, lm_loss = (1, "chunked") if args.grow == "seq" else (args.batch, "auto")
        print(f"largest {'sequence' if args.grow == 'seq' else 'model'} that trains one step (grow {args.grow}, "
              f"batch {batch}, eager, lm_loss {lm_loss}):", flush=True)
        found = [largest_model(config, device, v, args.grow, batch, seq, args.max_size, fast_paths=False,
                               lm_loss=lm_loss) for v in ("plain", "fsdp+ac")]
        for f in found:
            if f["size"] is None:
                print(f"  {f['variant']}: even the default size does not fit")
            else:
                print(f"  {f['variant']:8s}: {f['grow']} = {f['size']}: {f['params'] / 1e9:.2f}B parameters, "
                      f"peak {f['peak_gib']:.1f} GiB" + (" (the --max-size limit)" if f["limited"] else ""), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="CPU: numbers of FSDP ranks")
    p.add_argument("--json", help="CPU: also write the table's rows to this file")
    p.add_argument("--gpu", action="store_true", help="GPU mode: peak memory and the largest model on one GPU")
    p.add_argument("--device", default="cuda", help="--gpu: the device (cpu runs the code path without memory figures)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--eager", action="store_true", help="--gpu: peak memory without the fast paths (no compile)")
    p.add_argument("--grow", choices=["layers", "hidden", "seq"], default="layers",
                   help="--gpu search: layers, hidden size, or the sequence length at batch 1 (units of 1024 tokens)")
    p.add_argument("--max-size", type=int, default=512,
                   help="--gpu: stop the search at this many layers (or units of two heads of hidden size)")
    p.add_argument("--skip-peak", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    args = p.parse_args()
    if args.gpu:
        run_gpu(args)
        return
    if 1 not in args.ranks:
        args.ranks = [1] + args.ranks
    rows = run_cpu(cpu_config(args.tiny), sorted(set(args.ranks)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    if not all(r["pass"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
