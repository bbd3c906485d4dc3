"""`moe-lab serve`: user errors exit 2 before Ray starts; a real server answers and stops cleanly."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch
import yaml
from typer.testing import CliRunner
from helpers import free_port

from moe_lab import MoEModel
from moe_lab.cli import app
from moe_lab.data import ByteTokenizer
from moe_lab.checkpoint import write_checkpoint

runner = CliRunner()


def _free_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-cli") / "model"
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = MoEModel(vocab_size=len(tok), hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     expert_hidden_size=32, max_position_embeddings=64, dropout=0.0)
    write_checkpoint(path, model.config, model.state_dict(), tokenizer=tok)
    return path


@pytest.mark.parametrize(
    "args, match",
    [
        ([], "give a CHECKPOINT directory (or a --config FILE that sets checkpoint)"),
        (["CKPT", "--config", "x.yaml"], "serve config file not found: x.yaml"),
        (["/nonexistent/ckpt"], "is not a checkpoint directory"),
        (["CKPT", "--replicas", "0"], "--replicas: "),
        (["CKPT", "--set", "max_batch_size=0"], "--set max_batch_size: "),
        (["CKPT", "--set", "max_batch=3"], "--set max_batch: unknown key; did you mean max_batch_size?"),
        (["CKPT", "--set", "num_replicas=2", "--replicas", "3"], "--set num_replicas: also given as --replicas"),
        (["CKPT", "--max-batch-size", "8"], "No such option: --max-batch-size"),  # no flag per field: --set
        (["CKPT", "--api-key-env", "MOE_LAB_SURELY_UNSET_VAR"], "MOE_LAB_SURELY_UNSET_VAR is not set"),
        (["--config", "/nonexistent/serve.yaml"], "serve config file not found"),
    ],
)
def test_user_errors_exit_2(ckpt, args, match):
    args = [str(ckpt) if a == "CKPT" else a for a in args]
    res = runner.invoke(app, ["serve", *args])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output


def test_port_in_use_and_config_file_errors(ckpt, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = runner.invoke(app, ["serve", str(ckpt), "--port", str(port)])
    assert res.exit_code == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in res.output
    # --config takes ServeArgs fields; a Ray Serve config file is refused with a pointer to `serve run`
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "http_options": {"port": 8123},
        "applications": [{"name": "a", "route_prefix": "/", "import_path": "moe_lab.orchestration.serve:app_builder",
                          "args": {"checkpoint": str(ckpt)}}],
    }))
    res = runner.invoke(app, ["serve", "--config", str(cfg)])
    assert res.exit_code == 2 and "is a Ray Serve config file" in res.output and "serve run" in res.output
    # a bad key or value in the file names the file and the key
    cfg.write_text(yaml.safe_dump({"checkpoint": str(ckpt), "max_batch": 4}))
    res = runner.invoke(app, ["serve", "--config", str(cfg)])
    assert res.exit_code == 2 and f"{cfg}: max_batch: unknown key; did you mean max_batch_size?" in res.output
    cfg.write_text(yaml.safe_dump({"checkpoint": str(ckpt), "request_timeout_s": 0}))
    res = runner.invoke(app, ["serve", "--config", str(cfg)])
    assert res.exit_code == 2 and f"{cfg}: request_timeout_s: Input should be greater than 0" in res.output
    assert "Traceback" not in res.output


class _Server:
    """A `moe-lab serve` subprocess whose output is collected by a reader thread."""

    def __init__(self, cmd):
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "MOE_LAB_CLI_TEST_KEY": "k3y"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_ready(self, port, timeout=150):
        """Until the CLI says it is serving (it prints that once the app runs) and /healthz answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early ({self.proc.returncode}): {self.output[-3000:]}")
            if "serving at" in self.output:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.5)
        self.kill()
        raise AssertionError(f"server did not come up in {timeout}s: {self.output[-3000:]}")

    def stop(self, sig, timeout=90):
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.reader.join(timeout=10)
        return self.output

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.mark.slow
def test_real_server_from_config_file_answers_then_drains_on_sigterm(ckpt, tmp_path):
    # one real server for the whole path (a server costs a Ray cluster and a replica start):
    # config file + flags, auth, the model name, then SIGTERM drains and stops it
    port = _free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"checkpoint": str(ckpt), "num_cpus_per_replica": 0.5, "model_name": "tiny"}))
    server = _Server([sys.executable, "-m", "moe_lab", "serve", "--config", str(cfg), "--port", str(port),
                      "--api-key-env", "MOE_LAB_CLI_TEST_KEY", "--set", "max_tokens_limit=16"])
    server.wait_ready(port)
    try:
        auth = {"Authorization": "Bearer k3y"}
        models = requests.get(f"http://127.0.0.1:{port}/v1/models", headers=auth, timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "tiny", "prompt": "12 + 5 =", "max_tokens": 8, "temperature": 0}
        assert requests.post(url, json=body, timeout=60).status_code == 401
        r = requests.post(url, json=body, headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        too_long = requests.post(url, json={**body, "max_tokens": 17}, headers=auth, timeout=60)
        assert too_long.status_code == 400 and "max_tokens" in too_long.text  # the --set limit applies
    finally:
        out = server.stop(signal.SIGTERM)
    assert server.proc.returncode == 0 and "SIGTERM: shutting down" in out, out[-3000:]
    assert "serving at http://127.0.0.1:" in out and out.rstrip().endswith("stopped"), out[-3000:]
    assert "SIGTERM: draining (new requests get 503)" in out and "drained in " in out, out[-3000:]
    # the default max_experts_in_memory: auto, and the residency it chose is printed at start-up
    assert "max_experts_in_memory='auto': 4 of 4 experts per MoE layer on cpu (all experts resident)" in out, out
    assert "Started Serve" not in out  # quiet: no INFO chatter
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the proxy is gone


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_block_until_signal_names_the_signal_and_restores_the_handlers(sig):
    # what `moe-lab serve` waits in: Ctrl-C (SIGINT) stops at once, SIGTERM drains first
    from moe_lab.orchestration.serve import block_until_signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    timer = threading.Timer(0.3, os.kill, (os.getpid(), sig))
    timer.start()
    try:
        assert block_until_signal() == sig.name
    finally:
        timer.cancel()
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_replica_failing_at_start_up_is_one_line_and_exit_2(ckpt):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the replica asks for cuda:0)")
    port = _free_port()
    cmd = [sys.executable, "-m", "moe_lab", "serve", str(ckpt), "--port", str(port), "--device", "cuda:0",
           "--set", "num_cpus_per_replica=0.5", "--set", "replica_start_attempts=1"]
    server = _Server(cmd)
    try:
        server.proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        server.kill()
        raise
    server.reader.join(timeout=10)
    out = server.output
    assert server.proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "Failed to update the deployments" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "device_map='cuda:0' but CUDA is not available on this machine" in last, out[-3000:]
