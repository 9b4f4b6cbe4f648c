"""Validation images during training: the current LoRA, the family's pipeline, one seed per image."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from boothkit.families.base import ModelFamily
from boothkit.io import save_image_atomic, write_json_atomic
from boothkit.layout import VALIDATION_DIR
from boothkit.seeding import image_generators


def validation_folder(concept: int | None = None, prompt_index: int | None = None) -> str:
    """`validation`, with several concepts `validation/concept-K`, then with several prompts `/prompt-J`."""
    folder = VALIDATION_DIR if concept is None else f"{VALIDATION_DIR}/concept-{concept}"
    return folder if prompt_index is None else f"{folder}/prompt-{prompt_index}"


def validation_image_names(step: int, count: int, concept: int | None = None,
                           prompt_index: int | None = None) -> list[str]:
    """`validation/step-NNNNNN_i.png` (several concepts: `validation/concept-K/step-NNNNNN_i.png`; several prompts:
    `.../prompt-J/step-NNNNNN_i.png`), relative to the output folder."""
    folder = validation_folder(concept, prompt_index)
    return [f"{folder}/step-{step:06d}_{index}.png" for index in range(count)]


@torch.no_grad()
def save_validation_images(family: ModelFamily, prompt: str, seed: int, resolution: int,
                           paths: list[Path]) -> list[Path]:
    """Write image i to `paths[i]` (claimed by the caller); image i uses seed + i, so images are comparable
    across steps. One image at a time: validation runs beside the training state and should add little memory."""
    family.warn_long_prompts([prompt])  # the pipeline cuts a long prompt silently
    for path, generator in zip(paths, image_generators(seed, len(paths))):
        image = family.pipeline(
            prompt=prompt, generator=generator, height=resolution, width=resolution,
            num_inference_steps=family.default_inference_steps, guidance_scale=family.default_guidance_scale,
            **family.pipeline_kwargs(),
        ).images[0]
        save_image_atomic(image, path)
    return paths


def record_validation_prompts(path: Path, validations, step: int) -> None:
    """`validation/prompts.json` (claimed by the caller): which prompt the images of each validation folder show,
    at which steps — `{"prompts": [{"folder", "concept", "prompt", "steps"}, ...]}`. A step validated again (a
    resumed run redoes the steps after its checkpoint, perhaps with other prompts) moves to this run's prompt."""
    entries = []
    if path.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entries = list(json.loads(path.read_text(encoding="utf-8"))["prompts"])
    current = {(validation_folder(v.concept, v.index), v.prompt): v for v in validations}
    for entry in entries:
        if (entry["folder"], entry["prompt"]) not in current:
            entry["steps"] = [s for s in entry["steps"] if s != step or not _same_folder(entry, current)]
    for (folder, prompt), validation in current.items():
        entry = next((e for e in entries if (e["folder"], e["prompt"]) == (folder, prompt)), None)
        if entry is None:
            entry = {"folder": folder, "concept": validation.concept, "prompt": prompt, "steps": []}
            entries.append(entry)
        entry["steps"] = sorted(set(entry["steps"]) | {step})
    write_json_atomic(path, {"prompts": [entry for entry in entries if entry["steps"]]})


def _same_folder(entry: dict, current: dict) -> bool:
    return any(folder == entry["folder"] for folder, _ in current)
