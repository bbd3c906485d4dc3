"""jobs/serve.yaml and cluster/rayservice.yaml: they parse, validate and name the app builder."""

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from moe_lab import ConfigError  # noqa: E402
from moe_lab.orchestration.serve import APP_IMPORT_PATH, ServeArgs, load_serve_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _app_args(config: ServeDeploySchema) -> ServeArgs:
    apps = [a for a in config.applications if a.import_path == APP_IMPORT_PATH]
    assert len(apps) == 1, [a.import_path for a in config.applications]
    return ServeArgs.model_validate(apps[0].args)


def test_jobs_serve_yaml_binds_loopback_explicitly():
    raw = yaml.safe_load((ROOT / "jobs/serve.yaml").read_text())
    assert raw["http_options"]["host"] == "127.0.0.1"  # set in the file, not Serve's 0.0.0.0 default
    args = _app_args(ServeDeploySchema.model_validate(raw))
    assert args.checkpoint == "outputs/demo/model" and args.model_name == "moe-lab"


def test_load_serve_config_resolves_and_validates(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"")
    raw = yaml.safe_load((ROOT / "jobs/serve.yaml").read_text())
    raw["applications"][0]["args"]["checkpoint"] = "ckpt"  # relative to the current directory
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    config = load_serve_config(cfg)
    assert config.applications[0].args["checkpoint"] == str(ckpt.resolve())

    del raw["http_options"]["host"]
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="set http_options.host explicitly"):
        load_serve_config(cfg)

    raw["http_options"]["host"] = "127.0.0.1"
    raw["applications"][0]["args"]["max_batch_size"] = 0
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_serve_config(cfg)


def test_rayservice_manifest():
    docs = [d for d in yaml.safe_load_all((ROOT / "cluster/rayservice.yaml").read_text()) if d]
    svc = next(d for d in docs if d.get("kind") == "RayService")
    assert svc["apiVersion"] == "ray.io/v1"
    spec = svc["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    # the Serve config is a valid Serve config whose app is ours, with valid typed args
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    args = _app_args(serve_cfg)
    assert args.num_gpus_per_replica >= 1 and args.api_key_env
    # head + workers; a GPU group asks Kubernetes for nvidia.com/gpu and tells Ray about it
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 8000}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = [g for g in groups.values()
           if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu, "no worker group requests nvidia.com/gpu"
    g = gpu[0]
    assert int(g["rayStartParams"]["num-gpus"]) == g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # every container that may run a replica gets the API key from a secret
    for group in groups.values():
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert "secretKeyRef" in env[args.api_key_env]["valueFrom"]
    # the checkpoint path lives on the mounted models volume
    mounts = [m["mountPath"] for m in g["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert any(args.checkpoint.startswith(m) for m in mounts)
