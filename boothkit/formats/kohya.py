"""LoRA files in the kohya layout that A1111, Forge, ComfyUI and kohya's sd-scripts read (issue 11, SD 1.x/2.x).

A LoRA layer W + (α/r)·up·down is stored as `<name>.lora_down.weight` (r × in), `<name>.lora_up.weight`
(out × r) and `<name>.alpha` (a scalar), where `<name>` is `lora_unet_` or `lora_te_` followed by the module's
path with `_` for `.`. For SD 1.x/2.x that path is the diffusers one (what kohya's trainer writes); text-encoder
paths start with `text_model.` as in transformers before 5.6, which dropped that level from `CLIPTextModel`:
the other tools expect it whatever transformers boothkit runs with.

The alpha written is the LoRA's own (from the file's adapter metadata), not the rank: a LoRA trained with
α ≠ r keeps its strength (diffusers' converter writes alpha = rank whatever the training used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from boothkit.errors import BoothkitError
from boothkit.formats.metadata import read_metadata

# The suffixes of a LoRA layer's two matrices in diffusers/PEFT files (PEFT, and diffusers' older names).
_MATRICES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_linear_layer.down.weight": "down",
             ".lora_linear_layer.up.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up"}
_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


@dataclass
class LoraLayerWeights:
    """One LoRA layer: W + (alpha/rank)·up·down."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def read_diffusers_lora(path: str | Path) -> dict[str, LoraLayerWeights]:
    """The layers of a diffusers/PEFT LoRA file (boothkit's, the diffusers trainers'), by `component.module`
    (e.g. `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), each with its alpha: the adapter
    metadata's `lora_alpha` (or its `alpha_pattern` entry) per component, else the rank (scale 1)."""
    from boothkit.layout import lora_file

    file = lora_file(path)
    tensors = load_file(file)
    adapters = json.loads(read_metadata(file).get("lora_adapter_metadata", "{}") or "{}")
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _MATRICES if key.endswith(s)), None)
        if suffix is None:
            raise BoothkitError(f"LoRA file '{file}' is not a diffusers/PEFT LoRA: it holds '{key}'")
        matrices.setdefault(key.removesuffix(suffix), {})[_MATRICES[suffix]] = value
    layers = {}
    for name, pair in matrices.items():
        if set(pair) != {"down", "up"}:
            raise BoothkitError(f"LoRA file '{file}' lacks the {'up' if 'down' in pair else 'down'} matrix of '{name}'")
        layers[name] = LoraLayerWeights(pair["down"], pair["up"], _alpha(adapters, name, pair["down"].shape[0]))
    return layers


def _alpha(adapters: dict, name: str, rank: int) -> float:
    component, module = name.split(".", 1)
    pattern = adapters.get(f"{component}.alpha_pattern") or {}
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return float(value)
    alpha = adapters.get(f"{component}.lora_alpha")
    return float(alpha) if alpha is not None else float(rank)


def kohya_name(name: str) -> str:
    """`unet.down_blocks.0.attentions.0…to_q` → `lora_unet_down_blocks_0_attentions_0…to_q`; text-encoder
    modules under `text_model` (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`)."""
    component, module = name.split(".", 1)
    if component not in _PREFIXES:
        raise BoothkitError(f"the kohya layout of SD 1.x/2.x has no place for '{component}' LoRA layers")
    if component == "text_encoder" and not module.startswith("text_model."):
        module = "text_model." + module
    return _PREFIXES[component] + module.replace(".", "_")


def to_kohya(layers: dict[str, LoraLayerWeights], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The kohya tensors of SD 1.x/2.x LoRA layers: down, up and the layer's own alpha, in `dtype`."""
    tensors = {}
    for name, layer in layers.items():
        stem = kohya_name(name)
        tensors[f"{stem}.lora_down.weight"] = layer.down.to(dtype).contiguous()
        tensors[f"{stem}.lora_up.weight"] = layer.up.to(dtype).contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
    return tensors
