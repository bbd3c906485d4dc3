"""No writer outlives its driver: SIGKILL the process group of a running ``moe-lab train`` and
no checkpoint appears afterwards (the Ray Train worker watches the driver and exits)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = [
    "model.hidden_size=32", "model.num_layers=1", "model.num_attention_heads=2", "model.expert_hidden_size=32",
    "model.num_experts=4", "model.max_position_embeddings=32", "data.corpus_size_bytes=20000", "data.max_length=32",
    "data.num_proc=1", "training.max_steps=100000", "training.batch_size=4", "training.save_steps=1",
    "training.save_total_limit=100000", "training.eval_steps=100000", "training.logging_steps=1000", "analyze=false",
]


def _complete_checkpoints(ckpts: Path):
    return {p.name for p in ckpts.glob("step-*") if (p / "model.safetensors").exists()} if ckpts.is_dir() else set()


@pytest.mark.slow
def test_sigkill_of_the_driver_group_leaves_no_writer(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "moe_lab", "train", "-o", str(out)] + sum((["--set", s] for s in TINY), [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    ckpts = out / "checkpoints"
    try:
        deadline = time.time() + 300
        while len(_complete_checkpoints(ckpts)) < 2:  # it is writing a checkpoint every step
            assert proc.poll() is None, "the training run ended before it was killed"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)  # the worker notices within 0.1 s
    after_kill = _complete_checkpoints(ckpts)
    time.sleep(5.0)  # before the fix the worker kept writing for 2-4 s
    assert _complete_checkpoints(ckpts) == after_kill, "a checkpoint was written after the driver died"
