"""Serving load test: requests/s, p50/p99 latency, and Serve's overhead over a direct call.

    python benchmarks/serve_load.py                        # tiny random model, CPU
    python benchmarks/serve_load.py --checkpoint outputs/demo/model --requests 256 --concurrency 32
    python benchmarks/serve_load.py --tiny                 # smoke run (a few requests)

One run, side by side, with the same checkpoint, request and torch thread count:

1. direct: ``OptimizedMoEModel.complete([request])`` in this process, sequentially;
2. serve, sequential: the same request over HTTP to a local Serve app (127.0.0.1), one at
   a time; the p50 difference to (1) is Serve's overhead (HTTP proxy, routing to the
   replica, FastAPI, JSON, the engine's queue and the hops to and from its thread). ``GET
   /healthz`` (no model work) shows the part that is Serve's HTTP path alone;
3. serve, under load: ``--requests`` requests from ``--concurrency`` client threads:
   requests/s, p50/p99 latency and the engine's mean running batch over the phase
   (continuous batching: requests join the running batch at the next decode step).

Greedy decoding of ``--max-tokens`` tokens per request; every HTTP answer must be 200.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Callable, List

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def _time(fn: Callable[[], None], n: int) -> List[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory (default: a random model of the demo's shape)")
    p.add_argument("--requests", type=int, default=256, help="requests in the load phase")
    p.add_argument("--concurrency", type=int, default=32, help="client threads in the load phase")
    p.add_argument("--sequential", type=int, default=50, help="requests for the overhead comparison")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-experts-in-memory", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="experts per MoE layer on the device, or auto (all when they fit)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, direct and in the replica")
    p.add_argument("--max-batch-size", type=int, default=8, help="the replica's KV slots (ServeArgs.max_batch_size)")
    p.add_argument("--device", default="cpu", help="model device, direct and in the replica (cpu, cuda)")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny model, a few requests")
    args = p.parse_args()
    if args.tiny:
        args.requests, args.concurrency, args.sequential, args.max_tokens = 16, 8, 5, 4

    import ray
    import requests
    from ray import serve

    from moe_lab import OptimizedMoEModel
    from moe_lab.inference import CompletionRequest
    from moe_lab.orchestration.serve import app_builder
    from moe_lab.serving import ServeArgs

    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    ckpt = args.checkpoint or _make_checkpoint(os.path.join(tmp.name, "model"), args.tiny)
    torch.set_num_threads(args.threads)
    prompt = "12 + 5 = 17\n3 + 4 ="
    body = {"model": "moe-lab", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}

    # 1. direct
    direct = OptimizedMoEModel(ckpt, device_map=args.device, max_experts_in_memory=args.max_experts_in_memory)
    req = CompletionRequest(prompt, args.max_tokens, temperature=0)
    direct.complete([req])  # warm-up
    direct_lat = _time(lambda: direct.complete([req]), args.sequential)
    want = direct.complete([req])[0].text

    ray.init("local", num_cpus=4, object_store_memory=256 * 1024**2, include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    port = _free_port()  # after Ray started its own processes, outside Linux's ephemeral range
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder(ServeArgs(checkpoint=ckpt, device=args.device, max_experts_in_memory=args.max_experts_in_memory,
                                        torch_threads=args.threads, num_cpus_per_replica=1,
                                        max_batch_size=args.max_batch_size,
                                        max_ongoing_requests=max(64, args.concurrency),
                                        max_queued_requests=max(128, args.requests))), route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/completions"
        session = requests.Session()

        def call(sess: requests.Session = session) -> None:
            r = sess.post(url, json=body, timeout=120)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            if r.json()["choices"][0]["text"] != want:
                raise RuntimeError("served greedy text differs from the direct call")

        for _ in range(3):
            call()  # warm-up: connection, replica, caches
        # 2. sequential over HTTP (and Serve's floor: a route that does no model work)
        serve_lat = _time(call, args.sequential)
        health_url = f"http://127.0.0.1:{port}/healthz"
        floor_lat = _time(lambda: session.get(health_url, timeout=30).raise_for_status(), args.sequential)
        # 3. under load
        local = __import__("threading").local()

        def timed(_: int) -> float:
            if not hasattr(local, "s"):
                local.s = requests.Session()
            t = time.perf_counter()
            call(local.s)
            return time.perf_counter() - t

        before = requests.get(f"http://127.0.0.1:{port}/v1/stats", timeout=30).json()["engine"]
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            load_lat = list(pool.map(timed, range(args.requests)))
        wall = time.perf_counter() - start
        after = requests.get(f"http://127.0.0.1:{port}/v1/stats", timeout=30).json()["engine"]
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    ms = 1000.0
    steps = after["decode_steps"] - before["decode_steps"]
    mean_batch = (after["decode_rows"] - before["decode_rows"]) / steps if steps else 0.0
    d50, s50 = _pct(direct_lat, 50), _pct(serve_lat, 50)
    print(f"serving benchmark: {ckpt if args.checkpoint else 'random model'} on {args.device}, torch threads={args.threads}, "
          f"max_tokens={args.max_tokens} (greedy), prompt {len(prompt)} tokens, torch {torch.__version__}")
    print(f"  {'path':<30}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}")
    print(f"  {'direct complete()':<30}{len(direct_lat):>9}{d50 * ms:>9.1f}{_pct(direct_lat, 99) * ms:>9.1f}"
          f"{1 / statistics.mean(direct_lat):>9.1f}")
    print(f"  {'serve GET /healthz (no model)':<30}{len(floor_lat):>9}{_pct(floor_lat, 50) * ms:>9.1f}"
          f"{_pct(floor_lat, 99) * ms:>9.1f}{1 / statistics.mean(floor_lat):>9.1f}")
    print(f"  {'serve, sequential':<30}{len(serve_lat):>9}{s50 * ms:>9.1f}{_pct(serve_lat, 99) * ms:>9.1f}"
          f"{1 / statistics.mean(serve_lat):>9.1f}")
    print(f"  {f'serve, {args.concurrency} concurrent':<30}{len(load_lat):>9}{_pct(load_lat, 50) * ms:>9.1f}"
          f"{_pct(load_lat, 99) * ms:>9.1f}{len(load_lat) / wall:>9.1f}")
    print(f"  Serve overhead at p50: {(s50 - d50) * ms:.1f} ms per request (target <= 5 ms); "
          f"mean running batch under load: {mean_batch:.2f} requests per decode step "
          f"({after['max_batch_size']} slots)")
    return 0


def _free_port() -> int:
    """A free loopback port in [20000, 32000): above Ray's worker ports (10002-19999) and below
    the ephemeral range (32768+), so no other process picks it between this check and Serve's bind."""
    import random

    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in [20000, 32000)")


if __name__ == "__main__":
    sys.exit(main())
