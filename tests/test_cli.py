"""The command line itself: finite numbers in every schema, help text, --version, fast help without torch,
flags named in messages, and how errors are printed (one line, last, at column 0)."""

from __future__ import annotations

import argparse
import ast
import errno
import json
import re
import subprocess
import sys
import time
import tomllib
import typing
from pathlib import Path

import pytest
from pydantic import AliasChoices, Field
from tqdm import tqdm

import boothkit
from boothkit.cli import _Parser, build_parser, command_schemas, main
from boothkit.config import CommandConfig, add_schema_arguments, build_config
from boothkit.errors import BoothkitError

REPO = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate", "matplotlib")

# Flags that boothkit's texts may name although no boothkit command has them: the benchmark scripts' own
# flags (README's Development section) and those of the launchers boothkit runs under.
OTHER_TOOLS_FLAGS = {"--family", "--reference_script", "--model", "--nproc_per_node", "--num_processes",
                     "--logdir",  # tensorboard --logdir (README, `--report_to tensorboard`)
                     "--nodes"}  # SLURM #SBATCH --nodes (README, boothkit study)


# --------------------------------------------------------------------------------------------- helpers


def _contains_float(annotation) -> bool:
    return annotation is float or any(_contains_float(arg) for arg in typing.get_args(annotation))


def _flag_values(annotation, value: str) -> list[str]:
    """Command-line values that put `value` into a field: one item for scalars and lists, all items of a
    fixed-length tuple."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if len(args) == 1:
        annotation, args = args[0], list(typing.get_args(args[0]))
    if typing.get_origin(annotation) is tuple and Ellipsis not in args:
        return ["1"] * (len(args) - 1) + [value]
    return [value]


def _required_flags(schema, folder: Path) -> list[str]:
    """Valid values for the schema's required fields (paths inside `folder` that do not exist)."""
    flags, positional = [], []
    for name, field in schema.model_fields.items():
        if field.is_required():
            value = "1" if field.annotation in (int, float) else str(folder / f"missing-{name}")
            if (field.json_schema_extra or {}).get("positional"):
                positional.append(value)
            else:
                flags += [f"--{name}", value]
    flags = positional + flags
    if "prompt" in schema.model_fields:
        flags += ["--prompt", "a photo of sks dog"]
    if "lora_base_dir" in schema.model_fields:  # evaluate: --lora_base_dir or --lora_dir
        flags += ["--lora_base_dir", str(folder / "missing-lora_base_dir")]
    if "instance_prompt" in schema.model_fields:  # required unless --concepts_list / --dataset_config
        flags += ["--instance_data_dir", str(folder / "missing-instance_data_dir"), "--instance_prompt", "a photo of sks dog"]
    return flags


def _error_line(result) -> str:
    lines = result.err.strip().split("\n")
    assert len(lines) == 1, result.err
    return lines[0]


