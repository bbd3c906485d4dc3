"""benchmarks/memory_scaling.py at a tiny size on CPU: FSDP over 2 gloo ranks holds at most
1.15 x half of one process's parameter, gradient and AdamW bytes plus the unsharded remainder,
and the target check rejects what is not sharded."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory_scaling", ROOT / "benchmarks" / "memory_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_target_and_remainder():
    bench = _bench()
    single = 1_000_000
    assert bench.meets_target(single // 2, single, 2, 0)
    assert bench.meets_target(int(1.15 * single / 2) + 100, single, 2, 100)
    assert not bench.meets_target(int(1.15 * single / 2) + 101, single, 2, 100)
    assert not bench.meets_target(single, single, 2, 1000)  # a rank holding everything fails
    cfg = bench.cpu_config(True)
    # every dim 0 of the tiny model divides by 2 and 4 but vocab 97 does not: embedding and LM
    # head [97, 32] pad to 49 rows at 2 ranks, 4 copies (parameter, gradient, two moments) of
    # half a row each, fp32
    assert bench.remainder_bytes(cfg, 2)["padding"] == 0
    assert bench.remainder_bytes(cfg.replace(vocab_size=97), 2)["padding"] == 2 * 4 * (32 // 2) * 4
    rem = bench.remainder_bytes(cfg, 4)
    assert rem["buffers"] == (32 // 4 // 2) * 4  # RoPE inv_freq: head_dim / 2 fp32 values
    assert rem["total"] == rem["buffers"] + rem["steps"] + rem["padding"]


@pytest.mark.slow
def test_fsdp_two_ranks_meet_the_target(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "benchmarks/memory_scaling.py", "--tiny", "--ranks", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["ranks"]: r for r in json.loads(out.read_text())}
    assert sorted(rows) == [1, 2]
    one, two = rows[1], rows[2]
    assert one["single"] == one["params"] + one["grads"] + one["optimizer"] > 0
    assert two["per_rank"] <= two["target"], two
    assert two["per_rank"] <= 0.6 * one["single"], two  # really sharded, not replicated
    for kind in ("params", "grads", "optimizer"):  # each kind is halved
        assert two[kind] <= 0.55 * one[kind], (kind, two[kind], one[kind])
    assert two["pass"] and "FAIL" not in proc.stdout
    assert any(line.split()[:1] == ["2"] and line.endswith("PASS") for line in proc.stdout.splitlines()), proc.stdout
