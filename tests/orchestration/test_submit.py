"""Ray Jobs submission against a real head started on loopback with token auth."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner
from helpers import free_port

from moe_lab.cli import app

RAY = str(Path(sys.executable).with_name("ray"))
runner = CliRunner()


def _free_port() -> int:
    return free_port()


def _listening(port):
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def head():
    token = secrets.token_hex(16)
    gcs, dash, client, agent = _free_port(), _free_port(), _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="mlh", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--port", str(gcs), "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
         # the job agent's HTTP port too: its default (52365) is taken while another Ray cluster
         # runs on this machine (make test runs two), and jobs then never find an agent
         "--dashboard-agent-listen-port", str(agent),
         "--num-cpus", "4", "--disable-usage-stats", "--temp-dir", temp],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    from ray.job_submission import JobSubmissionClient

    while True:
        try:
            JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("the Ray head did not come up:\n" + (Path(temp) / "head.log").read_text()[-3000:])
            time.sleep(2)
    yield {"address": address, "token": token, "dashboard_port": dash}
    os.killpg(proc.pid, signal.SIGKILL)  # SIGTERM drains for 30 s; the head is throwaway
    proc.wait(30)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def test_dashboard_binds_loopback_only(head):
    addrs = _listening(head["dashboard_port"])
    assert addrs, "nothing listens on the dashboard port"
    assert all(a.startswith("127.0.0.1:") for a in addrs), addrs


def test_submit_without_token_is_refused(head, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))  # not the user's ~/.ray token
    monkeypatch.setenv("HOME", str(tmp_path))
    res = runner.invoke(app, ["jobs", "list", "--address", head["address"]])
    assert res.exit_code == 2
    assert "auth" in res.output.lower() and "Traceback" not in res.output


def test_submit_tiny_job_and_find_final_metrics(head, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LAB_TEST_TOKEN", head["token"])
    out = tmp_path / "out"
    args = ["submit", "jobs/default.yaml", "--address", head["address"], "--token-env", "MOE_LAB_TEST_TOKEN",
            "--set", "training.max_steps=3", "--set", "training.eval_steps=3", "--set", "training.logging_steps=1",
            "--set", "data.corpus_size_bytes=60000", "--set", "training.eval_samples=16",
            "--set", "analyze=false", "-o", str(out), "--wait"]
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output[-4000:]
    job_id = res.output.split("submitted ", 1)[1].split()[0]
    assert f"job {job_id}: SUCCEEDED" in res.output
    assert "final eval loss" in res.output and "unigram baseline" in res.output
    assert json.loads((out / "summary.json").read_text())["global_step"] == 3
    # the other job commands
    status = runner.invoke(app, ["jobs", "status", job_id, "--address", head["address"], "--token-env", "MOE_LAB_TEST_TOKEN"])
    assert status.exit_code == 0 and status.output.strip() == "SUCCEEDED"
    listed = runner.invoke(app, ["jobs", "list", "--address", head["address"], "--token-env", "MOE_LAB_TEST_TOKEN"])
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert any(r["id"] == job_id and r["job"] == "default" for r in rows)
    logs = runner.invoke(app, ["jobs", "logs", job_id, "--follow", "--address", head["address"],
                               "--token-env", "MOE_LAB_TEST_TOKEN"])
    assert logs.exit_code == 0 and "final eval loss" in logs.output
    stop = runner.invoke(app, ["jobs", "stop", job_id, "--address", head["address"], "--token-env", "MOE_LAB_TEST_TOKEN"])
    assert stop.exit_code == 0 and "not running" in stop.output


def test_bad_job_spec_fails_before_submission(head, monkeypatch):
    monkeypatch.setenv("MOE_LAB_TEST_TOKEN", head["token"])
    res = runner.invoke(app, ["submit", "jobs/default.yaml", "--address", head["address"], "--token-env",
                              "MOE_LAB_TEST_TOKEN", "--set", "model.num_expertz=4"])
    assert res.exit_code == 2 and "model.num_expertz: unknown field" in res.output
