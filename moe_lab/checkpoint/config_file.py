"""``config.json`` of a moe_lab checkpoint -> a validated :class:`~moe_lab.config.MoEConfig`.

    raw = read_config_json(Path("ckpt"))                  # the JSON object (any format)
    config = moe_config_from_json(raw, Path("ckpt/config.json"), dropout=0.0)

The file is checked more strictly than Python callers are: a JSON value must have the
field's own type (``"vocab_size": 1e9`` is a float, not an integer, and is refused rather
than becoming a billion-row embedding). Every problem of the file is reported at once, in
one line naming the file and each field: ``ckpt/config.json: invalid configuration:
hidden_size = -128: Input should be greater than 0``. Overrides (``dropout=0.0``) are
Python values and are validated as :class:`MoEConfig` validates them.
"""

from __future__ import annotations

import typing
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List

from ..config import MoEConfig
from ..errors import CheckpointError, ConfigError
from .files import CONFIG_NAME, read_json_object


def read_config_json(directory: Path) -> Dict[str, Any]:
    """The JSON object in ``directory/config.json`` (CheckpointError when absent or not an object)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}; not a checkpoint directory")
    return read_json_object(path)


def _json_kind(annotation: Any) -> tuple:
    """(kind, optional) of a field annotation: kind is "int", "float", "bool" or "str"."""
    optional = False
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if annotation is bool:
        return "bool", optional
    if annotation is int:
        return "int", optional
    if annotation is float:
        return "float", optional
    if typing.get_origin(annotation) is typing.Literal or (isinstance(annotation, type) and issubclass(annotation, (str, Enum))):
        return "str", optional
    return "any", optional


_EXPECTED = {
    "int": "an integer (a JSON number without a fraction or exponent)",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
}


def _type_problems(raw: Dict[str, Any]) -> List[str]:
    problems = []
    for name, value in raw.items():
        field = MoEConfig.model_fields.get(name)
        if field is None:
            continue  # unknown fields are reported by MoEConfig itself
        kind, optional = _json_kind(field.annotation)
        if value is None:
            ok = optional
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            got = "null" if value is None else type(value).__name__
            problems.append(f"{name} = {value!r}: expected {_EXPECTED[kind]}{' or null' if optional else ''}, got {got}")
    return problems


def one_line(error: ConfigError) -> str:
    """A MoEConfig validation message on one line, without the ``MoEConfig.`` prefixes."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if lines and lines[0].rstrip(":") == "invalid configuration":
        lines = lines[1:]
    lines = [ln[len("MoEConfig: ") :] if ln.startswith("MoEConfig: ") else ln.replace("MoEConfig.", "", 1) for ln in lines]
    return "; ".join(lines)


def moe_config_from_json(raw: Dict[str, Any], path: Path, **overrides: Any) -> MoEConfig:
    """Validate a moe_lab ``config.json`` (strict JSON types), then apply ``overrides``.

    Raises:
        CheckpointError: the file's configuration is invalid (one line: the file, each field).
        ConfigError: the file is valid but the overrides are not.
    """
    problems = _type_problems(raw)
    if problems:
        raise CheckpointError(f"{path}: invalid configuration: " + "; ".join(problems))
    try:
        config = MoEConfig.from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid configuration: {one_line(exc)}") from None
    if not overrides:
        return config
    try:
        return MoEConfig.from_dict({**raw, **overrides})
    except ConfigError as exc:
        raise ConfigError(f"the overrides {sorted(overrides)} do not fit {path}: {one_line(exc)}") from None
