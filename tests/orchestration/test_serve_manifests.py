"""jobs/serve.yaml and cluster/rayservice.yaml: they validate, name the app builder and stay in sync.

``jobs/serve.yaml`` is a ServeArgs file (``moe-lab serve --config``) listing every field at
its default; ``cluster/rayservice.yaml`` holds a Ray Serve config whose app ``args:`` are the
same fields (deployment values for a GPU cluster).
"""

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from moe_lab import ConfigError, MoEModel  # noqa: E402
from moe_lab.checkpoint import write_checkpoint  # noqa: E402
from moe_lab.orchestration.serve import APP_IMPORT_PATH  # noqa: E402
from moe_lab.serving import ServeArgs, load_serve_args, resolve_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _rayservice():
    docs = [d for d in yaml.safe_load_all((ROOT / "cluster/rayservice.yaml").read_text()) if d]
    return next(d for d in docs if d.get("kind") == "RayService")


def _app_args(config: ServeDeploySchema) -> dict:
    apps = [a for a in config.applications if a.import_path == APP_IMPORT_PATH]
    assert len(apps) == 1, [a.import_path for a in config.applications]
    return dict(apps[0].args)


def test_jobs_serve_yaml_lists_every_field_at_its_default():
    raw = yaml.safe_load((ROOT / "jobs/serve.yaml").read_text())
    assert list(raw) == list(ServeArgs.model_fields)  # every field, in the class's order
    args = load_serve_args(ROOT / "jobs/serve.yaml")
    assert args.checkpoint == "outputs/demo/model" and args.model_name == "moe-lab"
    assert args == ServeArgs(checkpoint="outputs/demo/model")  # the file shows the defaults


def test_rayservice_args_are_the_same_fields_as_jobs_serve_yaml():
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(_rayservice()["spec"]["serveConfigV2"]))
    app_args = _app_args(serve_cfg)
    assert list(app_args) == list(yaml.safe_load((ROOT / "jobs/serve.yaml").read_text()))
    ServeArgs.model_validate(app_args)


def test_load_serve_args_resolves_and_validates(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    model = MoEModel(vocab_size=259, hidden_size=16, num_layers=1, num_attention_heads=2, num_experts=2,
                     experts_per_token=1, expert_hidden_size=16, max_position_embeddings=32, dropout=0.0)
    write_checkpoint(ckpt, model.config, model.state_dict())
    raw = yaml.safe_load((ROOT / "jobs/serve.yaml").read_text())
    raw["checkpoint"] = "ckpt"  # relative to the current directory
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(load_serve_args(cfg)).checkpoint == str(ckpt.resolve())

    raw["max_batch_size"] = 0
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_serve_args(cfg)

    # the Ray Serve config form is not a --config file: it says where it belongs instead
    cfg.write_text(_rayservice()["spec"]["serveConfigV2"])
    with pytest.raises(ConfigError, match="is a Ray Serve config file"):
        load_serve_args(cfg)


def test_rayservice_manifest():
    svc = _rayservice()
    assert svc["apiVersion"] == "ray.io/v1"
    spec = svc["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    # the Serve config is a valid Serve config whose app is ours, with valid typed args
    raw_cfg = yaml.safe_load(spec["serveConfigV2"])
    assert raw_cfg["http_options"].get("host")  # set on purpose (Serve config files default to 0.0.0.0)
    serve_cfg = ServeDeploySchema.model_validate(raw_cfg)
    args = ServeArgs.model_validate(_app_args(serve_cfg))
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
    # replicas autoscale up to max_replicas; KubeRay then adds GPU workers for them
    assert args.max_replicas and args.max_replicas > args.num_replicas and cluster["enableInTreeAutoscaling"] is True
    assert g["maxReplicas"] * int(g["rayStartParams"]["num-gpus"]) >= args.max_replicas * args.num_gpus_per_replica
    # every container that may run a replica gets the API key from a secret
    for group in groups.values():
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert "secretKeyRef" in env[args.api_key_env]["valueFrom"]
    # the checkpoint path lives on the mounted models volume
    mounts = [m["mountPath"] for m in g["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert any(args.checkpoint.startswith(m) for m in mounts)


def test_rayservice_proxies_are_guarded_like_moe_lab_serve(monkeypatch):
    """Each pod's Serve proxy loads moe_lab's proxy guard with the app's key and body limit."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    svc = _rayservice()
    args = ServeArgs.model_validate(_app_args(ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))))
    cluster = svc["spec"]["rayClusterConfig"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["MOE_LAB_SERVE_KEY_ENV"]["value"] == args.api_key_env
        assert "secretKeyRef" in env[args.api_key_env]["valueFrom"]  # the proxy can read the key
        assert int(env["MOE_LAB_SERVE_MAX_BODY_BYTES"]["value"]) == args.max_body_bytes
        for name in ("MOE_LAB_SERVE_KEY_ENV", "MOE_LAB_SERVE_MAX_BODY_BYTES"):
            monkeypatch.setenv(name, env[name]["value"])
        monkeypatch.setenv(args.api_key_env, "k")
        # what Serve's proxy does with the callback at start-up
        (guard,) = validate_http_proxy_callback_return(
            call_function_from_import_path(env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]["value"]))
        assert guard.kwargs == {"api_key": "k", "max_body_bytes": args.max_body_bytes}
