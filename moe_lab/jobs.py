"""Job specs: one YAML file per run, validated once by pydantic.

    name: my-run
    model:    {hidden_size: 128, num_layers: 4, num_experts: 8, ...}   # MoEConfig fields
    training: {batch_size: 16, learning_rate: 3.0e-3, max_steps: 300}  # TrainingConfig fields
    data:     {dataset: builtin, max_length: 128, tokenizer: byte}      # DataSpec fields
    scaling:  {num_workers: 2, dp_shard: 1, tp: 1, ep: 2, use_gpu: false}  # ScalingSpec fields

``moe-lab train`` with no file runs :data:`DEFAULT_JOB`, a tiny MoE on the built-in corpus
(``jobs/default.yaml`` holds the same job). One-off changes: ``--set section.key=value``.
Unknown keys, wrong types and bad values raise ConfigError naming the key.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from pydantic import Field, model_validator

from .config import MoEConfig, TrainingConfig, _StrictModel
from .errors import ConfigError


class ModelSpec(MoEConfig):
    """MoEConfig fields; ``vocab_size: null`` (the default here) takes the tokenizer's size."""

    vocab_size: Optional[int] = Field(None, gt=0)  # type: ignore[assignment]

    def to_config(self, vocab_size: int) -> MoEConfig:
        data = self.to_dict()
        data["vocab_size"] = self.vocab_size or vocab_size
        return MoEConfig.from_dict(data)


class DataSpec(_StrictModel):
    """Where the text comes from and how it becomes token blocks."""

    dataset: str = "builtin"  #: "builtin" (the multi-domain corpus) or a local file/directory
    eval_dataset: Optional[str] = None  #: a local file; default: a held-out split of ``dataset``
    text_column: str = "text"
    label_column: Optional[str] = "domain"
    tokenizer: str = "byte"  #: "byte", "bpe" (trained on the data), a saved tokenizer dir, or a transformers name
    bpe_vocab_size: int = Field(1024, ge=300)
    max_length: int = Field(128, ge=2)
    corpus_size_bytes: int = Field(2_500_000, ge=10_000)
    corpus_seed: int = 0
    eval_fraction: float = Field(0.05, gt=0, lt=0.5)
    num_proc: int = Field(2, ge=1)
    streaming: bool = False  #: stream batches to Ray Train workers with Ray Data


