"""Every `boothkit` command of README.md runs as written on a CPU-only machine.

Each ```bash block of the README is read (line continuations joined, comments dropped) and every line that
starts with `boothkit` is run through `boothkit.cli.main`, in README order, in one temporary folder used as
the working directory, so a command finds what the commands above it wrote (sample reads the LoRA that train
wrote). Only three things are changed, each by an explicit table below:

- `MODEL_IDS`: hub ids are replaced by tiny random models of the same kind (no network here);
- `USER_INPUTS`: files the user brings (photos, a prompts file) are created where a command reads them,
  when the README's commands did not write them: a copy of the bundled sample subject, and so on;
- `FAST_OVERRIDES`: flags appended at the end of a command (argparse: the later flag wins) so that it runs
  in seconds: fewer steps, images and evaluations. They change amounts, never what a command does.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from boothkit.cli import main
from boothkit.data.images import sample_subject_dir
from boothkit.testing.tiny import build_tiny

README = Path(__file__).resolve().parents[1] / "README.md"

# Hub id -> tiny model kind (`boothkit tiny KIND`). A hub id given to a model flag but missing here fails the test.
MODEL_IDS = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2-1-base": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "madebyollin/sdxl-vae-fp16-fix": "sdxl",  # a VAE: the tiny SDXL's vae/ folder serves (`load_vae`)
    "stabilityai/sd-vae-ft-mse": "sd15",  # a VAE: the tiny SD 1.5's vae/ folder serves
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": "sana",
    "Efficient-Large-Model/Sana_600M_512px_diffusers": "sana",
    "facebook/dino-vits16": "dino",
    "facebook/dinov2-small": "dinov2",
    "openai/clip-vit-base-patch32": "clip",
    "CIDAS/clipseg-rd64-refined": "clipseg",
}
MODEL_FLAGS = {"--pretrained_model_name_or_path", "--pretrained_model_path", "--pretrained_vae_model_name_or_path",
               "--base_model",
               "--dino_model", "--clip_model", "--mask_model"}

# Amounts only: steps, images, evaluations. The metric models are the tiny ones (the defaults are hub ids).
FAST_OVERRIDES = {
    "train": ["--max_train_steps", "2", "--num_class_images", "2", "--num_validation_images", "1"],
    "sample": ["--num_inference_steps", "2"],
    "score": ["--dino_model", "tiny:dino", "--clip_model", "tiny:clip"],
    "evaluate": ["--num_inference_steps", "2", "--num_images_per_prompt", "1", "--max_prompts", "1",
                 "--max_evaluations", "2", "--omega_grid", "0", "1", "--dino_model", "tiny:dino",
                 "--clip_model", "tiny:clip"],
}

# (command, flag) -> what the user brings there, created when the path does not exist yet.
USER_INPUTS = {
    ("train", "--instance_data_dir"): "photos",
    ("score", "--references"): "photos",
    ("evaluate", "--instance_data_dir"): "photos per subject",
    ("evaluate", "--evaluation_prompts_path"): "prompts per subject",
    ("train", "--concepts_list"): "concepts",
}
EVALUATION_PROMPTS = ["a <subject> in the snow", "a <subject> on the beach"]
# Commands whose positional PATH[:WEIGHT] arguments are LoRAs: one the user brings (a style LoRA) is made, when
# missing, as a copy of the first LoRA of the same command that exists (the same base model).
LORA_ARGUMENTS = {"merge"}


def readme_commands(text: str) -> list[list[str]]:
    """The `boothkit` command lines of the ```bash blocks, in order, split as the shell would split them."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "boothkit":
                commands.append(words[1:])
    return commands


def test_readme_commands_are_read_as_the_shell_reads_them():
    text = ('```bash\nmake demo   # not boothkit\nboothkit train \\\n  --instance_prompt "a photo of sks dog" \\\n'
            "  --rank 4  # a comment\n# boothkit commented out\n```\n\n```\nboothkit not-bash\n```\n"
            "```bash\nboothkit score --images ./x\n```\n")
    assert readme_commands(text) == [["train", "--instance_prompt", "a photo of sks dog", "--rank", "4"],
                                     ["score", "--images", "./x"]]


