import inspect
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import moe_lab

#: Every public name of the API reference (../shared/seed/000_db562b47c554e38b.txt), with the
#: methods it lists; each must import from ``moe_lab`` itself.
REFERENCE_NAMES = {
    "MoEModel": ["forward", "get_expert_weights", "set_expert_parallel_group"],
    "MoETrainer": ["train", "evaluate", "save_model"],
    "TopKRouter": ["forward"],
    "ExpertChoiceRouter": [],
    "SwitchRouter": [],
    "FeedForwardExpert": [],
    "GLUExpert": [],
    "DistributedMoETrainer": ["train", "evaluate", "save_model"],
    "ExpertParallelism": ["parallelize_experts", "gather_expert_outputs"],
    "OptimizedMoEModel": ["generate"],
    "DynamicExpertLoader": [],
    "RouterAnalyzer": ["analyze_routing", "compute_expert_specialization"],
    "ExpertMonitor": ["start_monitoring", "stop_monitoring", "get_current_stats"],
    "TrainingVisualizer": ["plot_training_curves", "plot_expert_utilization"],
    "load_pretrained_moe": [],
    "save_moe_checkpoint": [],
    "prepare_moe_dataset": [],
    "collate_moe_batch": [],
    "MoEConfig": ["from_json", "to_dict"],
    "TrainingConfig": [],
    "MoEError": [],
    "RouterError": [],
    "ExpertError": [],
    "DistributedError": [],
    "RouterType": [],
    "ActivationType": [],
    "DEFAULT_HIDDEN_SIZE": [],
    "DEFAULT_NUM_EXPERTS": [],
    "DEFAULT_EXPERTS_PER_TOKEN": [],
    "MAX_EXPERTS_SUPPORTED": [],
    "ExpertWeights": [],
    "RoutingInfo": [],
    "ExpertOutputs": [],
    "TrainingMetrics": [],
    # named by the issues next to the reference
    "TrainingResult": [],
    "EvalResult": [],
    "RoutingAnalysis": [],
    "MonitoringStats": [],
}

#: ``(object path, parameter, default)`` for every default the reference's signatures give
REFERENCE_DEFAULTS = [
    ("MoEModel.__init__", dict(vocab_size=50257, hidden_size=768, num_layers=12, num_experts=8, experts_per_token=2,
                               expert_hidden_size=None, router_type="top_k", load_balancing_loss_coef=0.01,
                               router_z_loss_coef=0.001, dropout=0.1)),
    ("MoEModel.forward", dict(attention_mask=None, return_routing_info=False)),
    ("MoEModel.get_expert_weights", dict(layer_idx=None)),
    ("MoETrainer.__init__", dict(optimizer=None, scheduler=None, mixed_precision=True, gradient_accumulation_steps=1,
                                 max_grad_norm=1.0)),
    ("MoETrainer.train", dict(eval_dataset=None, num_epochs=3, batch_size=16, learning_rate=1e-4, warmup_steps=1000,
                              eval_steps=500, save_steps=1000, output_dir="./outputs")),
    ("MoETrainer.evaluate", dict(batch_size=16, num_samples=None)),
    ("MoETrainer.save_model", dict(save_optimizer=True)),
    ("TopKRouter.__init__", dict(top_k=2, router_bias=False, router_jitter_noise=0.0)),
    ("TopKRouter.forward", dict(training=True)),
    ("ExpertChoiceRouter.__init__", dict(capacity_factor=1.0, drop_tokens=True)),
    ("SwitchRouter.__init__", dict(capacity_factor=1.25, drop_tokens=True, jitter_noise=0.1)),
    ("FeedForwardExpert.__init__", dict(activation="gelu", dropout=0.1)),
    ("GLUExpert.__init__", dict(activation="swiglu")),
    ("DistributedMoETrainer.__init__", dict(expert_parallel_size=1, model_parallel_size=1, pipeline_parallel_size=1)),
    ("OptimizedMoEModel.__init__", dict(device_map="auto", max_experts_in_memory=4, expert_cache_size=8)),
    ("OptimizedMoEModel.generate", dict(max_length=100, temperature=1.0, top_p=0.9)),
    ("DynamicExpertLoader.__init__", dict(cache_size=8, eviction_policy="lru", prefetch_strategy="usage_based")),
    ("RouterAnalyzer.analyze_routing", dict(return_heatmap=False)),
    ("RouterAnalyzer.compute_expert_specialization", dict(num_samples=10000)),
    ("TrainingVisualizer.plot_training_curves", dict(save_path=None)),
    ("TrainingVisualizer.plot_expert_utilization", dict(save_path=None)),
    ("prepare_moe_dataset", dict(max_length=512, num_proc=4)),
]