class ScalingSpec(_StrictModel):
    """How many Ray Train workers, and how the model is split over them.

    The layout (:class:`~moe_lab.parallel.ParallelDims`): ``dp_shard`` FSDP2 shards, ``tp``
    tensor-parallel ranks, ``pp`` pipeline stages (run by the ``pp_schedule``: ``1f1b``,
    ``interleaved_1f1b`` or ``gpipe``; with data and expert parallelism only), ``ep`` (or its
    API-reference name ``expert_parallel_size``) ranks the experts are sharded over, borrowed
    from the data-parallel ones; the rest of ``num_workers`` replicates.
    """

    num_workers: int = Field(1, ge=1)
    expert_parallel_size: int = Field(1, ge=1)
    dp_shard: int = Field(1, ge=1)  #: FSDP2 shards (1: no FSDP)
    tp: int = Field(1, ge=1)  #: tensor-parallel ranks (with dp_shard > 1: FSDP over TP's DTensors, a 2-D mesh)
    pp: int = Field(1, ge=1)  #: pipeline stages (not with dp_shard > 1 or tp > 1)
    pp_schedule: str = "1f1b"  #: the pipeline schedule: "1f1b", "interleaved_1f1b" (2 stages per rank) or "gpipe"
    ep: Optional[int] = Field(None, ge=1)  #: the same as expert_parallel_size (give one of them)
    #: expert tensor parallelism (tp > 1, dp_shard 1): every expert's FFN split over the TP ranks
    expert_tp: bool = False
    use_gpu: bool = False
    cpus_per_worker: Optional[float] = Field(None, gt=0)  #: default: sized so Ray Data is not starved
    max_failures: int = Field(0, ge=-1)
    storage_path: Optional[str] = None  #: Ray Train storage (checkpoints, results); default output_dir/ray
    address: Optional[str] = None  #: an existing Ray cluster ("auto", "ray://host:10001"); default: local

    @property
    def expert_parallel(self) -> int:
        """Ranks the experts are sharded over (``ep``, else ``expert_parallel_size``)."""
        return self.ep if self.ep is not None else self.expert_parallel_size

    def parallel_dims(self) -> Any:
        """The layout as resolved :class:`~moe_lab.parallel.ParallelDims` for ``num_workers``."""
        from .dims import ParallelDims

        return ParallelDims(dp_shard=self.dp_shard, tp=self.tp, pp=self.pp, ep=self.expert_parallel,
                            pp_schedule=self.pp_schedule, expert_tp=self.expert_tp).resolve(self.num_workers)

    @model_validator(mode="after")
    def _check(self) -> "ScalingSpec":
        from .dims import ParallelDims

        if self.ep is not None and self.expert_parallel_size not in (1, self.ep):
            raise ValueError(f"scaling.ep ({self.ep}) and scaling.expert_parallel_size ({self.expert_parallel_size}) "
                             "are the same setting; give one of them")
        ep = self.expert_parallel
        name = "ep" if self.ep is not None else "expert_parallel_size"
        if self.dp_shard * self.tp * self.pp == 1 and self.num_workers % ep:
            raise ValueError(f"num_workers ({self.num_workers}) must be divisible by {name} ({ep})")
        problems = ParallelDims(dp_shard=self.dp_shard, tp=self.tp, pp=self.pp, ep=ep, pp_schedule=self.pp_schedule,
                                expert_tp=self.expert_tp).problems(
            self.num_workers, {"world_size": "scaling.num_workers",
                               **{k: f"scaling.{k}" for k in ("dp_shard", "tp", "pp", "pp_schedule", "expert_tp")},
                               "ep": f"scaling.{name}", "dp_replicate": "num_workers / (tp × pp)"})
        if problems:
            raise ValueError("; ".join(problems))
        return self


