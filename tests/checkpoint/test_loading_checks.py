"""Loading checks before it allocates (issue 19): broken or absurd checkpoints are refused with a
clear CheckpointError within 5 s and under 1 GB, by every loader and by ``moe-lab evaluate``.

The cases run in one child Python process, which imports torch and moe_lab first (not timed),
then caps its address space at what it holds plus 1 GiB (``RLIMIT_AS``: a load that tried
to allocate gigabytes fails there instead of swamping the machine), times the loads with
``time.perf_counter`` and reports its peak resident memory (``ru_maxrss``) and its resident
memory before the loads. The loads' memory is the peak minus that (an upper bound), and each
case's is how far it raised the peak: the
imports alone can hold over 1 GB (a CUDA build of torch maps its libraries), so the absolute
peak is checked only against a looser bound.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_lab import MoEModel
from moe_lab.checkpoint import write_checkpoint
from moe_lab.data import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]
MAX_SECONDS = 5.0
MAX_LOAD_BYTES = 1 << 30  #: what the loads may add to the process's resident memory
MAX_RSS = 3 << 30  #: the whole child, imports included

_CHILD = r"""
import json, resource, sys, time
import torch
import moe_lab
from moe_lab.checkpoint import Checkpoint, load_pretrained_moe
from moe_lab.errors import CheckpointError
from moe_lab.inference import OptimizedMoEModel

status = open("/proc/self/status").read()
vm = int(status.split("VmSize:")[1].split()[0]) * 1024
rss_before = int(status.split("VmRSS:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
loaders = {
    "load_pretrained_moe": lambda p: load_pretrained_moe(p),
    "Checkpoint.build_model": lambda p: Checkpoint.open(p, dropout=0.0).build_model(),
    "OptimizedMoEModel": lambda p: OptimizedMoEModel(p, device_map="cpu", max_experts_in_memory=2),
}
report = {}
for path in sys.argv[1:]:  # one child for every case: torch is imported once
    out = {}
    rss_case = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for name, load in loaders.items():
        start = time.perf_counter()
        try:
            load(path)
            result = {"error": None}
        except CheckpointError as exc:
            result = {"type": "CheckpointError", "error": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails on it
            result = {"type": type(exc).__name__, "error": repr(exc)[:2000]}
        result["seconds"] = time.perf_counter() - start
        out[name] = result
    out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["load_bytes"] = out["maxrss_bytes"] - rss_before  # the peak so far, over what the imports took
    out["case_bytes"] = out["maxrss_bytes"] - rss_case  # how far this case raised the peak
    report[path] = out
print(json.dumps(report))
"""


def _tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = MoEModel(vocab_size=len(tok), hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=4,
                     experts_per_token=2, expert_hidden_size=32, max_position_embeddings=64, dropout=0.0)
    return write_checkpoint(path, model.config, model.state_dict(), tokenizer=tok)


def _header(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


# ---- the broken checkpoints -------------------------------------------------------------


def _truncate_weights(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _flip_header_brace(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[8] ^= 0x01  # "{" -> "z": the header is no longer JSON
    w.write_bytes(bytes(raw))


def _flip_length_byte(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[5] ^= 0x40  # the header length becomes ~2^46
    w.write_bytes(bytes(raw))


def _flip_shape_digit(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    raw = w.read_bytes()
    n, header, data = _header(raw)
    header["embed_tokens.weight"]["shape"] = [259, 320]  # the bytes no longer match the shape
    w.write_bytes(_with_header(header, data))


def _header_length_2_62(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(struct.pack("<Q", 2**62) + raw[8:])


def _offsets_past_the_end(ckpt: Path) -> None:
    w = ckpt / "model.safetensors"
    _, header, data = _header(w.read_bytes())
    begin, end = header["norm.weight"]["data_offsets"]
    header["norm.weight"]["data_offsets"] = [begin + len(data), end + len(data)]
    w.write_bytes(_with_header(header, data))


def _config(**fields):
    def edit(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.update(fields)
        (ckpt / "config.json").write_text(json.dumps(cfg))

    return edit


def _non_json_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("hidden_size: 32\nnum_layers: 2\n")


CASES = {
    "half-truncated-weights": (_truncate_weights, "truncated"),
    "flipped-header-brace": (_flip_header_brace, "header is not valid JSON"),
    "flipped-header-length-byte": (_flip_length_byte, "header length is"),
    "shape-not-matching-bytes": (_flip_shape_digit, "needs 331520 bytes"),
    "header-length-2^62": (_header_length_2_62, f"header length is {2**62} bytes"),
    "offsets-past-the-end": (_offsets_past_the_end, "'norm.weight' ends at byte"),
    "num_experts-100000": (_config(num_experts=100000), "num_experts = 100000"),
    "hidden_size--128": (_config(hidden_size=-128), "hidden_size = -128"),
    "hidden_size-65536": (_config(hidden_size=65536), "hidden_size is 65536 in config.json but 32 in the weights"),
    "vocab_size-1e9-float": (_config(vocab_size=1e9), "vocab_size = 1000000000.0: expected an integer"),
    "vocab_size-1e9-int": (_config(vocab_size=10**9), "vocab_size is 1000000000 in config.json but 259"),
    "num_layers-10^7": (_config(num_layers=10**7), "num_layers is 10000000"),
    "unknown-field": (_config(hiden_size=32), "hiden_size: unknown field"),
    "non-JSON-config": (_non_json_config, "config.json is not valid JSON"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return _tiny_checkpoint(tmp_path_factory.mktemp("good") / "model")


def _broken(tmp_path: Path, good: Path, case: str) -> Path:
    import shutil

    path = tmp_path / case
    shutil.copytree(good, path)
    CASES[case][0](path)
    return path


@pytest.fixture(scope="module")
def child_report(tmp_path_factory, good):
    """Every case (and the intact checkpoint, first) loaded by one child process under the
    address-space cap: {case: what each loader did}."""
    root = tmp_path_factory.mktemp("broken")
    paths = {"intact": good, **{case: _broken(root, good, case) for case in sorted(CASES)}}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths.values())], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {case: report[str(path)] for case, path in paths.items()}


def test_the_intact_checkpoint_loads_in_the_child(child_report):
    out = child_report["intact"]
    for name in ("load_pretrained_moe", "Checkpoint.build_model", "OptimizedMoEModel"):
        assert out[name]["error"] is None, out[name]
        assert out[name]["seconds"] < MAX_SECONDS, out[name]
    assert out["load_bytes"] < MAX_LOAD_BYTES and out["maxrss_bytes"] < MAX_RSS, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_clearly_fast_and_small(child_report, case):
    out = child_report[case]
    needle = CASES[case][1]
    for name in ("load_pretrained_moe", "Checkpoint.build_model", "OptimizedMoEModel"):
        result = out[name]
        assert result.get("type") == "CheckpointError", (name, result)
        assert needle in result["error"], (name, result["error"])
        assert "\n" not in result["error"], (name, result["error"])  # one line
        assert result["seconds"] < MAX_SECONDS, (name, result)
    assert out["case_bytes"] < MAX_LOAD_BYTES, out
    assert out["load_bytes"] < MAX_LOAD_BYTES and out["maxrss_bytes"] < MAX_RSS, out


@pytest.mark.parametrize("case", ["hidden_size-65536", "half-truncated-weights", "vocab_size-1e9-float"])
def test_moe_lab_evaluate_exits_2_with_one_line(tmp_path, good, case):
    path = _broken(tmp_path, good, case)
    proc = subprocess.run([sys.executable, "-m", "moe_lab", "evaluate", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert CASES[case][1] in lines[0] and "Traceback" not in proc.stderr
