"""`boothkit` command line. User errors end in one line on stderr and exit status 2, never a traceback.

Building the parser imports only the light schema modules (pydantic, no torch), and only the schema of the
command being run (`build_parser(argv)`): `--help`, `--version` and argument errors answer at once, and each
command imports torch, diffusers and friends when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Sequence

from boothkit import __version__
from boothkit.errors import BoothkitError, first_line

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    root = logging.getLogger("boothkit")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help layout, without breaking model ids such as facebook/dino-vits16 at their hyphens."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with the program name) and exit status 2, and every negative
    number is a value (`--lambda_range -1e3 5`), not only `-5` and `-0.5` (`-inf` too, so the schema can
    reject it by name)."""

    _NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self._NEGATIVE_NUMBER  # argparse's own test when no flag looks like one

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BoothkitError(f"{self.prog}: {message}")


@dataclass(frozen=True)
class SchemaCommand:
    """A command whose flags come from a pydantic schema (plus `--config FILE` with the same keys).

    `schema` is "module:Class" of a light module (importing it must not import torch); `run` receives the
    validated config and imports what the command needs.
    """

    name: str
    help: str
    schema: str
    run: Callable[[object], int]

    def load_schema(self) -> type:
        module_name, class_name = self.schema.split(":")
        return getattr(importlib.import_module(module_name), class_name)


def _run_train(config) -> int:
    from boothkit.train.trainer import train

    result = train(config)
    if not result.is_main_process:
        return 0
    what = "model (diffusers pipeline folder)" if result.train_mode == "full" else "LoRA"
    print(f"{what}: {result.lora_path}")
    if result.weak_path is not None:
        print(f"weak {'model' if result.train_mode == 'full' else 'LoRA'} (for autoguidance): {result.weak_path}")
    print(f"outputs: {result.output_dir}")
    return 0


def _run_sample(config) -> int:
    from boothkit.sample import run_sample

    paths = run_sample(config)
    print(f"{len(paths)} image(s) and samples.json in {paths[0].parent}")
    return 0


def _run_evaluate(config) -> int:
    from boothkit.evaluate.run import evaluate_command

    return evaluate_command(config)


def _run_score(config) -> int:
    from boothkit.evaluate.score import run_score

    print(json.dumps(run_score(config)))
    return 0


def _run_ui(config) -> int:
    from boothkit.ui.app import run_ui

    return run_ui(config)


def _run_study(config) -> int:
    from boothkit.study.run import run_study

    return run_study(config)


def _formats_command(name: str, config) -> int:
    from boothkit.formats import commands

    return getattr(commands, name)(config)


SCHEMA_COMMANDS: tuple[SchemaCommand, ...] = (
    SchemaCommand("train", "Train a DreamBooth LoRA from a few photos.", "boothkit.train.config:TrainConfig",
                  _run_train),
    SchemaCommand("sample", "Generate images with CFG, CFG + AutoGuidance or WIG.",
                  "boothkit.guidance.config:SampleConfig", _run_sample),
    SchemaCommand("evaluate", "Score subjects with DINO / CLIP-I / CLIP-T and tune guidance.",
                  "boothkit.evaluate.config:EvaluateConfig", _run_evaluate),
    SchemaCommand("score", "Score generated images against reference photos.", "boothkit.evaluate.score:ScoreConfig",
                  _run_score),
    SchemaCommand("export", "Write a LoRA for A1111, Forge, ComfyUI (kohya layout) or diffusers.",
                  "boothkit.formats.config:ExportConfig", lambda config: _formats_command("run_export", config)),
    SchemaCommand("info", "Show a LoRA file's format, base model, rank, alpha, trigger and metadata.",
                  "boothkit.formats.config:InfoConfig", lambda config: _formats_command("run_info", config)),
    SchemaCommand("merge", "Merge LoRAs (A.safetensors:0.8 B.safetensors:0.6) into one, or into the base model.",
                  "boothkit.formats.config:MergeConfig", lambda config: _formats_command("run_merge", config)),
    SchemaCommand("study", "The whole DreamBooth benchmark: train every subject with every recipe, evaluate every "
                  "method, tabulate.", "boothkit.study.config:StudyConfig", _run_study),
    SchemaCommand("ui", "A local web page to generate with CFG, AG and WIG (needs pip install 'boothkit[ui]').",
                  "boothkit.ui.config:UiConfig", lambda config: _run_ui(config)),
)


