"""Decode speed on a GPU, side by side in one process: moe_lab vs transformers ``generate``.

    python benchmarks/gpu_decode.py                  # default size, 128-token prompts, 256 new tokens
    python benchmarks/gpu_decode.py --tiny           # smoke test (CPU ok, no timing claims)

Default size: vocab 50257, hidden 768, 12 layers, 8 experts top-2, ffn 3072, bf16, random
weights (speed does not depend on them). Greedy decoding, every run generates exactly
``--new`` tokens (no early EOS). Rows:
- transformers ``MixtralForCausalLM.generate`` (sdpa attention, grouped_mm experts), batch 1 and 8;
- moe_lab ``OptimizedMoEModel.generate`` with every expert resident (static KV cache, the
  one-token step replayed as a CUDA graph), batch 1 and 8;
- moe_lab ``OptimizedMoEModel`` with half the experts per layer resident on the GPU (the
  rest in pinned host memory, loaded on demand by the DynamicExpertLoader), batch 1, with
  its cache hit rate.
Checks first: greedy tokens of the fast path equal the eager reference (step-by-step argmax
of the full forward) in fp32 on the same device. Targets: >= 10x transformers at batch 1, >= 5x at
batch 8; offload >= 50% of fully resident speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Callable, Dict, List

import torch

from moe_lab.model import MoEModel
from moe_lab.checkpoint import save_moe_checkpoint


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_experts=8,
                  expert_hidden_size=128)
        prompt, new = 8, 8
    else:
        kw = dict(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12, num_experts=8,
                  expert_hidden_size=3072)
        prompt, new = args.prompt, args.new
    kw["max_position_embeddings"] = prompt + new
    torch.manual_seed(0)
    model = MoEModel(dropout=0.0, **kw).eval()
    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, kw["vocab_size"], (b, prompt), generator=g) for b in (1, 8)}
    rows: List[Dict[str, object]] = []

    from moe_lab.inference import OptimizedMoEModel, generate

    with tempfile.TemporaryDirectory() as tmp:
        save_moe_checkpoint(model, None, None, f"{tmp}/ckpt")
        # --- correctness: fast path vs eager reference, fp32 -------------------------------------
        ref_model = MoEModel(dropout=0.0, **kw).eval()
        ref_model.load_state_dict(model.state_dict())
        ref_model.to(device)
        ids = prompts[1][:, : min(prompt, 32)]
        ref = ids.to(device)
        with torch.no_grad():
            for _ in range(min(new, 32)):
                ref = torch.cat([ref, ref_model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
        fast32 = OptimizedMoEModel(f"{tmp}/ckpt", max_experts_in_memory=kw["num_experts"], dtype=torch.float32)
        out32 = fast32.generate(ids, max_new_tokens=min(new, 32), temperature=0)
        same = torch.equal(out32.cpu(), ref.cpu())
        print(f"greedy tokens, fast path (fp32) vs step-by-step argmax of the full forward: "
              f"{'identical' if same else 'DIFFERENT'} ({ref.shape[1] - ids.shape[1]} tokens)")
        fast32 = ref_model = None  # free the fp32 copies
        # --- speed ---------------------------------------------------------------------------------
        fast = OptimizedMoEModel(f"{tmp}/ckpt", max_experts_in_memory=kw["num_experts"], dtype=torch.bfloat16)
        for b, ids in prompts.items():
            fast.generate(ids, max_new_tokens=8, temperature=0)  # warm-up (graph capture)
            s = timed(lambda: fast.generate(ids, max_new_tokens=new, temperature=0), device)
            rows.append({"name": "moe_lab OptimizedMoEModel, all experts resident", "batch": b, "tps": b * new / s})
        half = kw["num_experts"] // 2
        off = OptimizedMoEModel(f"{tmp}/ckpt", max_experts_in_memory=half, dtype=torch.bfloat16)
        ids = prompts[1]
        off.generate(ids, max_new_tokens=8, temperature=0)
        s = timed(lambda: off.generate(ids, max_new_tokens=new, temperature=0), device)
        stats = off.stats()
        hit = stats.get("hit_rate", stats.get("expert_cache", {}).get("hit_rate", float("nan"))) if isinstance(stats, dict) else float("nan")
        rows.append({"name": f"moe_lab OptimizedMoEModel, {half}/{kw['num_experts']} experts resident (hit rate {hit:.2f})",
                     "batch": 1, "tps": new / s})
        ref_eager = MoEModel(dropout=0.0, **kw).eval()
        ref_eager.load_state_dict(model.state_dict())
        ref_eager.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        for b, ids in prompts.items():
            generate(ref_eager, ids, max_new_tokens=4, temperature=0)
            s = timed(lambda: generate(ref_eager, ids, max_new_tokens=new, temperature=0), device)
            rows.append({"name": "moe_lab generate() (eager KV cache, reference)", "batch": b, "tps": b * new / s})
    if not args.skip_hf:
        from transformers import MixtralConfig, MixtralForCausalLM

        hcfg = MixtralConfig(vocab_size=kw["vocab_size"], hidden_size=kw["hidden_size"],
                             intermediate_size=kw["expert_hidden_size"], num_hidden_layers=kw["num_layers"],
                             num_attention_heads=kw["num_attention_heads"], num_key_value_heads=kw["num_attention_heads"],
                             num_local_experts=kw["num_experts"], num_experts_per_tok=2,
                             max_position_embeddings=kw["max_position_embeddings"], sliding_window=None,
                             attn_implementation="sdpa")
        hcfg._experts_implementation = "grouped_mm" if device.type == "cuda" else "eager"
        torch.manual_seed(0)
        hf = MixtralForCausalLM(hcfg).to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
        for b, ids in prompts.items():
            ids = ids.to(device)
            gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            hf.generate(ids, attention_mask=torch.ones_like(ids), **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})
            s = timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), **gen), device)
            rows.append({"name": f"transformers Mixtral generate ({hcfg._experts_implementation})", "batch": b, "tps": b * new / s})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Decode on {name}, torch {torch.__version__}, prompt {prompt}, {new} new tokens, greedy")
    print(f"{'implementation':<70}{'batch':>6}{'tokens/s':>12}")
    for r in rows:
        print(f"{r['name']:<70}{r['batch']:>6}{r['tps']:>12,.0f}")
    for b in (1, 8):
        hf_tps = next((r["tps"] for r in rows if r["name"].startswith("transformers") and r["batch"] == b), None)
        ours = next((r["tps"] for r in rows if "all experts resident" in r["name"] and r["batch"] == b), None)
        if hf_tps and ours:
            print(f"batch {b}: moe_lab / transformers = {ours / hf_tps:.1f}x")
    res = next(r["tps"] for r in rows if "all experts resident" in r["name"] and r["batch"] == 1)
    offl = next(r["tps"] for r in rows if "experts resident (hit" in r["name"])
    print(f"offload (half resident) / fully resident, batch 1 = {offl / res:.0%}")


if __name__ == "__main__":
    main()
