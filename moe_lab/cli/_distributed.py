"""``moe-lab submit`` and ``moe-lab jobs ...``: jobs on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import SetOption, app, fail, user_errors

AddressOption = Annotated[
    str, typer.Option("--address", help="Ray dashboard / Jobs API address, e.g. http://HOST:8265.",
                      envvar="RAY_API_SERVER_ADDRESS")
]
TokenEnvOption = Annotated[
    Optional[str], typer.Option("--token-env", help="Read the Ray auth token from this environment variable "
                                "(default: RAY_AUTH_TOKEN, then ~/.ray/auth_token).")
]


def _token(token_env: Optional[str]) -> Optional[str]:
    import os

    if token_env is None:
        return None
    value = os.environ.get(token_env)
    if not value:
        raise fail(f"--token-env {token_env}: the environment variable is not set")
    return value


@app.command()
@user_errors
def submit(
    job: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    address: AddressOption = "http://127.0.0.1:8265",
    set_: SetOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to end and print its logs.")] = False,
    python: Annotated[Optional[str], typer.Option("--python", help="Interpreter on the cluster (default: this one).")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Output directory on the cluster.")] = None,
    token_env: TokenEnvOption = None,
) -> None:
    """Submit a training job to a Ray cluster (Ray Jobs API)."""
    from ..orchestration import submit as sub

    token = _token(token_env)
    job_id = sub.submit_job(job, address, set_ or [], python=python, output_dir=output_dir, token=token)
    typer.echo(f"submitted {job_id} to {address}")
    if wait:
        status = sub.wait_for_job(address, job_id, token=token)
        typer.echo(sub.job_logs(address, job_id, token=token))
        typer.echo(f"job {job_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)


jobs_app = typer.Typer(help="List, inspect, follow and stop jobs on a Ray cluster.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
@user_errors
def jobs_list(address: AddressOption = "http://127.0.0.1:8265", token_env: TokenEnvOption = None) -> None:
    """List the cluster's jobs (JSON lines)."""
    from ..orchestration import submit as sub

    for row in sub.list_jobs(address, _token(token_env)):
        typer.echo(json.dumps(row))


@jobs_app.command("status")
@user_errors
def jobs_status(job_id: str, address: AddressOption = "http://127.0.0.1:8265", token_env: TokenEnvOption = None) -> None:
    """Print a job's status."""
    from ..orchestration import submit as sub

    typer.echo(sub.job_status(address, job_id, _token(token_env)))


@jobs_app.command("logs")
@user_errors
def jobs_logs(
    job_id: str,
    address: AddressOption = "http://127.0.0.1:8265",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the logs until the job ends.")] = False,
    token_env: TokenEnvOption = None,
) -> None:
    """Print (or follow) a job's logs."""
    from ..orchestration import submit as sub

    token = _token(token_env)
    if follow:
        for chunk in sub.follow_logs(address, job_id, token):
            typer.echo(chunk, nl=False)
    else:
        typer.echo(sub.job_logs(address, job_id, token), nl=False)


@jobs_app.command("stop")
@user_errors
def jobs_stop(job_id: str, address: AddressOption = "http://127.0.0.1:8265", token_env: TokenEnvOption = None) -> None:
    """Stop a running job."""
    from ..orchestration import submit as sub

    stopped = sub.stop_job(address, job_id, _token(token_env))
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'not running'}")
