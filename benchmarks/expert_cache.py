"""Expert-cache hit rate: usage_based prefetch vs plain LRU, on the built-in corpus.

    .venv/bin/moe-lab train -o /tmp/serve-demo --set training.max_steps=150   # a trained checkpoint
    python benchmarks/expert_cache.py /tmp/serve-demo/model                    # half the experts resident
    python benchmarks/expert_cache.py CKPT --cache-size 2 --docs 64 --tokens 96
    python benchmarks/expert_cache.py --tiny                                   # smoke run, random tiny model

Workload: documents of the built-in corpus's eval split (all five domains), decoded token by
token with the KV cache (teacher forcing: each step feeds the document's next token, so the
routing is exactly what autoregressive decoding of that text sees). The first
``--prompt`` tokens of each document are one prefill forward.

For each (eviction policy, prefetch strategy) the same model weights are wrapped by a fresh
:class:`~moe_lab.inference.DynamicExpertLoader`; the logits are checked against the fully
resident model run the same way (max |dlogit| column), then the table prints the demand hit rate (prefill+decode and decode only),
loads per token and the prefetch accuracy. An access is one expert needed by one layer in
one forward; a prefetch that arrives before the access turns it into a hit, and its copy is
counted in "loads/token" either way.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import shutil
import sys
import tempfile
from typing import Dict, List

import torch


def _docs(tokenizer, num_docs: int, max_tokens: int, min_tokens: int) -> List[List[int]]:
    from moe_lab.data import build_corpus, train_eval_split

    _, eval_ds = train_eval_split(build_corpus(), eval_fraction=0.05, seed=0)
    by_domain: Dict[str, List[List[int]]] = {}
    for row in eval_ds:
        ids = tokenizer.encode(row["text"])[:max_tokens]
        if len(ids) >= min_tokens:
            by_domain.setdefault(row["domain"], []).append(ids)
    docs: List[List[int]] = []
    i = 0
    while len(docs) < num_docs and any(i < len(v) for v in by_domain.values()):
        for d in sorted(by_domain):  # round-robin over domains
            if i < len(by_domain[d]) and len(docs) < num_docs:
                docs.append(by_domain[d][i])
        i += 1
    return docs


@torch.no_grad()
def run(model, docs: List[List[int]], prompt: int, loader=None, reference=None):
    """Prefill + teacher-forced decode of every doc.

    Returns (prefill-only hits/misses, final stats, logits per doc, max |logit - reference|).
    """
    from moe_lab.inference import KVCache

    prefill = {"hits": 0, "misses": 0}
    all_logits, max_diff = [], 0.0
    for d, ids in enumerate(docs):
        x = torch.tensor([ids])
        cache = KVCache.for_model(model, 1, len(ids))
        before = loader.stats() if loader else None
        logits = [model(x[:, :prompt], kv_cache=cache)[:, -1]]
        if loader:
            after = loader.stats()
            for k in prefill:
                prefill[k] += after[k] - before[k]
        for t in range(prompt, len(ids)):
            logits.append(model(x[:, t : t + 1], kv_cache=cache)[:, -1])
        logits = torch.cat(logits)
        all_logits.append(logits)
        if reference is not None:
            max_diff = max(max_diff, (logits - reference[d]).abs().max().item())
    return prefill, (loader.stats() if loader else {}), all_logits, max_diff


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="trained checkpoint directory (omit with --tiny)")
    p.add_argument("--cache-size", type=int, default=None, help="resident experts per layer (default: half)")
    p.add_argument("--docs", type=int, default=30, help="documents of the eval split")
    p.add_argument("--tokens", type=int, default=96, help="tokens per document (prompt included)")
    p.add_argument("--prompt", type=int, default=16, help="prefill tokens per document")
    p.add_argument("--tiny", action="store_true", help="smoke run on a random tiny checkpoint")
    args = p.parse_args()

    from moe_lab import MoEModel
    from moe_lab.data import ByteTokenizer, load_tokenizer
    from moe_lab.inference import DynamicExpertLoader
    from moe_lab.checkpoint import load_pretrained_moe, save_moe_checkpoint

    torch.manual_seed(0)
    if args.tiny:
        tmp = tempfile.mkdtemp(prefix="expert-cache-bench-")
        atexit.register(shutil.rmtree, tmp, True)
        tok = ByteTokenizer()
        m = MoEModel(vocab_size=len(tok), hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     expert_hidden_size=32, max_position_embeddings=128, dropout=0.0)
        save_moe_checkpoint(m, None, None, tmp, tokenizer=tok)
        ckpt, args.docs, args.tokens, args.prompt = tmp, min(args.docs, 5), min(args.tokens, 24), min(args.prompt, 8)
    elif args.checkpoint:
        ckpt = args.checkpoint
    else:
        p.error("give a checkpoint directory, or --tiny")
    base = load_pretrained_moe(ckpt, dropout=0.0).eval()
    from pathlib import Path

    tok = load_tokenizer(ckpt) if (Path(ckpt) / "tokenizer_config.json").exists() else load_tokenizer("byte")
    num_experts = base.config.num_experts
    cache_size = args.cache_size or max(1, num_experts // 2)
    docs = _docs(tok, args.docs, args.tokens, args.prompt + 8)
    num_tokens = sum(len(d) - args.prompt + 1 for d in docs)
    num_decode = sum(len(d) - args.prompt for d in docs)
    print(
        f"expert cache on the built-in corpus: {ckpt}\n"
        f"  {len(docs)} eval docs, {num_tokens} forwards' worth of tokens ({num_decode} decode steps), "
        f"{len(base.moe_layers)} MoE layers x {num_experts} experts top-{base.config.experts_per_token}, "
        f"cache_size={cache_size} resident per layer"
    )
    print(f"  {'eviction':<9}{'prefetch':<13}{'hit rate':>9}{'decode hit':>12}{'loads/tok':>11}"
          f"{'prefetches':>12}{'useful':>8}{'max|dlogit|':>13}")
    _, _, reference, _ = run(base, docs, args.prompt)  # the fully resident model, same KV-cache path
    results = {}
    for policy in ("lru", "lfu"):
        for strategy in ("none", "usage_based"):
            model = copy.deepcopy(base)
            loader = DynamicExpertLoader(model, cache_size=cache_size, eviction_policy=policy,
                                         prefetch_strategy=strategy, routing_stats=ckpt)
            pre, st, _, diff = run(model, docs, args.prompt, loader, reference=reference)
            dec_hits, dec_misses = st["hits"] - pre["hits"], st["misses"] - pre["misses"]
            dec_rate = dec_hits / max(1, dec_hits + dec_misses)
            loads = (st["bytes_loaded"] / max(1, base.moe_layers[0].experts.params_per_expert() * 4)) / num_tokens
            useful = st["useful_prefetches"] / st["prefetches"] if st["prefetches"] else float("nan")
            results[(policy, strategy)] = (st["hit_rate"], dec_rate)
            print(f"  {policy:<9}{strategy:<13}{st['hit_rate']:>9.3f}{dec_rate:>12.3f}{loads:>11.2f}"
                  f"{st['prefetches']:>12}{useful:>8.2f}{diff:>13.1e}")
            if diff > 1e-5:
                print(f"error: cached logits differ from the resident model by {diff}", file=sys.stderr)
                return 1
    lru, ub = results[("lru", "none")], results[("lru", "usage_based")]
    print(f"  usage_based vs plain LRU: hit rate {ub[0]:.3f} vs {lru[0]:.3f} ({ub[0] / max(lru[0], 1e-9):.2f}x), "
          f"decode {ub[1]:.3f} vs {lru[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
