"""Ray Data streaming: pipeline throughput and how long training waits for data.

    python benchmarks/ray_data_pipeline.py                  # default job size, 1 worker, 60 steps
    python benchmarks/ray_data_pipeline.py --workers 2 --steps 100

Two measurements in one run, on one local Ray cluster:
1. pipeline tokens/s: read -> tokenize+pack (actor pool) -> batches, consumed as fast as
   possible in the driver, no training;
2. the default job trained with ``data.streaming=true``: the fraction of step time workers
   spend waiting for the next batch (``data_wait_fraction`` in metrics.jsonl), averaged over
   the logging windows after the first (which includes pipeline start-up).
Target: < 5% waiting at the default job's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--corpus-bytes", type=int, default=2_500_000)
    args = p.parse_args()

    from moe_lab.data import ByteTokenizer, save_tokenizer
    from moe_lab.jobs import load_job
    from moe_lab.orchestration.cluster import init_ray, shutdown_ray
    from moe_lab.orchestration.data import streaming_dataset
    from moe_lab.orchestration.train import run_job_ray

    overrides = [
        "data.streaming=true", f"data.corpus_size_bytes={args.corpus_bytes}", f"training.max_steps={args.steps}",
        "training.eval_steps=100000", "training.save_steps=100000", "training.logging_steps=10",
        f"scaling.num_workers={args.workers}", "analyze=false",
    ]
    spec = load_job(None, overrides)
    init_ray()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            save_tokenizer(ByteTokenizer(), Path(tmp) / "tok")
            ds = streaming_dataset(spec, str(Path(tmp) / "tok"))
            start, tokens = time.perf_counter(), 0
            for batch in ds.iter_batches(batch_size=spec.training.batch_size, batch_format="numpy"):
                tokens += sum(len(ids_L) for ids_L in batch["input_ids"])  # ragged blocks: an object array
            pipeline_tps = tokens / (time.perf_counter() - start)
            summary = run_job_ray(spec, str(Path(tmp) / "run"))
            lines = [json.loads(l) for l in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutdown_ray()
    waits = [l["data_wait_fraction"] for l in lines if "data_wait_fraction" in l]
    steady = waits[1:] or waits
    print(f"Ray Data streaming, default job, {args.workers} worker(s), {args.steps} steps, torch {torch.__version__}")
    print(f"pipeline alone: {pipeline_tps:,.0f} tokens/s ({tokens:,} tokens)")
    print(f"training:       {summary['tokens_per_second']:,.0f} tokens/s end to end")
    print(f"data wait:      {100 * sum(steady) / len(steady):.2f}% of step time after warm-up "
          f"(first window, with pipeline start-up: {100 * waits[0]:.1f}%)")
    print(f"target < 5%:    {'met' if sum(steady) / len(steady) < 0.05 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
