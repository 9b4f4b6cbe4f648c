"""Validation images during training: the current LoRA, the family's pipeline, one seed per image."""

from __future__ import annotations

from pathlib import Path

import torch

from boothkit.families.base import ModelFamily
from boothkit.io import save_image_atomic
from boothkit.seeding import image_generators


@torch.no_grad()
def save_validation_images(family: ModelFamily, prompt: str, count: int, seed: int, resolution: int,
                           folder: Path, step: int) -> list[Path]:
    """Write `folder/step-NNNNNN_i.png`; image i uses seed + i, so images are comparable across steps.
    One image at a time: validation runs beside the training state and should add little memory."""
    paths = []
    for index, generator in enumerate(image_generators(seed, count)):
        image = family.pipeline(
            prompt=prompt, generator=generator, height=resolution, width=resolution,
            num_inference_steps=family.default_inference_steps, guidance_scale=family.default_guidance_scale,
            **family.pipeline_kwargs(),
        ).images[0]
        path = folder / f"step-{step:06d}_{index}.png"
        save_image_atomic(image, path)
        paths.append(path)
    return paths
