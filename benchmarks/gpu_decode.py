"""Decode speed on a GPU, side by side in one process: the moe_lab engine vs transformers.

    python benchmarks/gpu_decode.py                  # default size, 128-token prompts, 256 new tokens
    python benchmarks/gpu_decode.py --profile        # also a torch.profiler table of the batch-1 decode
    python benchmarks/gpu_decode.py --tiny           # smoke test: CPU, seconds, no timing claims

Default size (the API reference's): vocab 50257, hidden 768, 12 layers, 8 experts top-2,
expert width 3072, bf16, random weights (speed does not depend on them). Greedy, and every
run generates exactly ``--new`` tokens (no EOS). Rows:

- moe_lab ``InferenceEngine`` with every expert resident (slot-pool KV cache, the decode step
  replayed as a CUDA graph per batch bucket, sampling on the device), batch 1 and 8, and
  ``--streams`` (64) concurrent requests through 64 slots (aggregate tokens/s);
- moe_lab ``OptimizedMoEModel`` with half the experts per layer resident (the rest behind
  the expert cache in pinned host memory; the decode step as CUDA-graph pieces around each
  layer's expert GEMM; copies on a side stream issued one layer ahead from the next
  layer's router), batch 1, with its hit rate, misses and
  prefetch hits/issued, printed as a ratio to the fully resident batch-1 row;
- transformers ``MixtralForCausalLM.generate`` with ``cache_implementation="static"`` (it
  compiles its own step), batch 1 and 8: the baseline of the ratios printed at the end.

First a check: in fp32 the engine's greedy tokens equal step-by-step argmax of the full
forward on the same device. Targets (issue 16): batch 1 >= 1,500 tokens/s, batch 8 >= 10,000,
64 streams >= 25,000, >= 10x transformers' static cache at batch 1 and 8, offload >= 50% of
fully resident. ``--tiny`` uses a 2-layer model on the CPU, the eager engine and transformers'
default cache (the static cache would compile for minutes on a CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Callable, Dict, List

import torch

from moe_lab.checkpoint import save_moe_checkpoint
from moe_lab.model import MoEModel


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def engine_run(engine, prompts: torch.Tensor, new: int) -> None:
    from moe_lab.inference import SamplingParams

    engine.generate(prompts.tolist(), SamplingParams(new, temperature=0), eos_token_id=None)


def offload_checks(off, bytes_per_token: float, device: torch.device) -> None:
    """CUDA only: the copy bound of the offload row (pinned host-to-device bandwidth, measured
    here) and a check that the expert cache's hit path is capturable (one layer's
    ``forward_resident`` captured in a CUDA graph and replayed equals the eager call)."""
    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)
    s = timed(lambda: [dst.copy_(src, non_blocking=True) for _ in range(4)], device)
    bw = 4 * src.numel() / s
    bound = bw / bytes_per_token if bytes_per_token else float("inf")
    print(f"  offload copy bound: {bw / 1e9:.1f} GB/s pinned host-to-device, {bytes_per_token / 2**20:.1f} MiB per "
          f"token -> at most {bound:,.0f} tokens/s from copies alone", flush=True)
    cache = off.expert_loader.caches[0]
    tpe = torch.zeros(cache.num_experts, dtype=torch.long, device=device)
    tpe[cache.resident()] = 1  # one row per resident expert: the hit path
    x = torch.randn(int(tpe.sum()), cache.hidden_size, device=device, dtype=cache.slots.w_in.dtype)
    want = cache.forward_resident(x, tpe)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cache.forward_resident(x, tpe)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = cache.forward_resident(x, tpe)
        g.replay()
        torch.cuda.synchronize()
    except RuntimeError as err:  # reported, not fatal: the timing rows still print
        print(f"  expert-cache hit path NOT capturable: {str(err).splitlines()[0]}", flush=True)
        return
    same = "equals" if torch.equal(out, want) else "DIFFERS from"
    print(f"  expert-cache hit path captured as a CUDA graph: replay {same} the eager call", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer model on the CPU (smoke test)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--streams", type=int, default=64, help="concurrent requests of the aggregate row")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the batch-1 engine decode")
    p.add_argument("--compile", action="store_true", help="also time the engine with compile_step=True (batch 1, 8)")
    args = p.parse_args()
    from moe_lab.inference import InferenceEngine, OptimizedMoEModel

    if args.tiny:
        device = torch.device("cpu")
        kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_experts=8,
                  expert_hidden_size=128)
        prompt, new, streams = 8, 8, 4
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        kw = dict(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12, num_experts=8,
                  expert_hidden_size=3072)
        prompt, new, streams = args.prompt, args.new, args.streams
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kw["max_position_embeddings"] = prompt + new
    torch.manual_seed(0)
    model = MoEModel(dropout=0.0, **kw).eval()
    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, kw["vocab_size"], (b, prompt), generator=g) for b in (1, 8, streams)}
    rows: List[Dict[str, object]] = []

    def add(row: Dict[str, object]) -> None:
        rows.append(row)
        print(f"  measured: {row['name']}, batch {row['batch']}: {row['tps']:,.0f} tokens/s", flush=True)

    # --- correctness: fp32 engine vs step-by-step argmax of the full forward ------------------
    ref_model = MoEModel(dropout=0.0, **kw).eval()
    ref_model.load_state_dict(model.state_dict())
    ref_model.to(device)
    ids = prompts[1][:, : min(prompt, 32)].to(device)
    steps = min(new, 32)
    ref = ids
    with torch.no_grad():
        for _ in range(steps):
            ref = torch.cat([ref, ref_model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    eng32 = InferenceEngine(ref_model, max_batch_size=1, max_seq_len=ids.shape[1] + steps)
    from moe_lab.inference import SamplingParams

    got = eng32.generate(ids.tolist(), SamplingParams(steps, temperature=0))[0].token_ids
    same = got == ref[0, ids.shape[1]:].tolist()
    print(f"greedy tokens, engine (fp32, {'graph' if eng32.use_cuda_graph else 'eager'}) vs step-by-step argmax of "
          f"the full forward: {'identical' if same else 'DIFFERENT'} ({steps} tokens)")
    eng32 = ref_model = None

    # --- speed: the engine, every expert resident ---------------------------------------------
    fast = MoEModel(dropout=0.0, **kw).eval()
    fast.load_state_dict(model.state_dict())
    fast.to(device=device, dtype=dtype)
    engines = {b: InferenceEngine(fast, max_batch_size=b, max_seq_len=prompt + new) for b in (1, 8, streams)}
    mode = "CUDA graph" if engines[1].use_cuda_graph else "eager"
    for b in (1, 8, streams):
        eng, ids = engines[b], prompts[b]
        engine_run(eng, ids, 8)  # warm-up: graph capture of the buckets used
        s = timed(lambda: engine_run(eng, ids, new), device)
        label = f"moe_lab engine, all experts resident ({mode})" + (f", {b} concurrent streams" if b == streams else "")
        add({"name": label, "batch": b, "tps": b * new / s, "key": f"engine{b}"})
    if args.compile and device.type == "cuda":
        for b in (1, 8):
            eng = InferenceEngine(fast, max_batch_size=b, max_seq_len=prompt + new, compile_step=True)
            t0 = time.perf_counter()
            engine_run(eng, prompts[b], 8)  # compiles and captures
            print(f"  compile + capture, batch {b}: {time.perf_counter() - t0:.0f} s", flush=True)
            s = timed(lambda: engine_run(eng, prompts[b], new), device)
            add({"name": f"moe_lab engine, compile_step=True ({mode})", "batch": b, "tps": b * new / s,
                 "key": f"compiled{b}"})
            if args.profile and b == 1:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    engine_run(eng, prompts[1], 64)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine_run(engines[1], prompts[1], 64)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    engines = None

    # --- speed: half the experts resident (the expert cache) ----------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        save_moe_checkpoint(model, None, None, f"{tmp}/ckpt")
        half = kw["num_experts"] // 2
        off = OptimizedMoEModel(f"{tmp}/ckpt", device_map=str(device), max_experts_in_memory=half, dtype=dtype)
        ids = prompts[1]
        off.generate(ids, max_new_tokens=8, temperature=0)
        off.expert_loader.reset_stats()
        s = timed(lambda: off.generate(ids, max_new_tokens=new, temperature=0), device)
        st = off.stats()
        add({"name": f"moe_lab OptimizedMoEModel, {half}/{kw['num_experts']} experts resident "
                             f"(hit rate {st['hit_rate']:.2f}, {st['misses']} misses)",
                     "batch": 1, "tps": new / s, "key": "offload"})
        print(f"  offload: {st['experts_needed']} experts needed = {st['hits']} hits + {st['misses']} misses; "
              f"prefetches {st['prefetches']} = {st['prefetch_hits']} used + {st['wasted_prefetches']} wasted + "
              f"{st['pending_prefetches']} pending; {st['bytes_loaded'] / 2**20 / new:.1f} MiB copied per token",
              flush=True)
        print(f"  offload decode path: {'CUDA-graph pieces' if off.engine.use_offload_graphs else 'eager steps'} "
              f"({off.engine.stats()['offload_steps']} piecewise steps)", flush=True)
        if device.type == "cuda":
            offload_checks(off, st["bytes_loaded"] / new, device)
        off = None

    # --- transformers, static cache -----------------------------------------------------------
    if not args.skip_hf:
        from transformers import MixtralConfig, MixtralForCausalLM

        hcfg = MixtralConfig(vocab_size=kw["vocab_size"], hidden_size=kw["hidden_size"],
                             intermediate_size=kw["expert_hidden_size"], num_hidden_layers=kw["num_layers"],
                             num_attention_heads=kw["num_attention_heads"],
                             num_key_value_heads=kw["num_attention_heads"], num_local_experts=kw["num_experts"],
                             num_experts_per_tok=2, max_position_embeddings=kw["max_position_embeddings"],
                             sliding_window=None, attn_implementation="sdpa")
        if device.type == "cuda":
            hcfg._experts_implementation = "grouped_mm"
        torch.manual_seed(0)
        hf = MixtralForCausalLM(hcfg).to(device=device, dtype=dtype).eval()
        cache = {"cache_implementation": "static"} if device.type == "cuda" else {}
        cache_name = "static cache" if cache else "default cache"
        for b in (1, 8):
            ids = prompts[b].to(device)
            gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **cache)
            for _ in range(2 if cache else 1):  # warm-up (the static cache compiles its step)
                hf.generate(ids, attention_mask=torch.ones_like(ids), **gen)
            s = timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), **gen), device)
            add({"name": f"transformers Mixtral generate ({cache_name})", "batch": b, "tps": b * new / s,
                         "key": f"hf{b}"})

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Decode on {name}, torch {torch.__version__}, {dtype}, prompt {prompt}, {new} new tokens, greedy")
    print(f"{'implementation':<82}{'batch':>6}{'tokens/s':>12}")
    for r in rows:
        print(f"{r['name']:<82}{r['batch']:>6}{r['tps']:>12,.0f}")
    tps = {r["key"]: r["tps"] for r in rows}
    for b in (1, 8):
        if f"hf{b}" in tps:
            print(f"batch {b}: moe_lab engine / transformers = {tps[f'engine{b}'] / tps[f'hf{b}']:.1f}x (target >= 10x)")
    print(f"{streams} streams aggregate: {tps[f'engine{streams}']:,.0f} tokens/s")
    print(f"offload (half resident) / fully resident, batch 1 = {tps['offload'] / tps['engine1']:.0%} (target >= 50%)")


if __name__ == "__main__":
    main()
