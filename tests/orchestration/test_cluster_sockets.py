"""What the embedded Ray cluster listens on (``ss -ltnp``): loopback where Ray allows it, and
nothing that answers HTTP (no unauthenticated Prometheus /metrics) on other interfaces."""

import re
import shutil
import socket
import subprocess

import pytest
import requests

from moe_lab.orchestration.cluster import init_ray, shutdown_ray

#: processes Ray 2.60 binds on every interface (gRPC only, token auth): see cluster.py's docstring
RAY_GRPC_PROCESSES = {"gcs_server", "raylet", "ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "python"}


def _cluster_sockets():
    import os

    import psutil

    me = os.getpid()
    ours = {p.pid for p in psutil.Process(me).children(recursive=True)} | {me}
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        pid = re.search(r"pid=(\d+)", line)
        name = re.search(r'\(\("([^"]+)"', line)
        if pid and name and int(pid.group(1)) in ours:
            addr, _, port = line.split()[3].rpartition(":")
            found.append((addr.strip("[]"), int(port), name.group(1)))
    return found


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss")
def test_embedded_cluster_binds_loopback_or_grpc_only():
    before = set(_cluster_sockets())  # this test process's own (earlier tests may have left some)
    init_ray(num_cpus=2, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        sockets = [s for s in _cluster_sockets() if s not in before]
        assert sockets, "ss found none of the cluster's sockets"
        loopback = [s for s in sockets if s[0] in ("127.0.0.1", "::1")]
        others = [s for s in sockets if s not in loopback]
        assert any(port == 8265 or name == "python" for _, port, name in loopback), loopback  # the dashboard
        unexpected = [s for s in others if not any(s[2].startswith(p[:15]) for p in RAY_GRPC_PROCESSES)]
        assert not unexpected, f"sockets on other interfaces beyond Ray's gRPC servers: {unexpected}"
        external = socket.gethostbyname(socket.gethostname())
        for addr, port, name in others:
            host = external if addr in ("*", "0.0.0.0", "::") else addr
            try:
                r = requests.get(f"http://{host}:{port}/metrics", timeout=2)
            except requests.RequestException:
                continue  # not HTTP: a gRPC server refuses the request
            assert r.status_code != 200 or "# TYPE" not in r.text, f"{name} serves /metrics on {addr}:{port}"
    finally:
        shutdown_ray()
