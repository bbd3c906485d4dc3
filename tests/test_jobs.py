from pathlib import Path

import pytest
import yaml

from moe_lab import ConfigError
from moe_lab.jobs import DEFAULT_JOB, JobSpec, apply_overrides, load_job

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_equals_builtin_default_job():
    assert load_job(ROOT / "jobs" / "default.yaml") == load_job(None) == JobSpec.from_dict(DEFAULT_JOB)


def _job_specs():
    """jobs/*.yaml that are job specs (sweep specs and Serve config files have their own tests)."""
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "search_space" not in data and "applications" not in data:
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
