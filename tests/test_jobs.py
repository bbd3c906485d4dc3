from pathlib import Path

import pytest
import yaml

from moe_lab import ConfigError
from moe_lab.jobs import DEFAULT_JOB, JobSpec, apply_overrides, load_job

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_equals_builtin_default_job():
    assert load_job(ROOT / "jobs" / "default.yaml") == load_job(None) == JobSpec.from_dict(DEFAULT_JOB)


def _job_specs():
    """jobs/*.yaml that are job specs (sweep specs and ServeArgs files have their own tests)."""
    from moe_lab.serving import ServeArgs

    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "search_space" not in data and not set(data) <= set(ServeArgs.model_fields):
            yield path


@pytest.mark.parametrize("path", list(_job_specs()), ids=lambda p: p.name)
def test_every_job_in_jobs_dir_validates(path):
    load_job(path)


def test_overrides_parse_types():
    spec = load_job(None, ["training.learning_rate=1e-3", "model.router_type=switch", "model.experts_per_token=1",
                           "training.max_steps=7", "data.label_column=null", "training.mixed_precision=true"])
    assert spec.training.learning_rate == pytest.approx(1e-3)
    assert spec.model.router_type.value == "switch" and spec.training.max_steps == 7
    assert spec.data.label_column is None and spec.training.mixed_precision is True


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.hiden_size=3", r"model\.hiden_size: unknown field"),
        ("training.batch_size=abc", r"training\.batch_size = 'abc'"),
        ("training.learning_rate=-1", r"training\.learning_rate = -1"),
        ("data.max_length=1", r"data\.max_length = 1"),
        ("bogus.key=1", r"bogus: unknown field"),
        ("scaling.expert_parallel_size=3", r"num_workers \(1\) must be divisible by expert_parallel_size \(3\)"),
        ("data.max_length=1000", r"data.max_length \(1000\) exceeds model.max_position_embeddings \(256\)"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_job(None, [override])


def test_malformed_set_and_files(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["nokey"])
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)


def test_vocab_from_tokenizer():
    spec = load_job(None)
    assert spec.model.vocab_size is None
    assert spec.model.to_config(259).vocab_size == 259
    assert load_job(None, ["model.vocab_size=300"]).model.to_config(259).vocab_size == 300


# ---- resume keeps its job ------------------------------------------------------------------

def test_resume_loads_the_recorded_job_and_refuses_optimisation_changes(tmp_path):
    from moe_lab.jobs import RESUME_ALLOWED, record_job, resume_job

    spec = load_job(None, ["training.max_steps=200", "training.save_steps=5", "training.learning_rate=0.01"])
    record_job(spec, tmp_path)
    assert resume_job(tmp_path) == spec  # not the 300-step default job
    longer = resume_job(tmp_path, ["training.max_steps=400", "training.logging_steps=1"])
    assert longer.training.max_steps == 400 and longer.training.save_steps == 5
    with pytest.raises(ConfigError) as exc:
        resume_job(tmp_path, ["training.learning_rate=0.1", "model.num_layers=2"])
    msg = str(exc.value)
    assert "training.learning_rate (0.01 -> 0.1)" in msg and "model.num_layers (4 -> 2)" in msg
    assert "training.max_steps" in msg and set(RESUME_ALLOWED) >= {"training.max_steps", "training.eval_steps"}
    with pytest.raises(ConfigError, match=r"training.learning_rate \(0.01 -> 0.003, from"):
        resume_job(tmp_path, [], ROOT / "jobs" / "default.yaml")  # a different job file next to --resume
    with pytest.raises(ConfigError, match="no run to resume"):
        resume_job(tmp_path / "elsewhere")


def test_record_job_never_overwrites_a_different_job(tmp_path, caplog):
    from moe_lab.jobs import record_job

    first = load_job(None, ["training.save_steps=5"])
    assert record_job(first, tmp_path) == tmp_path / "job.yaml"
    assert record_job(first, tmp_path) == tmp_path / "job.yaml"  # the same job: nothing new
    changed = first.replace(training=first.training.replace(max_steps=400))
    with caplog.at_level("WARNING"):
        beside = record_job(changed, tmp_path)
    assert beside.name.startswith("job.resumed-") and load_job(beside) == changed
    assert load_job(tmp_path / "job.yaml") == first  # the original is intact
    assert "training.max_steps: 300 -> 400" in caplog.text