def command_schemas() -> dict[str, type]:
    """{command name: its pydantic schema} for every schema command."""
    return {command.name: command.load_schema() for command in SCHEMA_COMMANDS}


def _add_schema_command(subparsers, command: SchemaCommand, flags: bool = True) -> None:
    """The command's sub-parser; with `flags` False only its name and help line (`boothkit --help` lists it, and
    its schema module is not imported)."""
    parser = subparsers.add_parser(command.name, help=command.help, description=command.help)
    if not flags:
        return
    from boothkit.config import add_schema_arguments, build_config

    schema = command.load_schema()
    parser.add_argument("--config", help="YAML or TOML file with the same keys as the flags.")
    add_schema_arguments(parser, schema)
    parser.set_defaults(handler=lambda args: command.run(build_config(schema, args)))


_TINY_HELP = "Write a tiny random model (offline stand-in for tests and demos)."


def _add_tiny(subparsers, arguments: bool = True) -> None:
    parser = subparsers.add_parser("tiny", help=_TINY_HELP, description=_TINY_HELP)
    if not arguments:
        return
    from boothkit.testing.tiny import TINY_KINDS

    parser.add_argument("kind", choices=TINY_KINDS)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights. (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="Write into a non-empty folder boothkit did not write (its files are kept).")
    parser.set_defaults(handler=_run_tiny)


def _run_tiny(args: argparse.Namespace) -> int:
    from boothkit.testing.tiny import build_tiny

    print(build_tiny(args.kind, args.out_dir, seed=args.seed, overwrite=args.overwrite))
    return 0


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line. Given the `argv` it will parse, only the commands that `argv` names get their
    flags (a command's sub-parser runs only when its name is in `argv`): the others are listed by name and help
    line, and their schema modules are not imported. Without `argv`, every command gets its flags."""
    parser = _Parser(prog="boothkit", description="Personalize text-to-image diffusion models (DreamBooth-LoRA).")
    parser.add_argument("--version", action="version", version=f"boothkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    named = None if argv is None else set(argv)
    for command in SCHEMA_COMMANDS:
        _add_schema_command(subparsers, command, flags=named is None or command.name in named)
    _add_tiny(subparsers, arguments=named is None or "tiny" in named)
    return parser


def _close_progress_bars() -> None:
    """Close every open tqdm bar, so that an error printed next starts on a line of its own and stays last."""
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is None:
        return
    classes, bars = [tqdm_std.tqdm], []
    while classes:  # diffusers, transformers and tqdm.auto use subclasses, which may keep their own set
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        bars.extend(cls.__dict__.get("_instances", ()))
    for bar in set(bars):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar whose stream is gone must not hide the error
            pass


def _report(message: str) -> None:
    _close_progress_bars()
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr)


def _describe_os_error(error: OSError) -> str:
    """`No space left on device: '/out/x.png'`: the system's words and the path, as the shell says them (an
    OSError of a library, e.g. transformers' "can't load", has no strerror: its first line)."""
    reason = error.strerror or first_line(error)
    paths = [os.fsdecode(name) for name in (error.filename, error.filename2) if name is not None]
    return ": ".join([reason, *(repr(path) for path in paths)])


def main(argv: Sequence[str] | None = None) -> int:
    _configure_logging()
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(argv).parse_args(argv)
        return args.handler(args)
    except BoothkitError as error:
        _report(str(error))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _report("interrupted")
        return EXIT_INTERRUPTED
    except OSError as error:  # the user's environment: read-only folder, a file where a folder goes, disk full
        _report(_describe_os_error(error))
        return EXIT_USER_ERROR
    except UnicodeDecodeError as error:  # fallback; readers of users' files should name the file themselves
        _report(f"a file is not {error.encoding} text: {error.reason} at byte {error.start}")
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