class Workspace:
    """The working folder of the README's commands, and the tiny models and user inputs they need."""

    def __init__(self, root: Path, models: Path) -> None:
        self.root, self.models = root, models

    def model(self, kind: str) -> str:
        path = self.models / kind
        if not path.exists():
            build_tiny(kind, path, seed=0)
        return str(path)

    def substitute_models(self, args: list[str]) -> list[str]:
        result = []
        for index, word in enumerate(args):
            if word.startswith("tiny:"):
                word = self.model(word.removeprefix("tiny:"))
            elif index and args[index - 1] in MODEL_FLAGS and not word.startswith((".", "/")):
                assert word in MODEL_IDS, f"README names model {word!r}: add its tiny stand-in to MODEL_IDS"
                word = self.model(MODEL_IDS[word])
            result.append(word)
        return result

    def provide_loras(self, command: str, args: list[str]) -> None:
        if command not in LORA_ARGUMENTS:
            return
        from boothkit.guidance.config import parse_lora
        from boothkit.layout import lora_file

        paths = [self.root / parse_lora(word)[0] for index, word in enumerate(args[1:], 1)
                 if not word.startswith("--") and not args[index - 1].startswith("--")]
        existing = [path for path in paths if path.exists()]
        for path in paths:
            if not path.exists() and existing:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(lora_file(existing[0]), path)

    def provide_concepts(self, path: Path) -> None:
        text = README.read_text(encoding="utf-8")
        concepts = json.loads(re.search(r"^```json\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL).group(1))
        for concept in concepts:
            photos = self.root / concept["instance_data_dir"]
            if not photos.exists():
                shutil.copytree(sample_subject_dir(), photos)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(concepts))

    def provide_inputs(self, command: str, args: list[str]) -> None:
        self.provide_loras(command, args)
        values = {flag: args[index + 1] for index, flag in enumerate(args[:-1]) if flag.startswith("--")}
        for (input_command, flag), kind in USER_INPUTS.items():
            path = self.root / values[flag] if command == input_command and flag in values else None
            if path is None or path.exists():
                continue
            if kind == "photos":
                shutil.copytree(sample_subject_dir(), path)
            elif kind == "photos per subject":  # one photo folder per LoRA folder, with the same name
                for lora in sorted(p for p in (self.root / values["--lora_base_dir"]).iterdir() if p.is_dir()):
                    shutil.copytree(sample_subject_dir(), path / lora.name)
            elif kind == "concepts":  # the README's concepts.json, with its photo folders
                self.provide_concepts(path)
            elif kind == "prompts per subject":  # a per-subject JSON naming each photo folder
                folders = sorted(p.name for p in (self.root / values["--instance_data_dir"]).iterdir() if p.is_dir())
                path.write_text(json.dumps({folder: EVALUATION_PROMPTS for folder in folders}))


@pytest.mark.readme
def test_every_readme_command_runs_as_written_on_a_cpu(tmp_path, monkeypatch, capsys):
    commands = readme_commands(README.read_text(encoding="utf-8"))
    names = [args[0] for args in commands]
    assert {"train", "sample", "score", "evaluate"} <= set(names), names
    assert names.index("train") < names.index("sample") < names.index("evaluate")
    workspace = Workspace(tmp_path / "work", tmp_path / "tiny-models")
    workspace.root.mkdir()
    monkeypatch.chdir(workspace.root)
    for args in commands:
        workspace.provide_inputs(args[0], args)
        argv = workspace.substitute_models(args + FAST_OVERRIDES.get(args[0], []))
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, f"boothkit {shlex.join(args)}\n{captured.err[-2000:]}"
        if args[0] == "train":
            output_dir = Path(args[args.index("--output_dir") + 1])
            full = "--train_mode" in args and args[args.index("--train_mode") + 1] == "full"
            assert (output_dir / ("model_index.json" if full else "pytorch_lora_weights.safetensors")).is_file()
        if args[0] == "score":
            assert {"DINO", "CLIP-I", "CLIP-T"} <= set(json.loads(captured.out))
