"""benchmarks/titan_peer.py (torchtitan as a benchmark peer) runs at a tiny size on CPU.

Skipped where torchtitan is not installed: it is a benchmark-only package, not a moe_lab
dependency. torchtitan's model package imports triton, so that is needed too.
"""

import inspect
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torchtitan")
pytest.importorskip("triton")


@pytest.mark.slow
def test_titan_peer_tiny_runs_torchtitan_train_step_and_moe_layer():
    proc = subprocess.run([sys.executable, "benchmarks/titan_peer.py", "--tiny"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # torchtitan's single-GPU settings are the ones applied: FSDP2 mixed precision at degree 1,
    # its chunked loss, clipping; on CPU no compile and no CUDA graph
    settings = re.search(r"^\[titan_peer\] torchtitan train step: (.*)$", out, re.MULTILINE)
    assert settings, out
    for part in ("FSDP2 True (param torch.bfloat16, reduce torch.float32)", "ChunkedLossWrapper(8 chunks)",
                 "clip 1.0", "CUDA graph of fwd+bwd False", "blocks compiled 0/2"):
        assert part in settings.group(1), settings.group(1)
    train = re.search(r"^train \(cuda_graph=False\): .* loss (\S+)$", out, re.MULTILINE)
    assert train, out
    # a fresh model's loss over a 256-token vocabulary is about ln(256) = 5.55 when the summed
    # cross-entropy is divided by the count of valid tokens (a wrong normaliser, a NaN or a
    # model that does not train lands far from it)
    assert abs(float(train.group(1)) - math.log(256)) < 0.6, train.group(0)
    layer = re.search(r"^moe layer \(64, 32, 64, 4, 2\): (\S+) ms, .*\(compiled False\)$", out, re.MULTILINE)
    assert layer and float(layer.group(1)) > 0, out
    # the shims are applied by feature test: the CPU ones here, the torch-version ones only
    # where this torch lacks the feature
    import torch.distributed.fsdp
    from torch.nn.attention.flex_attention import create_block_mask

    shims = re.search(r"^shims used: (.*)$", out, re.MULTILINE).group(1)
    assert "CPU: torchtitan mesh device type cpu" in shims, shims
    assert ("DataParallelMeshDims" in shims) == (not hasattr(torch.distributed.fsdp, "DataParallelMeshDims")), shims
    has_arg = "separate_full_blocks" in inspect.signature(create_block_mask).parameters
    assert ("separate_full_blocks" in shims) == (not has_arg), shims
