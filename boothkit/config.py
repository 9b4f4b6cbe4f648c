"""Validated command configurations: one pydantic schema per command is the single source of truth.

The schema's fields become the command-line flags (`--name`, with the field's description as help),
a `--config FILE` (YAML or TOML) may hold the same keys, and explicit flags override the file.
A typo anywhere — an unknown flag or an unknown key in the file — is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from boothkit.errors import BoothkitError

Schema = TypeVar("Schema", bound="CommandConfig")


class CommandConfig(BaseModel):
    """Base for command schemas: unknown keys are errors and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _unwrap_optional(annotation: Any) -> Any:
    """`int | None` → `int`; other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_schema_arguments(parser: argparse.ArgumentParser, schema: type[CommandConfig]) -> None:
    """Add one flag per schema field. Flags default to SUPPRESS so that only explicit ones override."""
    for name, field in schema.model_fields.items():
        annotation = _unwrap_optional(field.annotation)
        origin = typing.get_origin(annotation)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _help_text(field)}
        if annotation is bool:
            # `--flag` / `--no_flag`, so a flag set in a config file can be switched off again.
            parser.add_argument(f"--{name}", action="store_true", **kwargs)
            parser.add_argument(f"--no_{name}", dest=name, action="store_false", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
            continue
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
            if field.json_schema_extra and "bare" in field.json_schema_extra:
                kwargs.update(nargs="?", const=field.json_schema_extra["bare"])  # `--flag` alone means this
        elif origin in (list, tuple):
            item_types = [t for t in typing.get_args(annotation) if t is not Ellipsis]
            kwargs["type"] = item_types[0] if item_types else str
            kwargs["nargs"] = len(item_types) if origin is tuple and Ellipsis not in typing.get_args(annotation) else "+"
            if field.json_schema_extra and field.json_schema_extra.get("repeatable"):
                kwargs["nargs"] = None
                kwargs["action"] = "append"
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        elif annotation is Path:
            kwargs["type"] = str
        parser.add_argument(f"--{name}", **kwargs)


def _help_text(field) -> str:
    text = field.description or ""
    if field.default is not None and not callable(field.default) and field.default is not ...:
        text += f" (default: {field.default})"
    return text.replace("%", "%%")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) mapping of flag names to values."""
    path = Path(path)
    if not path.is_file():
        raise BoothkitError(f"config file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BoothkitError(f"config file '{path}' is malformed: {first_line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BoothkitError(f"config file '{path}' must hold a mapping of option names to values")
    # Accept the flag spelling too: `--max_train_steps` or `max-train-steps`.
    return {str(key).lstrip("-").replace("-", "_"): value for key, value in data.items()}


def build_config(schema: type[Schema], namespace: argparse.Namespace) -> Schema:
    """Defaults < `--config` file < explicit flags; then validate, turning errors into one line."""
    explicit = {key: value for key, value in vars(namespace).items() if key in schema.model_fields}
    config_path = getattr(namespace, "config", None)
    values = read_config_file(config_path) if config_path else {}
    unknown = sorted(set(values) - set(schema.model_fields))
    if unknown:
        raise BoothkitError(f"config file '{config_path}' has unknown key(s): {', '.join(unknown)}")
    values.update(explicit)
    return validate_config(schema, values)


def validate_config(schema: type[Schema], values: dict[str, Any]) -> Schema:
    try:
        return schema.model_validate(values)
    except ValidationError as error:
        raise BoothkitError(f"invalid option: {format_validation_error(error)}") from None


def format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"--{location}: {message}" if item["loc"] else message)
    return "; ".join(parts)


class ModelSourceOptions(CommandConfig):
    """Which revision and weight variant of the base model to load (hub ids and local folders alike)."""

    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    variant: str | None = Field(None, description="Weight variant to load, e.g. fp16.")