def _help_entries(command: str, capsys) -> dict[str, str]:
    """{first option string: its whole help entry, whitespace normalised} of `boothkit COMMAND --help`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out.split("options:", 1)[1]
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current is not None:
            entries[current] += " " + line
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


# --------------------------------------------------------------------------------------------- non-finite numbers


def _float_fields() -> list[tuple[str, str]]:
    return [(command, name) for command, schema in command_schemas().items()
            for name, field in schema.model_fields.items() if _contains_float(field.annotation)]


def test_every_command_has_float_fields_to_check():
    commands = {command for command, _ in _float_fields()}
    assert {"train", "sample", "evaluate"} <= commands
    assert ("evaluate", "lambda_range") in _float_fields() and ("evaluate", "omega_grid") in _float_fields()


@pytest.mark.parametrize("command,name", _float_fields())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_numbers_are_refused_in_every_float_field(command, name, value, run_cli, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    schema = command_schemas()[command]
    values = _flag_values(schema.model_fields[name].annotation, value)
    result = run_cli(command, *_required_flags(schema, tmp_path), f"--{name}", *values)
    assert result.code == 2
    assert _error_line(result) == f"error: invalid option: --{name}: must be a finite number"


@pytest.mark.parametrize("suffix,text,command,flag", [
    (".yaml", "learning_rate: .nan\n", "train", "learning_rate"),
    (".yaml", "lambda_range: [1e400, 2]\n", "evaluate", "lambda_range"),
    (".yaml", "omega_grid: [0, nan]\n", "evaluate", "omega_grid"),
    (".toml", "guidance_scale = inf\n", "sample", "guidance_scale"),
    (".toml", "prior_loss_weight = -inf\n", "train", "prior_loss_weight"),
])
def test_non_finite_numbers_are_refused_in_config_files(suffix, text, command, flag, run_cli, tmp_path,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_file = tmp_path / f"config{suffix}"
    config_file.write_text(text)
    result = run_cli(command, "--config", config_file, *_required_flags(command_schemas()[command], tmp_path))
    assert result.code == 2
    assert _error_line(result) == f"error: invalid option: --{flag}: must be a finite number"


def test_missing_required_options_are_named(run_cli, tmp_path):
    result = run_cli("score", "--images", tmp_path)
    assert _error_line(result) == "error: invalid option: --references: required (a flag or a --config key)"


def test_finite_numbers_still_pass(tmp_path):
    schema = command_schemas()["evaluate"]
    args = build_parser().parse_args(["evaluate", *_required_flags(schema, tmp_path), "--lambda_range", "-1e5",
                                      "2", "--omega_grid", "0", "0.25", "--guidance_scale", "-3.5"])
    config = build_config(schema, args)
    assert config.lambda_range == (-1e5, 2.0) and config.omega_grid == [0.0, 0.25]
    assert config.guidance_scale == -3.5


# --------------------------------------------------------------------------------------------- help and version


@pytest.mark.parametrize("command", ["train", "sample", "evaluate", "score"])
def test_help_shows_required_defaults_and_both_forms_of_switches(command, capsys):
    entries = _help_entries(command, capsys)
    schema = command_schemas()[command]
    text = " ".join(entries.values())
    assert "PydanticUndefined" not in text
    for name, field in schema.model_fields.items():
        if field.annotation is bool:
            assert f"--{name}, --no_{name}" in entries[f"--{name}"]
            assert entries[f"--{name}"].endswith(f"(default: {field.default})")
        elif field.is_required():
            assert entries[f"--{name}"].endswith("(required)"), entries[f"--{name}"]


def test_help_shows_defaults_as_typed_on_the_command_line(capsys):
    train = _help_entries("train", capsys)
    assert train["--max_train_steps"].endswith("(default: 500)")
    assert train["--lr_scheduler"].endswith("(default: constant)")
    assert "(default" not in train["--class_data_dir"]  # None: unset, the description says what happens
    evaluate = _help_entries("evaluate", capsys)
    assert evaluate["--lambda_range"].endswith("(default: -10.0 10.0)")
    assert evaluate["--omega_grid"].endswith("(default: 0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0)")
    assert evaluate["--dino_model"].endswith("(default: facebook/dino-vits16)")
    assert _help_entries("sample", capsys)["--prompt"].endswith("(repeatable)")


def test_no_switch_turns_off_a_switch_set_in_a_config_file(tmp_path):
    schema = command_schemas()["train"]
    config_file = tmp_path / "train.yaml"
    config_file.write_text("random_flip: true\ncache_latents: true\n")
    parser = build_parser()
    required = _required_flags(schema, tmp_path)
    args = parser.parse_args(["train", *required, "--config", str(config_file), "--no_random_flip",
                              "--no_cache_latents", "--cache_latents"])
    config = build_config(schema, args)
    assert config.random_flip is False and config.cache_latents is True
    assert build_config(schema, parser.parse_args(["train", *required, "--config", str(config_file)])).random_flip


class _RenamedSchema(CommandConfig):
    model_path: str = Field(description="New name.", validation_alias=AliasChoices("model_path", "old_model_path"))
    fast: bool = Field(False, description="A switch with an old name.", validation_alias=AliasChoices("fast", "quick"))


def test_an_old_field_name_is_a_hidden_alias_for_flags_and_files(tmp_path):
    parser = _Parser(prog="demo")
    add_schema_arguments(parser, _RenamedSchema)
    assert "old_model_path" not in parser.format_help() and "quick" not in parser.format_help()
    config = build_config(_RenamedSchema, parser.parse_args(["--old_model_path", "m", "--quick"]))
    assert (config.model_path, config.fast) == ("m", True)
    config_file = tmp_path / "old.yaml"
    config_file.write_text("old_model_path: from-file\nquick: true\n")
    args = parser.parse_args(["--no_quick"])
    args.config = str(config_file)
    config = build_config(_RenamedSchema, args)
    assert (config.model_path, config.fast) == ("from-file", False)


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    project_version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"boothkit {project_version}\n"
    assert boothkit.__version__ == project_version


def test_score_defaults_are_the_metric_defaults():
    from boothkit.evaluate import metrics

    fields = command_schemas()["score"].model_fields
    assert fields["dino_model"].default == metrics.DEFAULT_DINO_MODEL
    assert fields["clip_model"].default == metrics.DEFAULT_CLIP_MODEL


# --------------------------------------------------------------------------------------------- fast help

_HELP_PROBE = """
import json, sys, time
from boothkit.cli import main
calls = [["--help"], ["--version"], ["train", "--help"], ["sample", "--help"], ["evaluate", "--help"],
         ["score", "--help"], ["tiny", "--help"], ["train", "--no_such_flag"], ["sample", "--seed", "x"],
         ["evaluate", "--method", "nope"], ["nope"], [], ["train", "--learning_rate", "nan"],
         ["evaluate", "--lambda_range", "3", "1", "--config", "missing.yaml"]]
