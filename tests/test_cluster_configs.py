"""The cluster/ manifests parse and carry the fields that matter."""

from pathlib import Path

import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _gpus(group):
    return group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")


def test_raycluster_matches_project_ray_and_has_gpu_workers():
    doc = _load("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["spec"]["rayVersion"] == ray.__version__
    workers = doc["spec"]["workerGroupSpecs"]
    assert any(int(_gpus(g) or 0) > 0 for g in workers)
    head_env = {e["name"]: e for e in doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAY_AUTH_MODE"]["value"] == "token"


def test_rayjob_runs_moe_lab_train_on_gpus():
    doc = _load("rayjob.yaml")
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert "moe_lab train" in spec["entrypoint"] and "scaling.use_gpu=true" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert any(int(_gpus(g) or 0) > 0 for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    image = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert ray.__version__ in image


def test_launcher_has_a_gpu_worker_type():
    doc = _load("launcher-gpu.yaml")
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    gpu = [n for n, t in types.items() if "p5" in t["node_config"]["InstanceType"] or "gpu" in n]
    assert gpu and types[gpu[0]]["max_workers"] >= 1
    assert any(f"ray[train,tune,serve,default]=={ray.__version__}" in c for c in doc["setup_commands"])
    assert ray.__version__ in doc["docker"]["image"]