#: positional parameters, in the reference's order (extra keyword-only ones are a superset)
REFERENCE_POSITIONAL = {
    "MoEModel.__init__": ["vocab_size", "hidden_size", "num_layers", "num_experts", "experts_per_token",
                          "expert_hidden_size", "router_type", "load_balancing_loss_coef", "router_z_loss_coef",
                          "dropout"],
    "MoEModel.forward": ["input_ids", "attention_mask", "return_routing_info"],
    "MoETrainer.__init__": ["model", "optimizer", "scheduler", "mixed_precision", "gradient_accumulation_steps",
                            "max_grad_norm"],
    "MoETrainer.train": ["train_dataset", "eval_dataset", "num_epochs", "batch_size", "learning_rate", "warmup_steps",
                         "eval_steps", "save_steps", "output_dir"],
    "DistributedMoETrainer.__init__": ["model", "world_size", "expert_parallel_size", "model_parallel_size",
                                       "pipeline_parallel_size"],
    "ExpertParallelism.parallelize_experts": ["model", "expert_parallel_size"],
    "ExpertParallelism.gather_expert_outputs": ["expert_outputs", "expert_parallel_group"],
    "OptimizedMoEModel.__init__": ["model_path", "device_map", "max_experts_in_memory", "expert_cache_size"],
    "DynamicExpertLoader.__init__": ["model", "cache_size", "eviction_policy", "prefetch_strategy"],
    "load_pretrained_moe": ["model_name_or_path"],
    "save_moe_checkpoint": ["model", "optimizer", "scheduler", "path"],
    "prepare_moe_dataset": ["dataset", "tokenizer", "max_length", "num_proc"],
    "collate_moe_batch": ["batch"],
}

CONFIG_DEFAULTS = {
    "MoEConfig": dict(vocab_size=50257, hidden_size=768, num_layers=12, num_experts=8, experts_per_token=2,
                      router_type="top_k", load_balancing_loss_coef=0.01),
    "TrainingConfig": dict(output_dir="./outputs", num_epochs=3, batch_size=16, learning_rate=1e-4, warmup_steps=1000,
                           mixed_precision=True, gradient_accumulation_steps=1),
}


def _resolve(path):
    obj = moe_lab
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(REFERENCE_NAMES))
def test_reference_name_importable_from_moe_lab(name):
    assert name in moe_lab.__all__
    obj = getattr(moe_lab, name)
    assert obj is not None
    for method in REFERENCE_NAMES[name]:
        assert callable(getattr(obj, method, None)), f"moe_lab.{name}.{method}"


def test_from_moe_lab_import_star_gives_every_reference_name():
    namespace = {}
    exec("from moe_lab import *", namespace)
    assert set(REFERENCE_NAMES) <= set(namespace)


@pytest.mark.parametrize("path, defaults", REFERENCE_DEFAULTS, ids=[p for p, _ in REFERENCE_DEFAULTS])
def test_reference_defaults(path, defaults):
    params = inspect.signature(_resolve(path)).parameters
    for name, default in defaults.items():
        assert name in params, f"{path} has no parameter {name!r}"
        assert params[name].default == default, f"{path}({name}=...) defaults to {params[name].default!r}, not {default!r}"


@pytest.mark.parametrize("path", sorted(REFERENCE_POSITIONAL))
def test_reference_parameter_order(path):
    params = [p for p in inspect.signature(_resolve(path)).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]
    assert [p.name for p in params][: len(REFERENCE_POSITIONAL[path])] == REFERENCE_POSITIONAL[path]


@pytest.mark.parametrize("name", sorted(CONFIG_DEFAULTS))
def test_reference_config_defaults(name):
    cfg = getattr(moe_lab, name)()
    for field, default in CONFIG_DEFAULTS[name].items():
        value = getattr(cfg, field)
        assert getattr(value, "value", value) == default, f"{name}.{field}"


def test_reference_type_aliases():
    from typing import Any, Dict, Tuple, get_args, get_origin

    import torch

    assert moe_lab.ExpertWeights == Dict[int, torch.Tensor]
    assert moe_lab.TrainingMetrics == Dict[str, float]
    assert get_origin(moe_lab.ExpertOutputs) is tuple
    tensor, info = get_args(moe_lab.ExpertOutputs)
    assert tensor is torch.Tensor and issubclass(info, dict)
    assert moe_lab.ExpertOutputs != Tuple[Any]  # not a bare tensor alias any more
    assert issubclass(moe_lab.DistributedMoETrainer, moe_lab.MoETrainer)


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
        "from moe_lab import MoETrainer, load_pretrained_moe, prepare_moe_dataset\n"
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
