"""Module paths of a diffusers `UNet2DConditionModel` in the original (LDM / Stability "sgm") layout.

kohya's SDXL trainer names LoRA layers after the original UNet's blocks (`input_blocks.4.1.transformer_blocks…`),
and A1111, Forge and ComfyUI map those names. The block numbers follow from the config alone: `input_blocks.0`
is `conv_in`; down block i contributes `layers_per_block` blocks (resnet at `.0`, attention at `.1`) and, unless
it is the last, a downsampler block (`.0.op`); the middle block is resnet, attention, resnet; up block i
contributes `layers_per_block + 1` blocks (resnet `.0`, attention `.1`) and, unless it is the last, an upsampler
in its last block (`.2.conv` after an attention, else `.1.conv`). This is the layout of the LDM/sgm `UNetModel`
(Rombach et al. 2022) that diffusers' `convert_original_stable_diffusion_to_diffusers` reads; SDXL 1.0 gives
`down_blocks.1.attentions.0` = `input_blocks.4.1`, a UNet with one layer per block another number.
"""

from __future__ import annotations

# Inside a resnet block the original names differ from diffusers'; inside attention blocks they are the same.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _per_block(value, blocks: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * blocks


def block_prefixes(config: dict) -> dict[str, str]:
    """{diffusers block prefix: LDM block prefix} for a UNet config, e.g. `down_blocks.1.attentions.0` →
    `input_blocks.4.1` for SDXL 1.0."""
    blocks = len(config["block_out_channels"])
    layers = _per_block(config["layers_per_block"], blocks)
    prefixes = dict(_TOP)
    index = 1
    for i in range(blocks):
        for j in range(layers[i]):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < blocks - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    prefixes.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                     "mid_block.resnets.1": "middle_block.2"})
    index = 0
    up_layers = list(reversed(layers))
    for i, block_type in enumerate(config["up_block_types"]):
        for j in range(up_layers[i] + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == up_layers[i] and i < blocks - 1:
                position = 2 if "CrossAttn" in block_type else 1
                prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{position}.conv"
            index += 1
    return prefixes


def to_ldm(module: str, prefixes: dict[str, str]) -> str | None:
    """The LDM path of a diffusers UNet module path (None when the layout has no such module)."""
    if module in prefixes:
        return prefixes[module]
    for diffusers_prefix, ldm_prefix in prefixes.items():
        if module.startswith(diffusers_prefix + "."):
            rest = module[len(diffusers_prefix) + 1:]
            if ".resnets." in diffusers_prefix + ".":
                rest = _RESNET.get(rest, rest)
            return f"{ldm_prefix}.{rest}"
    return None
