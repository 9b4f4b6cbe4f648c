"""LoRA files in the kohya layout that A1111, Forge, ComfyUI and kohya's sd-scripts read.

A LoRA layer W + (α/r)·up·down is stored as `<stem>.lora_down.weight` (r × in), `<stem>.lora_up.weight`
(out × r) and `<stem>.alpha` (a scalar); a file without `.alpha` means α = r (kohya's and diffusers' rule).
`<stem>` is a prefix and the module's path with `_` for `.`:

| model | UNet / transformer | text encoders |
|---|---|---|
| SD 1.x/2.x | `lora_unet_` + diffusers path (what kohya's trainer writes) | `lora_te_text_model_…` |
| SDXL | `lora_unet_` + original LDM path, `input_blocks_4_1_…` (`boothkit.formats.ldm`) | `lora_te1_…`, `lora_te2_…` |
| SANA | `lora_unet_` + the original SANA repository's path, fused `attn_qkv` (`boothkit.formats.sana`) | — |

Text-encoder paths start with `text_model.` as in transformers before 5.6 (which dropped that level from
`CLIPTextModel`): the other tools expect it whatever transformers boothkit runs with. The alpha written is the
LoRA's own, not the rank: a LoRA trained with α ≠ r keeps its strength (diffusers' own converter writes
alpha = rank whatever the training used). Reading accepts every stem ComfyUI maps for a module (for UNets
both the diffusers and the LDM path, `lora_te_` and `lora_te1_` for the first text encoder).
"""

from __future__ import annotations

import torch

from boothkit.errors import BoothkitError
from boothkit.formats import ldm, sana
from boothkit.formats.lora import LoraLayerWeights
from boothkit.formats.models import BaseModel, model_modules

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
_WRITE_PREFIXES = {"sd": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                   "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                   "sana": {"transformer": "lora_unet_"}}
_READ_PREFIXES = {"lora_unet_": None, "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}


def is_kohya(tensors: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(tuple(_READ_PREFIXES)) for key in tensors)


def _stem(prefix: str, module: str) -> str:
    return prefix + module.replace(".", "_")


def kohya_stem(name: str, base: BaseModel, prefixes: dict[str, str] | None = None) -> str:
    """The stem kohya writes for layer `name` (`component.module`) of a LoRA for `base`. SDXL UNet modules
    take their LDM path (`prefixes`: `ldm.block_prefixes` of the UNet config)."""
    component, module = name.split(".", 1)
    prefix = _WRITE_PREFIXES[base.family].get(component)
    if prefix is None:
        raise BoothkitError(f"the kohya layout of {base.label} LoRAs has no place for '{component}' layers")
    if base.family == "sdxl" and component == "unet":
        path = ldm.to_ldm(module, prefixes if prefixes is not None else ldm.block_prefixes(base.denoiser_config))
        if path is None:
            raise BoothkitError(f"the SDXL UNet layout has no module '{module}'")
        module = path
    return _stem(prefix, module)


def to_kohya(layers: dict[str, LoraLayerWeights], base: BaseModel, dtype: torch.dtype = torch.float32
             ) -> dict[str, torch.Tensor]:
    """The kohya tensors of `layers` (a LoRA for `base`): down, up and the layer's own alpha, in `dtype`."""
    if base.family == "sana":
        layers = sana.to_original(layers)
    prefixes = ldm.block_prefixes(base.denoiser_config) if base.family == "sdxl" else None
    tensors = {}
    for name, layer in layers.items():
        stem = kohya_stem(name, base, prefixes)
        tensors[stem + DOWN] = layer.down.to(dtype).contiguous()
        tensors[stem + UP] = layer.up.to(dtype).contiguous()
        tensors[stem + ALPHA] = torch.tensor(layer.alpha, dtype=dtype)
    return tensors


def stems_of(base: BaseModel, modules: dict[str, list[str]]) -> dict[str, str]:
    """{every stem ComfyUI maps for a module of `modules`: the layer name `component.module`}."""
    stems = {}
    unet_prefixes = ldm.block_prefixes(base.denoiser_config) if "unet" in modules else {}
    for component, names in modules.items():
        for module in names:
            name = f"{component}.{module}"
            if component == "unet":
                stems[_stem("lora_unet_", module)] = name
                path = ldm.to_ldm(module, unet_prefixes)
                if path is not None:
                    stems[_stem("lora_unet_", path)] = name
            elif component == "transformer":
                stems[_stem("lora_unet_", module)] = name
            else:
                for prefix, target in _READ_PREFIXES.items():
                    if target == component:
                        stems[_stem(prefix, module)] = name
    if base.family == "sana":
        stems.update({_stem("lora_unet_", original): original_name
                      for original, original_name in sana.original_names(modules.get("transformer", [])).items()})
    return stems


def from_kohya(tensors: dict[str, torch.Tensor], base: BaseModel) -> dict[str, LoraLayerWeights]:
    """The layers of a kohya file for `base` (its modules listed from its configs); a file without `.alpha`
    keys has α = r. A stem no module of the model has is an error naming it."""
    components = {"sd": ["unet", "text_encoder"], "sdxl": ["unet", "text_encoder", "text_encoder_2"],
                  "sana": ["transformer"]}[base.family]
    stems = stems_of(base, model_modules(base.source, components))
    layers, fused = {}, {}
    for stem, layer in raw_layers(tensors).items():
        if stem not in stems:
            raise BoothkitError(f"kohya LoRA layer '{stem}' names no module of {base.describe()}")
        (fused if stems[stem].startswith(sana.ORIGINAL) else layers)[stems[stem]] = layer
    if fused:
        layers.update(sana.from_original(fused))
    return layers


def raw_layers(tensors: dict[str, torch.Tensor]) -> dict[str, LoraLayerWeights]:
    """The layers of a kohya file by stem (no module names resolved); α = r where `.alpha` is missing."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in (DOWN, UP, ALPHA) if key.endswith(s)), None)
        if suffix is None:
            raise BoothkitError(f"kohya LoRA holds '{key}', which is no LoRA matrix or alpha")
        groups.setdefault(key.removesuffix(suffix), {})[suffix] = value
    layers = {}
    for stem, group in groups.items():
        if DOWN not in group or UP not in group:
            raise BoothkitError(f"kohya LoRA layer '{stem}' lacks its {'up' if DOWN in group else 'down'} matrix")
        alpha = float(group[ALPHA].float().item()) if ALPHA in group else float(group[DOWN].shape[0])
        layers[stem] = LoraLayerWeights(group[DOWN], group[UP], alpha)
    return layers
