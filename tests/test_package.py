import subprocess
import sys

import pytest
from typer.testing import CliRunner

import moe_lab

CORE_NAMES = [
    "MoEModel", "MoEConfig", "TrainingConfig", "MoEError", "RouterError", "ExpertError", "DistributedError",
    "ConfigError", "RouterType", "ActivationType", "TopKRouter", "SwitchRouter", "ExpertChoiceRouter",
    "FeedForwardExpert", "GLUExpert", "ExpertWeights", "RoutingInfo", "ExpertOutputs", "TrainingMetrics",
    "DEFAULT_HIDDEN_SIZE", "DEFAULT_NUM_EXPERTS", "DEFAULT_EXPERTS_PER_TOKEN", "MAX_EXPERTS_SUPPORTED",
    "ExpertParallelism",
]


@pytest.mark.parametrize("name", CORE_NAMES)
def test_public_name_importable(name):
    assert name in moe_lab.__all__
    assert getattr(moe_lab, name) is not None


def test_every_exported_name_exists():
    for name in moe_lab.__all__:
        assert hasattr(moe_lab, name), name


def test_constants_and_enums():
    from moe_lab import ActivationType, RouterType

    assert moe_lab.DEFAULT_HIDDEN_SIZE == 768 and moe_lab.DEFAULT_NUM_EXPERTS == 8
    assert moe_lab.DEFAULT_EXPERTS_PER_TOKEN == 2 and moe_lab.MAX_EXPERTS_SUPPORTED == 1024
    assert {r.value for r in RouterType} == {"top_k", "expert_choice", "switch"}
    assert {a.value for a in ActivationType} == {"relu", "gelu", "swiglu", "geglu"}
    assert issubclass(moe_lab.RouterError, moe_lab.MoEError)
    assert issubclass(moe_lab.ConfigError, ValueError)


def test_core_does_not_import_ray():
    code = (
        "import sys, torch, moe_lab, moe_lab.model, moe_lab.parallel\n"
        "m = moe_lab.MoEModel(vocab_size=50, hidden_size=16, num_layers=1, num_attention_heads=2, num_experts=2)\n"
        "m(torch.randint(0, 50, (1, 4)))\n"
        "bad = [k for k in sys.modules if k == 'ray' or k.startswith('ray.')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_version_and_help():
    from moe_lab.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"moe-lab {moe_lab.__version__}"
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "Mixture-of-Experts" in res.output
