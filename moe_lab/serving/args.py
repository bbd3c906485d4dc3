"""ServeArgs: the settings of the completions server, defined once (pure pydantic; no Ray).

    args = ServeArgs(checkpoint="outputs/demo/model", max_batch_size=16)
    args = load_serve_args("jobs/serve.yaml", overrides=["max_batch_size=16"])  # as `moe-lab serve` does
    args = resolve_checkpoint(args)      # absolute path; CheckpointError unless the replicas can load it

Where the fields are written down: ``jobs/serve.yaml`` (every field, for ``moe-lab serve
--config``) and the ``args:`` of the application in ``cluster/rayservice.yaml`` (a Ray
Serve config, for KubeRay, ``serve run`` and ``serve deploy``); a test keeps both in step
with this class (tests/orchestration/test_serve_manifests.py).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Dict, Literal, Mapping, Optional, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from .protocol import describe_validation_error


class ServeArgs(BaseModel):
    """Arguments of the serving app (validated once, at the boundary)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint directory (config.json + model.safetensors)")
    model_name: str = Field("moe-lab", min_length=1, description="the id clients send as `model`")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    max_experts_in_memory: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field(
        "auto", description="experts per MoE layer on the device; auto: all when the model fits, else as many as fit")
    expert_cache_size: int = Field(8, ge=0, description="host copies of experts per MoE layer")
    eviction_policy: str = Field("lru", description="expert-cache eviction: lru or lfu")
    prefetch_strategy: str = Field("usage_based", description="expert prefetch: usage_based or none")
    max_batch_size: int = Field(8, ge=1, description="KV slots: requests the engine decodes together")
    max_ongoing_requests: int = Field(64, ge=1, description="requests in flight per replica")
    max_queued_requests: int = Field(128, ge=-1, description="requests waiting beyond that (-1: unbounded); then 503")
    request_timeout_s: float = Field(60.0, gt=0, description="per request; then 504")
    max_tokens_limit: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest request body in bytes (1 MiB); larger ones get 413")
    api_key_env: Optional[str] = Field(None, min_length=1, description="env var holding the API key (unset: no auth)")
    num_replicas: int = Field(1, ge=1, description="model replicas (with max_replicas: the fewest)")
    max_replicas: Optional[int] = Field(
        None, ge=1, description="autoscale between num_replicas and this many replicas (null: a fixed num_replicas)")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="autoscaling: requests in flight per replica that Serve scales to keep")
    num_cpus_per_replica: float = Field(1.0, ge=0, description="Ray CPUs per replica")
    num_gpus_per_replica: float = Field(0.0, ge=0, description="Ray GPUs per replica")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads per replica")
    replica_start_attempts: Optional[int] = Field(
        None, ge=1, description="failed replica starts before the deploy gives up (null: Serve's, 3 per replica)")

    @model_validator(mode="after")
    def _replica_range(self) -> "ServeArgs":
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= num_replicas ({self.num_replicas})")
        return self

    def autoscaling_config(self) -> Optional[Dict[str, Any]]:
        """Ray Serve's ``autoscaling_config`` when ``max_replicas`` is set, else None."""
        if self.max_replicas is None:
            return None
        return {"min_replicas": self.num_replicas, "initial_replicas": self.num_replicas,
                "max_replicas": self.max_replicas, "target_ongoing_requests": self.target_ongoing_requests}

    @field_validator("eviction_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        from ..inference.expert_cache import EVICTION_POLICIES

        if v not in EVICTION_POLICIES:
            raise ValueError(f"must be one of {list(EVICTION_POLICIES)}")
        return v

    @field_validator("prefetch_strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from ..inference.expert_cache import PREFETCH_STRATEGIES

        if v not in PREFETCH_STRATEGIES:
            raise ValueError(f"must be one of {list(PREFETCH_STRATEGIES)}")
        return v


def serve_args_help() -> str:
    """One line per ServeArgs field: name, default and description (for ``--help``)."""
    lines = []
    for name, info in ServeArgs.model_fields.items():
        default = "required" if info.is_required() else f"default {info.default!r}"
        lines.append(f"{name} ({default}): {info.description}")
    return "\n".join(lines)


#: fields of earlier versions, and why they went
_REMOVED = {"batch_wait_timeout_s": "the engine batches continuously: a request joins the running batch at the "
                                    "next decode step; remove the key"}


def _describe(exc: ValidationError, origin: Mapping[str, str], labels: Mapping[str, str]) -> str:
    """A ConfigError message naming where the bad value came from (file, flag or --set)."""
    field, message, err = describe_validation_error(exc)
    where = origin.get(field or "", field or "serve args")
    if err.get("type") == "extra_forbidden" and field in _REMOVED:
        return f"{where}: no longer a setting ({_REMOVED[field]})"
    if err.get("type") == "extra_forbidden":
        close = difflib.get_close_matches(field or "", list(ServeArgs.model_fields), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; the fields are: {', '.join(ServeArgs.model_fields)}"
        return f"{where}: unknown key{hint}"
    if err.get("type") == "missing":
        given_as = f"give {labels[field]} or " if field in labels else ""
        return f"{field}: required ({given_as}set `{field}:` in the --config file)"
    return f"{where}: {message.split(': ', 1)[-1]}"


def _parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    from ..jobs import apply_overrides  # the one parser of --set values (JSON, then YAML, else text)

    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--set expects key=value with a ServeArgs field as the key, got {item!r}")
    return apply_overrides({}, [item.strip() for item in overrides])


def load_serve_args(config: Union[str, os.PathLike, None] = None,
                    flags: Optional[Mapping[str, Tuple[str, Any]]] = None,
                    overrides: Sequence[str] = ()) -> ServeArgs:
    """ServeArgs from a YAML file of its fields, then named flags and ``--set key=value``.

    Args:
        config: a YAML mapping of ServeArgs fields (``jobs/serve.yaml``); not a Ray Serve
            config file (one with ``applications:``).
        flags: ``{field: (flag label, value)}``, e.g. ``{"num_replicas": ("--replicas", 2)}``;
            a None value means the flag was not given.
        overrides: ``key=value`` strings; values parse as JSON, then YAML, else text.

    Later sources win over the file; a field given both by a flag and by ``--set`` is an
    error. Raises ConfigError naming the file, flag or key of the first bad value.
    """
    data: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    if config is not None:
        from ..jobs import read_yaml_mapping

        raw = read_yaml_mapping(config, "serve config", "ServeArgs fields (see jobs/serve.yaml)")
        if "applications" in raw:
            raise ConfigError(
                f"{config} is a Ray Serve config file (it has `applications:`); --config takes a YAML mapping of "
                "ServeArgs fields such as jobs/serve.yaml. Run a Serve config with Ray's `serve run` or `serve deploy`."
            )
        data.update(raw)
        origin.update({key: f"{config}: {key}" for key in raw})
    labels = {field: label for field, (label, _) in (flags or {}).items()}
    for field, (label, value) in (flags or {}).items():
        if value is not None:
            data[field], origin[field] = value, label
    for key, value in _parse_overrides(overrides).items():
        if (flags or {}).get(key, (None, None))[1] is not None:
            raise ConfigError(f"--set {key}: also given as {labels[key]}; give it once")
        data[key], origin[key] = value, f"--set {key}"
    try:
        return ServeArgs.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin, labels)) from None


def resolve_checkpoint(args: ServeArgs) -> ServeArgs:
    """A copy of ``args`` with an absolute checkpoint path (a relative one is taken from the
    current directory), checked as the replicas will load it but without reading tensor data
    (:func:`~moe_lab.serving.preflight.check_servable_checkpoint`).

    Raises:
        CheckpointError: the directory is not a checkpoint the server can load (one line
            naming the file and the problem).
    """
    from .preflight import check_servable_checkpoint

    return args.model_copy(update={"checkpoint": str(check_servable_checkpoint(args.checkpoint))})


def serve_args_from(args: Union[ServeArgs, Mapping[str, Any]], source: str = "serve args") -> ServeArgs:
    """``args`` as ServeArgs: a mapping (a Serve config's ``args:``) is validated; ConfigError names the field."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(dict(args))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)[1]}") from None
