"""The inference benchmarks run end to end in their smoke mode (no timing is asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "script, expect",
    [
        ("benchmarks/decode.py", ["decode tokens/s", "batch 1", "batch 8", "optimized, 2 experts"]),
        ("benchmarks/expert_cache.py", ["usage_based vs plain LRU", "lru      none", "lfu      usage_based"]),
    ],
)
def test_benchmark_smoke(script, expect):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), "--tiny"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in expect:
        assert text in proc.stdout, proc.stdout
