"""Train a job under ``torchrun`` (no Ray): every rank runs :func:`moe_lab.runner.run_task`.

    torchrun --nproc-per-node 2 -m moe_lab.launch jobs/default.yaml \\
        --set scaling.expert_parallel_size=2 -o outputs/ep2

The job spec, the data preparation, the model, the trainer and the outputs are those of
``moe-lab train``; only the launcher differs. ``scaling.num_workers`` is set to torchrun's
world size; ``scaling.expert_parallel_size`` shards the experts. The backend is
NCCL when ``scaling.use_gpu`` is set and CUDA is available, gloo otherwise. Rank 0 writes the
summary, the plots and the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from .errors import MoEError


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lab.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("job", nargs="?", help="job spec YAML (default: the built-in default job)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("-o", "--output-dir", help="where outputs go (default: training.output_dir)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except MoEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .jobs import load_job, record_job, resume_job
    from .parallel.runtime import parallel_runtime
    from .runner import finalize, format_summary, job_task, parameter_counts, prepare_data, run_task
    from .training.runtime import Runtime

    world = os.environ.get("WORLD_SIZE", "1")  # torchrun's; scaling.num_workers follows it
    overrides = [*args.overrides, f"scaling.num_workers={world}"]
    if args.resume:  # the recorded job of the output directory, with the changes a resume allows
        spec = resume_job(args.output_dir or load_job(args.job).training.output_dir, overrides, args.job)
    else:
        spec = load_job(args.job, overrides)  # validated before any process group exists
    gpu = spec.scaling.use_gpu and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        out = Path(args.output_dir or spec.training.output_dir).expanduser().resolve()
        if dist.get_rank() == 0:
            record_job(spec, out)
        t0 = time.perf_counter()
        data = prepare_data(spec)  # deterministic: every rank builds the same blocks
        task = job_task(spec, data, out, args.resume)
        device = f"cuda:{torch.cuda.current_device()}" if gpu else "cpu"
        task.training = task.training.replace(device=device)
        dims = dataclasses.replace(task.dims, dp_replicate=-1)  # the job's layout; the rest is data parallel

        def make_runtime(model: torch.nn.Module, task_: object) -> Runtime:
            return parallel_runtime(model, dims=dims) if dist.get_world_size() > 1 else Runtime()

        result = run_task(task, make_runtime)
        if dist.get_rank() == 0:
            summary = finalize(spec, out, result.to_dict(), data, None, time.perf_counter() - t0,
                               extra={"launcher": "torchrun", "world_size": dist.get_world_size()},
                               parameters=parameter_counts(spec, len(data.tokenizer)))
            print(format_summary(summary))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