class JobSpec(_StrictModel):
    """A whole run: model, training, data and scaling."""

    name: str = "default"
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataSpec = Field(default_factory=DataSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    analyze: bool = True  #: write report.html (router analytics) at the end

    @model_validator(mode="after")
    def _check(self) -> "JobSpec":
        problems = self.parallel_problems()
        sc, accum = self.scaling, self.training.gradient_accumulation_steps
        if self.data.streaming and sc.tp > 1 and sc.pp == 1 and self.training.batch_size % sc.num_workers:
            problems.append(f"data.streaming with scaling.tp ({sc.tp}) > 1 needs training.batch_size "
                            f"({self.training.batch_size}) divisible by scaling.num_workers ({sc.num_workers}): each "
                            "worker reads its share of its replica's batch from the stream")
        if sc.pp > 1 and self.data.streaming:
            problems.append(f"data.streaming with scaling.pp ({sc.pp}) > 1 is not supported yet: the pipeline stages "
                            "of a replica need the same batches")
        if sc.pp > 1 and sc.pp_schedule == "1f1b" and accum < sc.pp:
            problems.append(f"scaling.pp_schedule '1f1b' needs training.gradient_accumulation_steps ({accum}) >= "
                            f"scaling.pp ({sc.pp}): the pipeline's micro-batches are the step's")
        glu = getattr(self.model.expert_type, "value", self.model.expert_type) == "glu"
        if sc.expert_tp and glu and sc.expert_parallel == 1 and self.training.checkpoint_format != "full":
            problems.append(f"scaling.expert_tp with scaling.ep 1 and GLU experts needs training.checkpoint_format "
                            f"'full' (got {self.training.checkpoint_format!r}): sharded checkpoints cannot store the "
                            "GLU experts' strided TP split without EP yet")
        if self.training.cuda_graphs:  # checked here, in the driver, before Ray starts
            if not sc.use_gpu:
                problems.append("training.cuda_graphs needs scaling.use_gpu: true (the workers train on CUDA)")
            sharded = {"scaling.dp_shard": sc.dp_shard, "scaling.tp": sc.tp, "scaling.pp": sc.pp,
                       "scaling.ep": sc.expert_parallel}
            for name, value in sharded.items():
                if value > 1:
                    problems.append(f"training.cuda_graphs works in one process or with data parallelism; got "
                                    f"{name} {value} (expected 1)")
        if problems:
            raise ValueError("; ".join(problems))
        if self.data.max_length > self.model.max_position_embeddings:
            raise ValueError(
                f"data.max_length ({self.data.max_length}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )
        return self

    def parallel_problems(self, vocab_size: Optional[int] = None) -> List[str]:
        """Every reason the model cannot be split by the scaling layout, naming the values
        (``model.num_experts (6) must be divisible by scaling.ep (4)``). ``vocab_size``: the
        tokenizer's size, when ``model.vocab_size`` is not set (None: not checked yet)."""
        from .dims import model_problems

        sc = self.scaling
        dims = sc.parallel_dims()
        ep_name = "scaling.ep" if sc.ep is not None else "scaling.expert_parallel_size"
        config = self.model if vocab_size is None or self.model.vocab_size else self.model.to_config(vocab_size)
        problems = model_problems(dims, config, prefix="model.", dim_prefix="scaling.", dim_names={"ep": ep_name})
        if self.model.vocab_size is None and vocab_size is not None:  # the size came from the tokenizer
            hint = -(-vocab_size // dims.tp) * dims.tp
            problems = [p.replace(f"model.vocab_size ({vocab_size})",
                                  f"the tokenizer's vocabulary ({vocab_size}, set model.vocab_size to {hint})")
                        for p in problems]
        return problems

    def to_yaml(self, path: Optional[str | os.PathLike] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


#: The built-in main job: a tiny MoE on the built-in multi-domain corpus, sized to finish in
#: a few minutes on 2 CPU cores. ``jobs/default.yaml`` is the same job as a file.
DEFAULT_JOB: Dict[str, Any] = {
    "name": "default",
    "model": {
        "hidden_size": 128,
        "num_layers": 4,
        "num_attention_heads": 4,
        "num_experts": 8,
        "experts_per_token": 2,
        "expert_hidden_size": 256,
        "max_position_embeddings": 256,
        "router_type": "top_k",
        "load_balancing_loss_coef": 0.01,
        "router_z_loss_coef": 0.001,
        "dropout": 0.0,
    },
    "training": {
        "output_dir": "./outputs/default",
        "num_epochs": 1,
        "batch_size": 16,
        "learning_rate": 3.0e-3,
        "warmup_steps": 30,
        "max_steps": 300,
        "eval_steps": 100,
        "save_steps": 100,
        "logging_steps": 10,
        "eval_samples": 256,
        "mixed_precision": False,
        "seed": 0,
    },
    "data": {"dataset": "builtin", "tokenizer": "byte", "max_length": 128},
    "scaling": {"num_workers": 1, "expert_parallel_size": 1},
}


def _parse_value(raw: str) -> Any:
    """``--set`` values: JSON first (numbers like 1e-3, true, null, lists), then YAML, else a string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` strings to a job dict (a copy)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return data


def _prefix_errors(exc: ConfigError) -> ConfigError:
    return ConfigError(str(exc).replace("JobSpec.", "job: "))


def read_yaml_mapping(path: str | os.PathLike, what: str, expected: str) -> Dict[str, Any]:
    """A YAML file holding a mapping; ConfigError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with {expected}")
    return data


def load_job(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> JobSpec:
    """Load and validate a job: a YAML file, or the built-in default job when ``path`` is None."""
    if path is None:
        data: Dict[str, Any] = copy.deepcopy(DEFAULT_JOB)
    else:
        data = read_yaml_mapping(path, "job", "sections model/training/data/scaling")
    data = apply_overrides(data, overrides)
    try:
        return JobSpec.from_dict(data)
    except ConfigError as exc:
        raise _prefix_errors(exc) from None


def list_jobs(directory: str | os.PathLike = "jobs") -> List[Path]:
    return sorted(Path(directory).glob("*.yaml"))


# ---------------------------------------------------------------------------------------
# resuming a job
# ---------------------------------------------------------------------------------------

#: the resolved job of a run, in its output directory
JOB_FILE = "job.yaml"

#: fields a resume may change: none of them changes the optimisation of the steps already
#: planned (logging, evaluation, checkpoint cadence, where it runs, how far it goes)
RESUME_ALLOWED = (
    "training.max_steps",
    "training.logging_steps",
    "training.eval_steps",
    "training.eval_samples",
    "training.save_steps",
    "training.save_total_limit",
    "training.checkpoint_format",  # the resume reads either format, at any layout
    "training.progress_bar",
    "training.activation_checkpointing",  # exact: the same steps, less memory
    "training.activation_checkpointing_every",
    "training.tensorboard",
    "training.mlflow_tracking_uri",
    "training.mlflow_experiment",
    "scaling.num_workers",
    "scaling.expert_parallel_size",
    "scaling.ep",
    "scaling.dp_shard",
    "scaling.tp",
    "scaling.expert_tp",  # a layout: the same full weights, split another way
    "scaling.use_gpu",
    "scaling.cpus_per_worker",
    "scaling.max_failures",
    "scaling.address",
    "scaling.storage_path",
    "analyze",
)


def _flatten(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def job_diff(old: JobSpec, new: JobSpec) -> Dict[str, Tuple[Any, Any]]:
    """``{section.key: (old, new)}`` for every field that differs."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resume_job(output_dir: str | os.PathLike, overrides: Sequence[str] = (), job: Optional[str | os.PathLike] = None) -> JobSpec:
    """The job to resume in ``output_dir``: its recorded ``job.yaml``, with ``overrides`` that
    :data:`RESUME_ALLOWED` permits. ConfigError naming every refused field otherwise (and when
    ``job``, a job file given next to ``--resume``, differs from the recorded one)."""
    path = Path(output_dir).expanduser() / JOB_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found; there is no run to resume in {output_dir}")
    recorded = load_job(path)
    refused: List[str] = []
    if job is not None:
        given = load_job(job)
        refused += [f"{k} ({a!r} -> {b!r}, from {job})" for k, (a, b) in job_diff(recorded, given).items()
                    if k not in RESUME_ALLOWED and k != "training.output_dir"]
    resumed = load_job(path, overrides)
    refused += [f"{k} ({a!r} -> {b!r})" for k, (a, b) in job_diff(recorded, resumed).items() if k not in RESUME_ALLOWED]
    if refused:
        raise ConfigError(
            "--resume continues the recorded job; these changes would alter its optimisation: "
            + "; ".join(refused) + f". Allowed on resume: {', '.join(RESUME_ALLOWED)}"
        )
    return resumed


def record_job(spec: JobSpec, output_dir: str | os.PathLike) -> Path:
    """Write the resolved job to ``output_dir/job.yaml`` (never overwriting a different one: a
    changed spec goes beside it, as ``job.resumed-<time>.yaml``, and the diff is logged)."""
    import logging
    import time

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JOB_FILE
    if not path.exists():
        spec.to_yaml(path)
        return path
    try:
        old = load_job(path)
    except ConfigError:
        old = None
    if old == spec:
        return path
    beside = out / f"job.resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    spec.to_yaml(beside)
    diff = job_diff(old, spec) if old is not None else {"(unreadable job.yaml)": (None, None)}
    logging.getLogger(__name__).warning(
        "the job differs from %s; wrote %s (%s)", path, beside.name,
        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()),
    )
    return beside
