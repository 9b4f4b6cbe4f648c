"""kohya-layout LoRAs for SD 1.x/2.x (`boothkit.formats.kohya`): every name is one ComfyUI's own loader maps
(fixture: tests/fixtures/comfyui_lora_keys), the real alpha is kept, and diffusers loads the file to the same
images as the boothkit LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from boothkit.formats.kohya import kohya_name, read_diffusers_lora, to_kohya
from test_sample import PROMPTS, pixels, reference_pipeline, sampler

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui_lora_keys"


@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_every_kohya_name_is_one_comfyui_maps(kind, sd15_lora, sd21_lora):
    lora = {"sd15": sd15_lora, "sd21": sd21_lora}[kind]
    fixture = json.loads((FIXTURES / f"{kind}.json").read_text())
    accepted = set(fixture["keys"])
    by_module = {module: weight for weight, module in fixture["diffusers_modules"].items()}
    layers = read_diffusers_lora(lora)
    tensors = to_kohya(layers)
    stems = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert stems <= accepted and len(stems) == len(layers) == 40
    for name in layers:  # each name patches the very weight the boothkit layer belongs to
        module = name if not name.startswith("text_encoder.") or ".text_model." in name else name.replace(
            "text_encoder.", "text_encoder.text_model.", 1)
        assert fixture["keys"][kohya_name(name)] == by_module[module]


def test_the_real_alpha_is_kept_and_diffusers_loads_it_to_the_same_images(sd15, sd15_lora, tmp_path):
    layers = read_diffusers_lora(sd15_lora)
    assert {layer.alpha for layer in layers.values()} == {4.0}  # trained with --rank 4, alpha default
    # Another alpha: the same weights at alpha 2 are the LoRA at half strength in every tool.
    halved = {name: type(layer)(layer.down, layer.up, 2.0) for name, layer in layers.items()}
    for name, chosen in (("same_alpha", layers), ("half_alpha", halved)):
        save_file(to_kohya(chosen), tmp_path / f"{name}.safetensors")
    pipe = reference_pipeline(sd15, None)
    expected = {}
    for name in ("same_alpha", "half_alpha"):
        pipe.load_lora_weights(tmp_path / f"{name}.safetensors", adapter_name=name)
        pipe.set_adapters([name])
        expected[name] = pipe(PROMPTS[0], num_images_per_prompt=2, guidance_scale=6.0, num_inference_steps=8,
                              generator=[torch.Generator("cpu").manual_seed(3 + i) for i in range(2)],
                              output_type="np").images
    original = pixels(sampler(sd15, sd15_lora, "cfg", guidance_scale=6.0).generate(PROMPTS[:1], None, 2, seed=3))
    assert np.abs(expected["same_alpha"] - original).max() <= 1 / 255
    assert np.abs(expected["half_alpha"] - original).max() > 2 / 255
    pipe.set_adapters(["same_alpha"], adapter_weights=[0.5])
    at_half = pipe(PROMPTS[0], num_images_per_prompt=2, guidance_scale=6.0, num_inference_steps=8,
                   generator=[torch.Generator("cpu").manual_seed(3 + i) for i in range(2)], output_type="np").images
    assert np.abs(expected["half_alpha"] - at_half).max() <= 1 / 255
