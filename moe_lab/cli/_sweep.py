"""``moe-lab sweep``: Ray Tune sweeps over job fields (see :mod:`moe_lab.tuning`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ._app import app, fail, user_errors

_SET_HELP = (
    "Override a sweep field (num_samples=4, scheduler.grace_period=50), a base-job field "
    "(training.max_steps=100), a search-space entry ('search_space.model.router_type={choice: [top_k]}') "
    "or a variant's field (variants.NAME.model.num_shared_experts=1). Repeatable."
)
_ADDRESS_HELP = "Join this Ray cluster (e.g. auto, ray://host:10001); default: an embedded local cluster."


@app.command()
@user_errors
def sweep(
    sweep_file: Annotated[Optional[Path], typer.Argument(help="Sweep spec YAML, e.g. jobs/sweep_routers.yaml.")] = None,
    set_: Annotated[Optional[List[str]], typer.Option("--set", help=_SET_HELP)] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Resume the interrupted sweep in this directory.")
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="With --resume: run failed trials again.")
    ] = False,
    address: Annotated[Optional[str], typer.Option("--address", help=_ADDRESS_HELP)] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No Tune progress output (the final table is still printed).")
    ] = False,
) -> None:
    """Sweep router types, loss coefficients and any other job field with Ray Tune (ASHA on eval loss).

    Writes results.csv, best.yaml (train it with `moe-lab train best.yaml`) and
    router_comparison.png into OUTPUT_DIR/NAME, and balancing_study.png/.csv for a spec with
    `report: balancing` (jobs/sweep_balancing.yaml). Ctrl-C stops the sweep; `--resume DIR` continues it.
    """
    from ..orchestration.cluster import shutdown_ray
    from ..tuning import load_sweep, open_sweep_directory, print_balancing_table, print_results_table

    if (sweep_file is None) == (resume is None):
        raise fail("give either a sweep file (moe-lab sweep SWEEP.yaml) or --resume DIR")
    if resume is not None and set_:
        raise fail("--set cannot change a sweep being resumed; start a new sweep instead")
    if retry_failed and resume is None:
        raise fail("--retry-failed only applies with --resume DIR")
    # validated before Ray is imported (a bad spec or directory exits 2 at once)
    spec = load_sweep(sweep_file, set_ or []) if sweep_file is not None else None
    if resume is not None:
        open_sweep_directory(resume)
    from ..orchestration.tune import resume_sweep, run_sweep

    try:
        if spec is not None:
            result = run_sweep(spec, address=address, verbose=0 if quiet else 1)
        else:
            result = resume_sweep(resume, address=address, retry_failed=retry_failed, verbose=0 if quiet else 1)
    finally:
        shutdown_ray()
    if quiet:
        print_results_table(result)
        if result.study:
            print_balancing_table(result.study, title=f"balancing study {result.directory.name}: one row per variant")
    typer.echo(f"results: {result.results_csv}")
    if result.plot_path is not None:
        typer.echo(f"{'variant' if result.variants else 'router'} comparison: {result.plot_path}")
    if result.study_plot_path is not None:
        typer.echo(f"balancing study: {result.study_plot_path} (numbers: {result.study_plot_path.with_suffix('.csv')})")
    if result.best_job_path is not None:
        best = result.best or {}
        typer.echo(f"best: trial {best.get('trial_id')} {result.metric}={best.get(result.metric):.4f}; "
                   f"train it with: moe-lab train {result.best_job_path}")
    typer.echo(f"{len(result.rows)} trials, {result.num_errors} failed, {result.elapsed_seconds:.0f}s")
    if result.interrupted:
        typer.secho(f"interrupted: resume with `moe-lab sweep --resume {result.directory}`", err=True)
        raise typer.Exit(130)
    if result.best is None:
        typer.secho("no trial reported a result (see the error column)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
