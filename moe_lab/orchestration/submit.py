"""Send jobs to a Ray cluster through the Ray Jobs API.

    job_id = submit_job("jobs/default.yaml", address="http://head:8265", overrides=["training.max_steps=50"])
    wait_for_job(address, job_id)        # -> "SUCCEEDED"
    print(job_logs(address, job_id))

The job spec is validated here first (bad specs fail before anything is sent), written
into a small working directory that Ray uploads (``runtime_env.working_dir``), and run on
the cluster as ``python -m moe_lab train job.yaml``. ``python`` defaults to this
interpreter, which is right for a local head; pass the cluster's interpreter otherwise.

Token authentication (Ray >= 2.52): the token comes from ``token=``, else the environment
variable ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``,
and is sent as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ..errors import DistributedError
from ..jobs import load_job

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def auth_token(token: Optional[str] = None) -> Optional[str]:
    """The Ray auth token from the argument, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path)] if path else [Path.home() / ".ray" / "auth_token"]
    for p in candidates:
        if p.is_file():
            text = p.read_text().strip()
            if text:
                return text
    return None


def job_client(address: Optional[str] = None, token: Optional[str] = None) -> Any:
    """A JobSubmissionClient for ``address`` with the auth header when a token is available."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    tok = auth_token(token)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # connection refused, auth failures, bad addresses
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = "" if tok else " (no auth token found: set RAY_AUTH_TOKEN or create ~/.ray/auth_token)"
        raise DistributedError(f"cannot reach the Ray Jobs API at {address}: {msg}{hint}") from None


#: how long a submission waits for a freshly started head's job agent
AGENT_WAIT_S = 60.0


def submit_job(
    job_path: Optional[str | os.PathLike],
    address: Optional[str] = None,
    overrides: Sequence[str] = (),
    python: Optional[str] = None,
    output_dir: Optional[str] = None,
    token: Optional[str] = None,
    extra_env: Optional[Dict[str, str]] = None,
) -> str:
    """Validate the job, upload it, start it; returns the submission id."""
    spec = load_job(job_path, overrides)
    client = job_client(address, token)
    workdir = Path(tempfile.mkdtemp(prefix="moe-lab-submit-"))
    spec.to_yaml(workdir / "job.yaml")
    entry = f"{python or sys.executable} -m moe_lab train job.yaml"
    if output_dir:
        entry += f" --output-dir {output_dir}"
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    # a head that has just started answers 500 "No available agent" until its dashboard agent
    # registers: that one error is retried for a while, every other one fails at once
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entry,
                runtime_env={"working_dir": str(workdir), "env_vars": env},
                metadata={"moe_lab_job": spec.name},
            )
        except Exception as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise DistributedError(f"job submission to {address or DEFAULT_ADDRESS} failed: {exc}") from None


def job_status(address: Optional[str], job_id: str, token: Optional[str] = None) -> str:
    client = job_client(address, token)
    try:
        return str(client.get_job_status(job_id).value)
    except Exception as exc:
        raise DistributedError(f"no job {job_id!r} at {address or DEFAULT_ADDRESS}: {exc}") from None


def wait_for_job(address: Optional[str], job_id: str, timeout_s: float = 3600, poll_s: float = 2.0,
                 token: Optional[str] = None) -> str:
    """Poll until the job ends; returns SUCCEEDED, FAILED or STOPPED."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_status(address, job_id, token)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise DistributedError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def job_logs(address: Optional[str], job_id: str, token: Optional[str] = None) -> str:
    client = job_client(address, token)
    try:
        return client.get_job_logs(job_id)
    except Exception as exc:
        raise DistributedError(f"cannot read the logs of job {job_id!r}: {exc}") from None


def follow_logs(address: Optional[str], job_id: str, token: Optional[str] = None) -> Iterator[str]:
    """Yield log chunks as the job writes them, until it ends."""
    client = job_client(address, token)
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                chunk = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def list_jobs(address: Optional[str], token: Optional[str] = None) -> List[Dict[str, Any]]:
    client = job_client(address, token)
    rows = []
    for j in client.list_jobs():
        rows.append({
            "id": j.submission_id or j.job_id,
            "status": str(j.status.value if hasattr(j.status, "value") else j.status),
            "entrypoint": j.entrypoint,
            "start_time": j.start_time,
            "end_time": j.end_time,
            "job": (j.metadata or {}).get("moe_lab_job"),
        })
    return rows


def stop_job(address: Optional[str], job_id: str, token: Optional[str] = None) -> bool:
    client = job_client(address, token)
    try:
        return bool(client.stop_job(job_id))
    except Exception as exc:
        raise DistributedError(f"cannot stop job {job_id!r}: {exc}") from None
