"""`boothkit` command line. User errors end in one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from boothkit.errors import BoothkitError

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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with the program name) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BoothkitError(f"{self.prog}: {message}")


def _add_schema_command(subparsers, name: str, help_text: str, schema: type, run: Callable) -> None:
    """A command whose flags come from a pydantic schema (plus `--config FILE` with the same keys)."""
    from boothkit.config import add_schema_arguments, build_config

    parser = subparsers.add_parser(name, help=help_text)
    parser.add_argument("--config", help="YAML or TOML file with the same keys as the flags.")
    add_schema_arguments(parser, schema)
    parser.set_defaults(handler=lambda args: run(build_config(schema, args)))


def _add_train(subparsers) -> None:
    from boothkit.train.config import TrainConfig

    _add_schema_command(subparsers, "train", "Train a DreamBooth LoRA from a few photos.", TrainConfig, _run_train)


def _run_train(config) -> int:
    from boothkit.train.trainer import train

    result = train(config)
    if not result.is_main_process:
        return 0
    print(f"LoRA: {result.lora_path}")
    if result.weak_path is not None:
        print(f"weak LoRA (for autoguidance): {result.weak_path}")
    print(f"outputs: {result.output_dir}")
    return 0


def _add_sample(subparsers) -> None:
    from boothkit.guidance.config import SampleConfig

    _add_schema_command(subparsers, "sample", "Generate images with CFG, CFG + AutoGuidance or WIG.",
                        SampleConfig, _run_sample)


def _run_sample(config) -> int:
    from boothkit.sample import run_sample

    paths = run_sample(config)
    print(f"{len(paths)} image(s) and samples.json in {paths[0].parent}")
    return 0


def _add_evaluate(subparsers) -> None:
    from boothkit.evaluate.config import EvaluateConfig

    _add_schema_command(subparsers, "evaluate", "Score subjects with DINO / CLIP-I / CLIP-T and tune guidance.",
                        EvaluateConfig, _run_evaluate)


def _run_evaluate(config) -> int:
    from boothkit.evaluate.outputs import REPORT_NAME, SUMMARY_NAME, summary_csv
    from boothkit.evaluate.search import run_evaluate

    results = run_evaluate(config)
    if results is not None:
        print(summary_csv(config, results), end="")
        print(f"summary: {Path(config.output_dir) / SUMMARY_NAME}; report: {Path(config.output_dir) / REPORT_NAME}")
    return 0


def _add_score(subparsers) -> None:
    from boothkit.evaluate.score import ScoreConfig

    _add_schema_command(subparsers, "score", "Score generated images against reference photos.",
                        ScoreConfig, _run_score)


def _run_score(config) -> int:
    from boothkit.evaluate.score import run_score

    print(json.dumps(run_score(config)))
    return 0


def _add_tiny(subparsers) -> None:
    from boothkit.testing.tiny import TINY_KINDS

    parser = subparsers.add_parser("tiny", help="Write a tiny random model (offline stand-in for tests and demos).")
    parser.add_argument("kind", choices=TINY_KINDS)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_run_tiny)


def _run_tiny(args: argparse.Namespace) -> int:
    from boothkit.testing.tiny import build_tiny

    print(build_tiny(args.kind, args.out_dir, seed=args.seed))
    return 0


COMMANDS: tuple[Callable, ...] = (_add_train, _add_sample, _add_evaluate, _add_score, _add_tiny)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="boothkit", description="Personalize text-to-image diffusion models (DreamBooth-LoRA).")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _configure_logging()
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except BoothkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