def test_cli_resume_uses_the_recorded_job(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moe_lab.cli import app
    from moe_lab.jobs import record_job
    from moe_lab.orchestration import train as ray_train

    spec = load_job(None, ["training.max_steps=200", "training.save_steps=5"])
    record_job(spec, tmp_path)
    seen = {}
    monkeypatch.setattr(ray_train, "run_job_ray", lambda s, out, resume, address: seen.update(spec=s, resume=resume) or {})
    monkeypatch.setattr("moe_lab.runner.format_summary", lambda summary: "ok")
    res = CliRunner().invoke(app, ["train", "--resume", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["spec"] == spec and seen["resume"] is True
    res = CliRunner().invoke(app, ["train", "--resume", "-o", str(tmp_path), "--set", "training.learning_rate=1.0"])
    assert res.exit_code == 2 and "training.learning_rate" in res.output and "Traceback" not in res.output


# ---- the parallel layout: scaling.{dp_shard, tp, pp, ep} -------------------------------------

def test_scaling_layout_from_set():
    from moe_lab.parallel import ParallelDims

    spec = load_job(None, ["scaling.num_workers=2", "scaling.tp=2"])
    assert spec.scaling.parallel_dims() == ParallelDims(dp_replicate=1, tp=2)
    spec = load_job(None, ["scaling.num_workers=4", "scaling.dp_shard=4", "scaling.ep=2"])
    assert spec.scaling.parallel_dims() == ParallelDims(dp_replicate=1, dp_shard=4, ep=2)
    assert spec.scaling.expert_parallel == 2
    assert load_job(None, ["scaling.num_workers=2", "scaling.expert_parallel_size=2"]).scaling.parallel_dims().ep == 2
    # the vocabulary comes from the tokenizer: checked once it is known, with a fix named
    assert load_job(None, ["scaling.num_workers=2", "scaling.tp=2"]).parallel_problems(259) == [
        "the tokenizer's vocabulary (259, set model.vocab_size to 260) must be divisible by scaling.tp (2)"]
    assert load_job(ROOT / "jobs" / "train_tp.yaml").parallel_problems(259) == []


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["scaling.num_workers=4", "scaling.ep=4", "model.num_experts=6"],
         r"model\.num_experts \(6\) must be divisible by scaling\.ep \(4\)"),
        (["scaling.num_workers=4", "scaling.pp=2", "scaling.tp=2"],
         r"scaling\.pp \(2\) > 1 with scaling\.dp_shard \(1\) or scaling\.tp \(2\) > 1 is not supported yet"),
        (["scaling.num_workers=3", "scaling.tp=2"],
         r"scaling\.num_workers \(3\) must be divisible by scaling\.dp_shard \(1\) × scaling\.tp \(2\)"),
        (["scaling.num_workers=4", "scaling.dp_shard=4", "scaling.ep=3"],
         r"scaling\.dp_shard \(4\) must be divisible by scaling\.ep \(3\)"),
        (["scaling.num_workers=4", "scaling.ep=2", "scaling.expert_parallel_size=4"],
         r"scaling\.ep \(2\) and scaling\.expert_parallel_size \(4\) are the same setting"),
        (["scaling.num_workers=2", "scaling.tp=2", "model.num_attention_heads=1", "model.head_dim=16"],
         r"model\.num_attention_heads \(1\) must be divisible by scaling\.tp \(2\)"),
        (["scaling.num_workers=4", "scaling.tp=2", "data.streaming=true", "training.batch_size=6"],
         r"data\.streaming with scaling\.tp \(2\) > 1 needs training\.batch_size \(6\) divisible by "
         r"scaling\.num_workers \(4\)"),
        (["training.cuda_graphs=true", "scaling.ep=1"],
         r"training\.cuda_graphs needs scaling\.use_gpu: true"),
        (["training.cuda_graphs=true", "scaling.use_gpu=true", "scaling.num_workers=2", "scaling.ep=2"],
         r"training\.cuda_graphs works in one process or with data parallelism; got scaling\.ep 2 \(expected 1\)"),
        (["training.cuda_graphs=true", "scaling.use_gpu=true", "scaling.ep=1", "training.fast_paths=false"],
         r"cuda_graphs needs fast_paths: true"),
    ],
)
def test_bad_layouts_name_the_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_job(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["scaling.tp=2"], "the tokenizer's vocabulary (259, set model.vocab_size to 260) must be divisible by scaling.tp (2)"),
    (["scaling.pp=2", "model.num_layers=1"], "model.num_layers (1) must be at least scaling.pp (2)"),
    (["training.cuda_graphs=true"], "training.cuda_graphs needs scaling.use_gpu: true"),
])
def test_cli_rejects_a_bad_layout_before_ray_starts(tmp_path, overrides, message):
    import ray
    from typer.testing import CliRunner

    from moe_lab.cli import app

    args = ["train", "-o", str(tmp_path), "--set", "scaling.num_workers=2"]
    for o in overrides:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not ray.is_initialized()


def test_job_task_carries_the_layout(tmp_path):
    from moe_lab.parallel import ParallelDims
    from moe_lab.runner import PreparedData, job_task

    spec = load_job(ROOT / "jobs" / "train_fsdp_ep.yaml")
    data = PreparedData(train=[{"input_ids": [1, 2, 3]}], eval=None, tokenizer=list(range(259)), stats={})
    task = job_task(spec, data, tmp_path)
    assert task.dims == ParallelDims(dp_replicate=1, dp_shard=2, ep=2) and task.expert_parallel_size == 2
