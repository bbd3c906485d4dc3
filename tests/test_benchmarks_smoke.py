"""The GPU benchmark scripts also run at tiny sizes on CPU (smoke tests; no timing asserted)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# printed by benchmarks/moe_layer.py before timing, once per fast path and shape
CHECK_LINE = re.compile(
    r"^check (?P<shape>\([\d, ]+\)) (?P<path>.+?) vs moe_lab eager: "
    r"max abs err = (?P<max_abs>\S+), rel err = (?P<rel>\S+)$",
    re.MULTILINE,
)


def test_moe_layer_benchmark_tiny():
    out = _run("benchmarks/moe_layer.py", "--tiny", "--compare-hf")
    for name in ("dense SwiGLU", "transformers grouped_mm", "moe_lab eager (reference)", "moe_lab grouped"):
        assert name in out
    checks = [m.groupdict() for m in CHECK_LINE.finditer(out)]
    # --tiny on CPU: one shape, and no compiled path (compile is on CUDA only by default)
    assert [(c["shape"], c["path"]) for c in checks] == [("(64, 32, 64, 4, 2)", "moe_lab grouped")], out
    # the grouped path equals the eager reference (fp32 on CPU) before anything is timed
    assert float(checks[0]["max_abs"]) <= 1e-5, checks[0]
    assert float(checks[0]["rel"]) <= 1e-5, checks[0]


def test_moe_layer_check_line_parses_what_the_benchmark_prints():
    # the regex above reads _check's own output (a NaN or a large error does not pass)
    import contextlib
    import importlib.util
    import io

    import torch

    spec = importlib.util.spec_from_file_location("bench_moe_layer", ROOT / "benchmarks" / "moe_layer.py")
    moe_layer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moe_layer)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        moe_layer._check((8, 4, 4, 2, 1), "moe_lab grouped", torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]))
    m = CHECK_LINE.fullmatch(buf.getvalue().strip())
    assert m and m["shape"] == "(8, 4, 4, 2, 1)" and m["path"] == "moe_lab grouped"
    assert float(m["max_abs"]) == 0.5 and float(m["rel"]) == pytest.approx(0.5 / 5**0.5, rel=5e-2)  # printed with 2 significant digits


def test_train_step_benchmark_tiny():
    out = _run("benchmarks/train_step.py", "--tiny")
    assert "transformers Mixtral (grouped_mm)" in out and "moe_lab trainer (fast paths, chunked CE)" in out


@pytest.mark.slow
def test_gpu_decode_benchmark_tiny():
    out = _run("benchmarks/gpu_decode.py", "--tiny")
    assert "engine (fp32, eager) vs step-by-step argmax of the full forward: identical" in out
    for row in ("moe_lab engine, all experts resident (eager)", "4 concurrent streams",
                "transformers Mixtral generate (default cache)"):
        assert row in out, out
    assert "batch 8: moe_lab engine / transformers =" in out and "offload (half resident)" in out
    assert re.search(r"4/8 experts resident \(hit rate [\d.]+, \d+ misses\)", out), out


def test_loss_parity_benchmark_tiny():
    # the chunked linear + cross-entropy (the one fast path that runs on CPU) is judged against
    # the eager reference; a wrong chunked loss fails its first-step check and the script exits 1
    out = _run("benchmarks/loss_parity.py", "--tiny")
    verdicts = dict(re.findall(r"^(chunked CE, eager layers)\s+\S+\s+\S+\s+(PASS|FAIL)$", out, re.MULTILINE))
    assert verdicts == {"chunked CE, eager layers": "PASS"}, out
    assert "bf16 noise" in out