codes = []
for argv in calls:
    try:
        codes.append(main(argv))
    except SystemExit as exit_:
        codes.append(exit_.code)
heavy = sorted(name for name in {heavy} if name in sys.modules)
print(json.dumps({{"codes": codes, "heavy": heavy}}), file=sys.__stderr__)
"""


def test_help_version_and_argument_errors_import_no_heavy_library():
    probe = _HELP_PROBE.format(heavy=repr(HEAVY_MODULES))
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2]
    assert report["heavy"] == []


def test_help_answers_fast():
    seconds = []
    for argv in (["--help"], ["train", "--help"], ["evaluate", "--help"]):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "boothkit", *argv], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        seconds.append(time.perf_counter() - start)
        assert result.returncode == 0 and "usage: boothkit" in result.stdout
    print(f"python -m boothkit --help / train --help / evaluate --help: {', '.join(f'{s:.2f}' for s in seconds)} s")
    assert max(seconds) < 3.0


# --------------------------------------------------------------------------------------------- flags in messages


def _all_flags() -> set[str]:
    flags: set[str] = set()

    def collect(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.update(option for option in action.option_strings if option.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for subparser in action.choices.values():
                    collect(subparser)

    collect(build_parser())
    return flags


_FLAG = re.compile(r"(?<![\w-])--[a-z](?:[a-z0-9_]*[a-z0-9])?(?![\w{-])")


def _string_literals(source: str) -> list[str]:
    """Every string constant of a module; an f-string is one text with "{" where a value goes."""
    tree = ast.parse(source)
    inside_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            texts.append("".join(part.value if isinstance(part, ast.Constant) else "{" for part in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_fstrings:
            texts.append(node.value)
    return texts


def test_flag_pattern_reads_fstrings_and_placeholders():
    texts = _string_literals('x = f"--no_{name} and --real_flag, --{name}"\ny = "see `--other`, --NAME or --no_"')
    assert [_FLAG.findall(text) for text in texts] == [["--real_flag"], ["--other"]]


def _bench_flags() -> set[str]:
    """The flags the benchmarks' own parsers declare (`add_argument("--x", ...)` in bench/*.py): docs/performance.md
    gives their command lines."""
    flags = set()
    for path in (REPO / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                flags |= {arg.value for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")}
    return flags


def test_messages_and_docs_name_only_flags_that_exist():
    flags = _all_flags() | OTHER_TOOLS_FLAGS | _bench_flags()
    named: dict[str, set[str]] = {}
    for path in sorted((REPO / "boothkit").rglob("*.py")):
        for text in _string_literals(path.read_text(encoding="utf-8")):
            for flag in _FLAG.findall(text):
                named.setdefault(flag, set()).add(str(path.relative_to(REPO)))
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for flag in _FLAG.findall(path.read_text(encoding="utf-8")):
            named.setdefault(flag, set()).add(str(path.relative_to(REPO)))
    assert len(named) > 40  # the scan sees the messages at all
    unknown = {flag: sorted(paths) for flag, paths in named.items() if flag not in flags}
    assert unknown == {}


# --------------------------------------------------------------------------------------------- how errors end


def _fail_in_tiny(monkeypatch, error: BaseException, open_bar: bool = False) -> None:
    """Make `boothkit tiny` raise `error`, optionally with a progress bar left open on stderr."""

    def fail(kind, out_dir, seed=0, overwrite=False):
        if open_bar:
            bar = tqdm(total=10, desc="generating", file=sys.stderr)
            bar.update(3)
        raise error

    monkeypatch.setattr("boothkit.testing.tiny.build_tiny", fail)


def _last_visible_line(stderr: str) -> str:
    """What a terminal shows on the last line: the text after the last carriage return of the last line."""
    return stderr.rstrip("\n").split("\n")[-1].split("\r")[-1]


@pytest.mark.parametrize("error,expected", [
    (BoothkitError("no readable image in 'x'"), "error: no readable image in 'x'"),
    (KeyboardInterrupt(), "error: interrupted"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/0001.png"),
     "error: No space left on device: '/out/0001.png'"),
])
def test_open_progress_bars_are_closed_before_the_error(error, expected, run_cli, monkeypatch, tmp_path):
    _fail_in_tiny(monkeypatch, error, open_bar=True)
    result = run_cli("tiny", "sd15", tmp_path / "out")
    assert result.code in (2, 130)
    lines = result.err.rstrip("\n").split("\n")
    assert lines[-1] == expected  # last, and alone on its line: the bar ended its own line first
    assert "generating:  30%" in lines[-2]
    assert not tqdm._instances


def test_os_errors_are_one_line(run_cli, tmp_path):
    regular_file = tmp_path / "photo.jpg"
    regular_file.write_bytes(b"not a folder")
    result = run_cli("tiny", "sd15", regular_file / "out")
    assert result.code == 2
    assert re.fullmatch(r"error: (output_dir '.*photo\.jpg/out' is below '.*photo\.jpg', which is a file|(File exists|Not a directory): '.*photo\.jpg.*')", _error_line(result))


def test_a_library_os_error_is_its_first_line(run_cli, monkeypatch, tmp_path):
    _fail_in_tiny(monkeypatch, OSError("Can't load the model for 'x'. If you were trying to load it from the hub,\n"
                                       "make sure you don't have a local directory with the same name."))
    result = run_cli("tiny", "sd15", tmp_path / "out")
    assert result.code == 2
    assert _error_line(result) == "error: Can't load the model for 'x'. If you were trying to load it from the hub,"


def test_permission_error_names_the_file(run_cli, monkeypatch, tmp_path):
    _fail_in_tiny(monkeypatch, PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out")))
    result = run_cli("tiny", "sd15", tmp_path / "out")
    assert result.code == 2 and _error_line(result) == f"error: Permission denied: '{tmp_path / 'out'}'"


def test_a_file_that_is_not_utf8_is_one_line(run_cli, monkeypatch, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a photo of sks dog\n".encode("utf-16"))
    result = run_cli("sample", "--pretrained_model_name_or_path", tmp_path / "model", "--prompts_file", prompts,
                     "--output_dir", tmp_path / "out")
    assert result.code == 2 and _error_line(result).startswith("error: ")
    _fail_in_tiny(monkeypatch, UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    result = run_cli("tiny", "sd15", tmp_path / "out")
    assert result.code == 2 and _error_line(result) == "error: a file is not utf-8 text: invalid start byte at byte 0"


def test_unexpected_exceptions_keep_their_traceback(monkeypatch, tmp_path):
    _fail_in_tiny(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["tiny", "sd15", str(tmp_path / "out")])
