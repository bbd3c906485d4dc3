"""ServeArgs from a YAML file, flags and --set: precedence, and errors that name their source."""

import pytest
import yaml

from moe_lab import ConfigError
from moe_lab.errors import CheckpointError
from moe_lab.serving.args import ServeArgs, load_serve_args, resolve_checkpoint, serve_args_from


@pytest.fixture
def cfg(tmp_path):
    def write(data, name="serve.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
        return path

    return write


def _flags(**values):
    labels = {"checkpoint": "CHECKPOINT", "num_replicas": "--replicas", "device": "--device"}
    return {field: (labels[field], values.get(field)) for field in labels}


def test_file_then_flags_and_set(cfg):
    path = cfg({"checkpoint": "a", "num_replicas": 3, "max_batch_size": 4, "device": "cpu"})
    args = load_serve_args(path)
    assert (args.checkpoint, args.num_replicas, args.max_batch_size, args.device) == ("a", 3, 4, "cpu")
    args = load_serve_args(path, _flags(checkpoint="b", num_replicas=2),
                           ["max_batch_size=16", "max_experts_in_memory=3", "api_key_env=KEY", "torch_threads=null"])
    assert (args.checkpoint, args.num_replicas, args.max_batch_size, args.device) == ("b", 2, 16, "cpu")
    assert args.max_experts_in_memory == 3 and args.api_key_env == "KEY" and args.torch_threads is None
    assert load_serve_args(None, overrides=["checkpoint=a", "max_experts_in_memory=auto"]).max_experts_in_memory == "auto"
    assert ServeArgs(checkpoint="a").max_experts_in_memory == "auto"  # the server's default: all when they fit
    # no file: the defaults plus what was given
    assert load_serve_args(None, _flags(checkpoint="c")) == ServeArgs(checkpoint="c")
    assert load_serve_args(None, overrides=["checkpoint=d", "num_replicas=2"]).num_replicas == 2


@pytest.mark.parametrize(
    "data, flags, overrides, match",
    [
        ({"checkpoint": "a", "max_batch": 3}, {}, [], r"serve\.yaml: max_batch: unknown key; did you mean max_batch_size\?"),
        ({"checkpoint": "a", "max_batch_size": 0}, {}, [], r"serve\.yaml: max_batch_size: Input should be greater than or equal to 1"),
        ({"checkpoint": "a", "eviction_policy": "fifo"}, {}, [], r"eviction_policy: must be one of \['lru', 'lfu'\]"),
        ({"checkpoint": "a"}, {"num_replicas": 0}, [], r"^--replicas: Input should be greater than or equal to 1"),
        ({"checkpoint": "a"}, {}, ["max_batch_size=0"], r"^--set max_batch_size: Input should be greater"),
        ({"checkpoint": "a"}, {}, ["max_batchsize=2"], r"^--set max_batchsize: unknown key; did you mean max_batch_size\?"),
        ({"checkpoint": "a"}, {}, ["zzz=2"], r"^--set zzz: unknown key; the fields are: checkpoint, model_name"),
        ({"checkpoint": "a"}, {}, ["max_batch_size"], r"--set expects key=value"),
        ({"checkpoint": "a"}, {}, ["a.b=1"], r"--set expects key=value"),
        ({"checkpoint": "a"}, {"num_replicas": 2}, ["num_replicas=3"], r"--set num_replicas: also given as --replicas"),
        ({"model_name": "x"}, {}, [], r"^checkpoint: required \(give CHECKPOINT or set `checkpoint:` in the --config file\)"),
        ({"checkpoint": "a"}, {}, ["model_name="], r"^--set model_name: "),
        ({"checkpoint": "a"}, {}, ["max_experts_in_memory=0"], r"^--set max_experts_in_memory: "),
        ({"checkpoint": "a"}, {}, ["max_experts_in_memory=all"], r"^--set max_experts_in_memory: "),
        ({"checkpoint": "a", "batch_wait_timeout_s": 0.01}, {}, [],
         r"serve\.yaml: batch_wait_timeout_s: no longer a setting \(the engine batches continuously"),
    ],
)
def test_errors_name_the_file_flag_or_key(cfg, data, flags, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_serve_args(cfg(data), _flags(**flags), overrides)


def test_file_errors(cfg, tmp_path):
    with pytest.raises(ConfigError, match="serve config file not found"):
        load_serve_args(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_serve_args(cfg("checkpoint: [unclosed"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_serve_args(cfg("- a\n- b\n"))
    serve_config = {"http_options": {"host": "127.0.0.1"}, "applications": [{"import_path": "x:y", "args": {}}]}
    with pytest.raises(ConfigError, match=r"is a Ray Serve config file .*`serve run`"):
        load_serve_args(cfg(serve_config))


def test_resolve_checkpoint_refuses_what_is_not_a_checkpoint(tmp_path, monkeypatch):
    # a good checkpoint resolves to an absolute path: tests/serving/test_preflight.py
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve_checkpoint(ServeArgs(checkpoint="ckpt"))
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"")  # names alone are not enough
    with pytest.raises(CheckpointError, match="model.safetensors"):
        resolve_checkpoint(ServeArgs(checkpoint="ckpt"))


def test_serve_args_from_a_mapping():
    args = ServeArgs(checkpoint="a")
    assert serve_args_from(args) is args and serve_args_from({"checkpoint": "a"}) == args
    with pytest.raises(ConfigError, match=r"^serve args: num_replicas: Input should be greater"):
        serve_args_from({"checkpoint": "a", "num_replicas": 0})


def test_replica_autoscaling_range_is_checked_and_becomes_serves_autoscaling_config():
    assert ServeArgs(checkpoint="a").autoscaling_config() is None  # a fixed num_replicas by default
    auto = ServeArgs(checkpoint="a", num_replicas=2, max_replicas=4, target_ongoing_requests=3).autoscaling_config()
    assert auto == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 3}
    with pytest.raises(ConfigError, match=r"max_replicas \(1\) must be >= num_replicas \(2\)"):
        serve_args_from({"checkpoint": "a", "num_replicas": 2, "max_replicas": 1})
    with pytest.raises(ConfigError, match=r"target_ongoing_requests: Input should be greater than 0"):
        serve_args_from({"checkpoint": "a", "target_ongoing_requests": 0})


def test_app_builder_deploys_fixed_or_autoscaled_replicas(tmp_path):
    # what Serve receives: num_replicas, or an autoscaling_config (never both)
    from moe_lab import MoEModel
    from moe_lab.checkpoint import write_checkpoint
    from moe_lab.data import ByteTokenizer
    from moe_lab.orchestration.serve import app_builder

    tok = ByteTokenizer()
    model = MoEModel(vocab_size=len(tok), hidden_size=32, num_layers=1, num_attention_heads=4, num_experts=4,
                     experts_per_token=2, expert_hidden_size=32, max_position_embeddings=64)
    write_checkpoint(tmp_path / "m", model.config, model.state_dict(), tokenizer=tok)
    fixed = app_builder(ServeArgs(checkpoint=str(tmp_path / "m"), num_replicas=3))._bound_deployment
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
    scaled = app_builder(ServeArgs(checkpoint=str(tmp_path / "m"), max_replicas=5))._bound_deployment
    cfg = scaled._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.initial_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 1, 5, 8.0)
