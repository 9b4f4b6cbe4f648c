"""SANA LoRAs in the original SANA repository's module names (NVlabs/Sana, `diffusion/model/nets/sana*.py`).

The original transformer fuses self-attention's q, k and v into one `attn.qkv` Linear and cross-attention's k
and v into `cross_attn.kv_linear`; diffusers splits them (`scripts/convert_sana_to_diffusers.py`, which this
mapping follows). A LoRA on the split projections becomes one LoRA on the fused layer exactly: with
ΔW_i = s_i·U_i·D_i for the parts i,

    ΔW_fused = [ΔW_q; ΔW_k; ΔW_v] = blockdiag(s_q·U_q, s_k·U_k, s_v·U_v) · [D_q; D_k; D_v],

of rank r_q + r_k + r_v (alpha = s·rank when the parts share their scale s, else the scales are folded into
up and alpha = rank). Reading splits the rows of a fused up matrix back into its parts, each with the down
rows its columns use: exact for any fused LoRA, and back to the original ranks for one written this way.

Experimental: no ComfyUI core loader for SANA LoRAs exists yet; the names are the ones ComfyUI's generic rule
(`lora_unet_` + the model's own weight path) gives a SANA model built in the original layout.
"""

from __future__ import annotations

import re

import torch

from boothkit.formats.lora import LoraLayerWeights

ORIGINAL = "sana-original:"  # marks a layer named in the original layout until it is split
COMPONENT = "transformer."
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
# diffusers path inside block N → (original path inside block N, part index, number of parts)
_IN_BLOCK = {"attn1.to_q": ("attn.qkv", 0, 3), "attn1.to_k": ("attn.qkv", 1, 3), "attn1.to_v": ("attn.qkv", 2, 3),
             "attn1.to_out.0": ("attn.proj", 0, 1), "attn2.to_q": ("cross_attn.q_linear", 0, 1),
             "attn2.to_k": ("cross_attn.kv_linear", 0, 2), "attn2.to_v": ("cross_attn.kv_linear", 1, 2),
             "attn2.to_out.0": ("cross_attn.proj", 0, 1), "ff.conv_inverted": ("mlp.inverted_conv.conv", 0, 1),
             "ff.conv_depth": ("mlp.depth_conv.conv", 0, 1), "ff.conv_point": ("mlp.point_conv.conv", 0, 1)}
_TOP = {"patch_embed.proj": "x_embedder.proj", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2", "time_embed.linear": "t_block.1",
        "proj_out": "final_layer.linear"}


def original_part(module: str) -> tuple[str, int, int] | None:
    """(original path, part index, parts) of a diffusers SANA transformer module; None when it has none."""
    if module in _TOP:
        return _TOP[module], 0, 1
    match = _BLOCK.match(module)
    if match and match.group(2) in _IN_BLOCK:
        path, part, parts = _IN_BLOCK[match.group(2)]
        return f"blocks.{match.group(1)}.{path}", part, parts
    return None


def original_names(modules: list[str]) -> dict[str, str]:
    """{original path: its marked name} for the diffusers transformer modules `modules`."""
    return {part[0]: ORIGINAL + part[0] for part in map(original_part, modules) if part is not None}


def to_original(layers: dict[str, LoraLayerWeights]) -> dict[str, LoraLayerWeights]:
    """`transformer.<diffusers path>` layers → `transformer.<original path>` layers, q/k/v fused."""
    groups: dict[str, dict[int, LoraLayerWeights]] = {}
    counts: dict[str, int] = {}
    for name, layer in layers.items():
        part = original_part(name.removeprefix(COMPONENT)) if name.startswith(COMPONENT) else None
        if part is None:
            raise ValueError(f"the original SANA layout has no module for LoRA layer '{name}'")
        groups.setdefault(part[0], {})[part[1]] = layer
        counts[part[0]] = part[2]
    return {COMPONENT + path: _fuse(parts, counts[path]) for path, parts in groups.items()}


def _fuse(parts: dict[int, LoraLayerWeights], count: int) -> LoraLayerWeights:
    if count == 1:
        return parts[0]
    present = [parts[i] for i in sorted(parts)]
    out = present[0].up.shape[0]
    rank = sum(layer.rank for layer in present)
    shared_scale = len({layer.scale for layer in present}) == 1
    up = torch.zeros(out * count, rank, dtype=present[0].up.dtype)
    column = 0
    for index in sorted(parts):
        layer = parts[index]
        factor = 1.0 if shared_scale else layer.scale
        up[index * out:(index + 1) * out, column:column + layer.rank] = layer.up.reshape(out, layer.rank) * factor
        column += layer.rank
    down = torch.cat([layer.down for layer in present])
    alpha = present[0].scale * rank if shared_scale else float(rank)
    return LoraLayerWeights(down, up, alpha)


def from_original(fused: dict[str, LoraLayerWeights]) -> dict[str, LoraLayerWeights]:
    """Marked original-layout layers (`ORIGINAL + path`) → `transformer.<diffusers path>` layers."""
    inverse = {}
    for inner, (path, part, parts) in _IN_BLOCK.items():
        inverse.setdefault(path, {})[part] = (inner, parts)
    layers = {}
    for name, layer in fused.items():
        path = name.removeprefix(ORIGINAL)
        top = {original: module for module, original in _TOP.items()}
        if path in top:
            layers[COMPONENT + top[path]] = layer
            continue
        block, inner_path = re.match(r"^blocks\.(\d+)\.(.+)$", path).groups()
        targets = inverse[inner_path]
        for index, part in enumerate(_split(layer, len(targets))):
            if part is not None:
                layers[f"{COMPONENT}transformer_blocks.{block}.{targets[index][0]}"] = part
    return layers


def _split(layer: LoraLayerWeights, count: int) -> list[LoraLayerWeights | None]:
    """The parts of a fused layer: each keeps the down rows its up rows use (its own rank) when the parts use
    disjoint rows, else all of them; a part whose up rows are zero has no LoRA."""
    if count == 1:
        return [layer]
    chunks = layer.up.reshape(layer.up.shape[0], layer.rank).chunk(count)
    used = [torch.nonzero(chunk.abs().sum(0)).flatten().tolist() for chunk in chunks]
    disjoint = sum(len(columns) for columns in used) == len(set().union(*map(set, used)))
    parts = []
    for chunk, columns in zip(chunks, used):
        if not columns:
            parts.append(None)
            continue
        columns = columns if disjoint else list(range(layer.rank))
        rank = len(columns)
        parts.append(LoraLayerWeights(layer.down[columns].clone(), chunk[:, columns].clone(), layer.alpha * rank / layer.rank))
    return parts
