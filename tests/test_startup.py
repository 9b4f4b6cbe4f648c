"""Start-up (issue 16): what `boothkit train` / `sample` import before their first step, and what they need not.

A tiny-model run spends ~3/4 of its wall time before the first step, nearly all of it importing torch, diffusers,
transformers and peft (bench/startup.py). What boothkit adds of its own is kept out here: the parser imports
only the schema of the command being run, and a model's family module (SANA's pulls diffusers' SanaPipeline and
transformers' Gemma-2) only when a model of that family loads; training imports the DINO/CLIP metrics only with
--validation_every. Each check runs in a fresh interpreter, where `sys.modules` shows what was imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from boothkit.cli import SCHEMA_COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
SCHEMA_MODULES = {command.name: command.schema.split(":")[0] for command in SCHEMA_COMMANDS}


def imported_after(code: str) -> set[str]:
    """The modules in `sys.modules` after running `code` in a fresh interpreter (SystemExit is caught)."""
    probe = (f"import json, sys\ntry:\n    exec({code!r})\nexcept SystemExit:\n    pass\n"
             "print(json.dumps(sorted(sys.modules)), file=sys.__stderr__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stderr.strip().splitlines()[-1]))


def test_top_level_help_imports_no_schema():
    modules = imported_after("from boothkit.cli import main\nmain(['--help'])")
    assert "pydantic" not in modules and not modules & set(SCHEMA_MODULES.values())


@pytest.mark.parametrize("command", ["train", "sample"])
def test_a_command_imports_only_its_own_schema(command):
    modules = imported_after(f"from boothkit.cli import main\nmain([{command!r}, '--help'])")
    assert SCHEMA_MODULES[command] in modules
    others = {module for name, module in SCHEMA_MODULES.items() if name != command} - imported_after(
        f"import {SCHEMA_MODULES[command]}")  # what the command's schema itself imports, it needs
    assert not modules & others
    assert "boothkit.testing.tiny" not in modules


def test_a_partial_parser_says_what_the_whole_one_says():
    whole = build_parser()
    assert build_parser(["--help"]).format_help() == whole.format_help()
    for command in [*SCHEMA_MODULES, "tiny"]:
        part = build_parser([command, "--help"])
        assert _subparser(part, command).format_help() == _subparser(whole, command).format_help()


def _subparser(parser, name: str):
    return next(action for action in parser._actions if hasattr(action, "choices") and action.choices
                and name in action.choices).choices[name]


def test_an_sd_train_or_sample_imports_no_other_family_and_no_metrics():
    modules = imported_after("import boothkit.train.trainer, boothkit.sample\n"
                             "from boothkit.families import family_class_for\n"
                             "family_class_for({'_class_name': 'StableDiffusionPipeline'}, 'model')")
    assert "boothkit.families.sd" in modules
    unneeded = {"boothkit.families.sana", "boothkit.families.sdxl", "diffusers.pipelines.sana.pipeline_sana",
                "transformers.models.gemma2.modeling_gemma2", "boothkit.evaluate.metrics", "boothkit.testing.tiny"}
    assert not modules & unneeded


def test_every_family_is_found_by_its_pipeline_class():
    from boothkit import families

    assert {name for family in families.FAMILIES for name in family.pipeline_class_names} == \
        set(families.FAMILY_OF_PIPELINE)
    for name in families.FAMILY_OF_PIPELINE:
        assert name in families.family_class_for({"_class_name": name}, "model").pipeline_class_names
