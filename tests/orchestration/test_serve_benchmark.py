"""benchmarks/serve_load.py runs end to end in its smoke mode (its own Ray cluster; no timing asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_load_benchmark_smoke():
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/serve_load.py"), "--tiny"], capture_output=True,
                          text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for text in ("direct complete()", "serve, sequential", "concurrent", "Serve overhead at p50"):
        assert text in proc.stdout, proc.stdout
