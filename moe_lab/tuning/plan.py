"""How a sweep's trials are placed: what each asks Ray for, how many run at once, torch threads.

    from moe_lab.tuning import plan_trials
    plan = plan_trials(spec, spec.job, local=True, cluster_cpus=4)
    plan.resources, plan.max_concurrent_trials  # {"CPU": 0.5}, min(cores, spec.num_trials)

Plain data for ``tune.with_resources`` and the search algorithm's concurrency limit
(:mod:`moe_lab.orchestration.tune`). On a local machine 1-worker trials take 0.5 logical CPU
and one torch thread, and as many run at once as there are cores; a multi-worker trial's
driver takes 0.25 CPU and ``cores // num_workers`` of them run at once. On a cluster each
1-worker trial takes 1 CPU and the cluster's CPUs bound the concurrency. ``trial_resources``
and ``max_concurrent_trials`` in the spec win over all of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict

from ..jobs import JobSpec
from .spec import SweepSpec


@dataclass(frozen=True)
class TrialPlan:
    """How trials are placed: Tune resources per trial, concurrency, torch threads."""

    resources: Dict[str, float]
    max_concurrent_trials: int
    torch_threads: int
    num_workers: int  #: Ray Train workers of the largest trial (1: in-process trials)


def _max_workers(spec: SweepSpec, job: JobSpec) -> int:
    """Ray Train workers of the sweep's largest trial (the base job, its variants, the search space)."""
    workers = job.scaling.num_workers
    for overrides in spec.variants.values():
        value = overrides.get("scaling.num_workers")
        if isinstance(value, int) and not isinstance(value, bool):
            workers = max(workers, value)
    for d in spec.dimensions:
        if d.field == "scaling.num_workers":
            values = d.values if d.values else (d.low, d.high)
            workers = max([workers] + [int(v) for v in values if isinstance(v, (int, float))])
    return workers


def plan_trials(spec: SweepSpec, job: JobSpec, local: bool, cluster_cpus: float, cluster_gpus: float = 0.0) -> TrialPlan:
    """Size trial resources and ``max_concurrent_trials`` to the machine (explicit values win)."""
    r = spec.trial_resources
    cores = os.cpu_count() or 1
    workers = _max_workers(spec, job)
    if workers > 1:
        cpu = r.cpu or 0.25  # the trial only drives the TorchTrainer; its workers ask for their own
        threads = 1
        if local:
            concurrent = max(1, cores // workers)
        else:
            per_worker = job.scaling.cpus_per_worker or 1.0
            concurrent = max(1, int(cluster_cpus // (workers * per_worker + cpu)))
        resources = {"CPU": cpu}
    else:
        threads = r.torch_threads or (1 if local else max(1, int(r.cpu or 1)))
        cpu = r.cpu or (0.5 if local else 1.0)
        concurrent = max(1, cores // threads) if local else max(1, int(cluster_cpus // cpu))
        resources = {"CPU": cpu}
        if r.gpu:
            resources["GPU"] = r.gpu
            if cluster_gpus:
                concurrent = min(concurrent, max(1, int(cluster_gpus // r.gpu)))
    concurrent = spec.max_concurrent_trials or min(concurrent, spec.num_trials)
    return TrialPlan(resources=resources, max_concurrent_trials=concurrent, torch_threads=threads, num_workers=workers)
