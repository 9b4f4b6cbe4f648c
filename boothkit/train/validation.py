"""Validation images during training: the current LoRA, the family's pipeline, one seed per image."""

from __future__ import annotations

from pathlib import Path

import torch

from boothkit.families.base import ModelFamily
from boothkit.io import save_image_atomic
from boothkit.layout import VALIDATION_DIR
from boothkit.seeding import image_generators


def validation_image_names(step: int, count: int, concept: int | None = None) -> list[str]:
    """`validation/step-NNNNNN_i.png` (several concepts: `validation/concept-K/step-NNNNNN_i.png`), relative to
    the output folder."""
    folder = VALIDATION_DIR if concept is None else f"{VALIDATION_DIR}/concept-{concept}"
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
