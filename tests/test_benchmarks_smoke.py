"""The GPU benchmark scripts also run at tiny sizes on CPU (smoke tests; no timing asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_moe_layer_benchmark_tiny():
    out = _run("benchmarks/moe_layer.py", "--tiny", "--compare-hf")
    for name in ("dense SwiGLU", "transformers grouped_mm", "moe_lab eager (reference)", "moe_lab grouped"):
        assert name in out
    assert "0.0e+00" in out  # the grouped path equals the eager reference before timing


def test_train_step_benchmark_tiny():
    out = _run("benchmarks/train_step.py", "--tiny")
    assert "transformers Mixtral (grouped_mm)" in out and "moe_lab trainer (fast paths)" in out


@pytest.mark.slow
def test_gpu_decode_benchmark_tiny():
    out = _run("benchmarks/gpu_decode.py", "--tiny")
    assert "vs step-by-step argmax of the full forward: identical" in out
    assert "moe_lab / transformers" in out and "offload (half resident)" in out
