"""LoRAs from other trainers: a kohya / A1111 file (`lora_unet_…`, `lora_te_…`, `.lora_down`, `.lora_up`, `.alpha`)
samples in boothkit exactly as diffusers' `load_lora_weights` loads it, at the strength its alpha gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from boothkit.formats.kohya import to_kohya
from boothkit.formats.lora import LoraLayerWeights, read_lora
from boothkit.formats.models import BaseModel

from test_sample import PROMPTS, pixels, reference_pipeline, sampler

def write_kohya(lora_dir: Path, out: Path, alpha: float) -> Path:
    """The LoRA in `lora_dir` in the kohya layout with `alpha` (≠ the rank): each up matrix is multiplied by
    rank/alpha, so the file's effective weights (alpha/rank)·up·down are the original's."""
    layers = {name: LoraLayerWeights(layer.down, layer.up * (layer.rank / alpha), alpha)
              for name, layer in read_lora(lora_dir).layers.items()}
    save_file(to_kohya(layers, BaseModel("sd1")), out)
    return out


def test_a_kohya_lora_with_alpha_samples_as_diffusers_loads_it(sd15, sd15_lora, tmp_path):
    kohya = write_kohya(sd15_lora, tmp_path / "kohya.safetensors", alpha=1.0)
    assert any(key.endswith(".alpha") for key in load_file(kohya)) and any(key.startswith("lora_te_") for key in load_file(kohya))
    ours = pixels(sampler(sd15, kohya, "cfg", guidance_scale=6.0).generate(PROMPTS[:1], None, 2, seed=3))
    original = pixels(sampler(sd15, sd15_lora, "cfg", guidance_scale=6.0).generate(PROMPTS[:1], None, 2, seed=3))
    pipe = reference_pipeline(sd15, None)
    pipe.load_lora_weights(kohya)
    expected = pipe(PROMPTS[0], num_images_per_prompt=2, guidance_scale=6.0, num_inference_steps=8,
                    generator=[torch.Generator("cpu").manual_seed(3 + i) for i in range(2)], output_type="np").images
    assert np.abs(ours - expected).max() <= 1.001 / 255
    assert np.abs(ours - original).max() <= 1.001 / 255  # alpha/rank folded in: the same LoRA at the same strength
