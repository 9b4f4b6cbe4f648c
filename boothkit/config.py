"""Validated command configurations: one pydantic schema per command is the single source of truth.

The schema's fields become the command-line flags (`--NAME`, with the field's description and default as
help; a bool field gives the pair `--NAME` / `--no_NAME`), a `--config FILE` (YAML or TOML) may hold the
same keys, and explicit flags override the file. A typo anywhere — an unknown flag or an unknown key in the
file — is an error, never silently ignored, and so is a NaN or infinite number in any float field.

A field may keep an old name as a hidden alias: `Field(validation_alias=AliasChoices("new_name", "old_name"))`
gives the flag `--NEW_NAME`, a hidden `--OLD_NAME` with the same effect, and accepts both keys in a file.
"""

from __future__ import annotations

import argparse
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticUndefined

from boothkit.errors import BoothkitError, first_line

Schema = TypeVar("Schema", bound="CommandConfig")


class CommandConfig(BaseModel):
    """Base for command schemas: unknown keys are errors, assignments are validated, and every float —
    alone, optional, or inside a tuple or list — must be finite (NaN and ±inf are refused, also as text
    such as "nan" or "1e400" from a config file)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _unwrap_optional(annotation: Any) -> Any:
    """`int | None` → `int`; other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


class _Switch(argparse.Action):
    """`--NAME` sets True and `--no_NAME` sets False (so a switch set in a config file can be turned off)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no_"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def flag_aliases(name: str, field) -> list[str]:
    """Other names of a field (from `validation_alias`), each a hidden flag and an accepted file key."""
    alias = field.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
    return [choice for choice in choices if isinstance(choice, str) and choice != name]


def add_schema_arguments(parser: argparse.ArgumentParser, schema: type[CommandConfig]) -> None:
    """Add one flag per schema field. Flags default to SUPPRESS so that only explicit ones override. A field
    with `json_schema_extra={"positional": True}` is a positional argument instead (`boothkit info FILE`)."""
    for name, field in schema.model_fields.items():
        kwargs = _argument_kwargs(field)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("positional"):
            kwargs.pop("default", None)
            parser.add_argument(name, metavar=name.upper(), **kwargs)
            continue
        if kwargs.get("action") is _Switch:
            parser.add_argument(f"--{name}", f"--no_{name}", dest=name, **kwargs)
        else:
            parser.add_argument(f"--{name}", dest=name, **kwargs)
        for alias in flag_aliases(name, field):
            hidden = dict(kwargs, help=argparse.SUPPRESS)
            flags = [f"--{alias}", f"--no_{alias}"] if kwargs.get("action") is _Switch else [f"--{alias}"]
            parser.add_argument(*flags, dest=name, **hidden)


def _argument_kwargs(field) -> dict[str, Any]:
    """argparse keyword arguments for one field: type, nargs, choices and help from its annotation."""
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _help_text(field)}
    if annotation is bool:
        kwargs["action"] = _Switch
    elif origin is Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
        if "bare" in extra:
            kwargs.update(nargs="?", const=extra["bare"])  # `--flag` alone means this
    elif origin in (list, tuple):
        item_types = [typing.get_args(t)[0] if typing.get_origin(t) is typing.Annotated else t
                      for t in typing.get_args(annotation) if t is not Ellipsis]  # `Annotated[str, check]`: str
        kwargs["type"] = item_types[0] if item_types else str
        fixed_length = origin is tuple and Ellipsis not in typing.get_args(annotation)
        kwargs["nargs"] = len(item_types) if fixed_length else "+"
        if extra.get("repeatable"):
            kwargs["nargs"] = None
            kwargs["action"] = "append"
    elif annotation in (int, float, str):
        kwargs["type"] = annotation
    elif annotation is Path:
        kwargs["type"] = str
    return kwargs


def _help_text(field) -> str:
    """The description, then "(required)", "(repeatable)" or "(default: VALUE)" with VALUE as typed on the
    command line; a default of None (unset) adds nothing, the description says what happens then."""
    text = field.description or ""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if field.is_required():
        note = "required"
    elif extra.get("repeatable"):
        note = "repeatable"
    else:
        default = field.default_factory() if field.default_factory is not None else field.default
        note = None if default is None or default is PydanticUndefined else f"default: {_as_flag_value(default)}"
    if note:
        text = f"{text} ({note})" if text else f"({note})"
    return text.replace("%", "%%")


def _as_flag_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_as_flag_value(item) for item in value) if value else "none"
    return str(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) mapping of flag names to values."""
    path = Path(path)
    if not path.is_file():
        raise BoothkitError(f"config file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise BoothkitError(f"config file '{path}' is malformed: {first_line(error)}") from None
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
    alias_names = {alias: name for name, field in schema.model_fields.items() for alias in flag_aliases(name, field)}
    unknown = sorted(set(values) - set(schema.model_fields) - set(alias_names))
    if unknown:
        raise BoothkitError(f"config file '{config_path}' has unknown key(s): {', '.join(unknown)}")
    values = {alias_names.get(key, key): value for key, value in values.items()}
    values.update(explicit)
    return validate_config(schema, values)


def validate_config(schema: type[Schema], values: dict[str, Any]) -> Schema:
    try:
        return schema.model_validate(values)
    except ValidationError as error:
        raise BoothkitError(f"invalid option: {format_validation_error(error)}") from None


def format_validation_error(error: ValidationError) -> str:
    """One line: `--FLAG: problem` per problem (a tuple or list item is reported under its flag)."""
    parts: list[str] = []
    for item in error.errors():
        if item["type"] == "finite_number":
            message = "must be a finite number"
        elif item["type"] == "missing":
            message = "required (a flag or a --config key)"
        else:
            message = item["msg"].removeprefix("Value error, ")
        part = f"--{item['loc'][0]}: {message}" if item["loc"] else message
        if part not in parts:
            parts.append(part)
    return "; ".join(parts)


class ModelSourceOptions(CommandConfig):
    """Which revision and weight variant of the base model to load (hub ids and local folders alike)."""

    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    variant: str | None = Field(None, description="Weight variant to load, e.g. fp16.")
