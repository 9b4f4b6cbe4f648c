"""Merging LoRAs: a subject and a style in one file (issue 11).

Two LoRAs at weights w_a, w_b change a layer's weight by w_a·ΔW_a + w_b·ΔW_b, ΔW = (α/r)·up·down.

* concat (exact): down = [down_a; down_b], up = [w_a·s_a·up_a, w_b·s_b·up_b], alpha = rank (scale 1): the
  product is the weighted sum exactly, with rank r_a + r_b. A layer only one LoRA has keeps its own rank.
  Sampling the merged LoRA equals sampling with both adapters at those weights.
* svd (approximation): the best rank-k approximation of the weighted sum (Eckart–Young): ΔW = U·S·Vᵀ,
  up = U_k·√S_k, down = √S_k·V_kᵀ; the relative Frobenius error ‖ΔW − ΔW_k‖ / ‖ΔW‖ is reported per layer.
  Conv kernels are flattened to out × (in·kh·kw) and reshaped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from boothkit.formats.lora import LoraLayerWeights


def concat(loras: list[tuple[dict[str, LoraLayerWeights], float]]) -> dict[str, LoraLayerWeights]:
    """The exact merge of weighted LoRAs (see the module doc)."""
    names = list(dict.fromkeys(name for layers, _ in loras for name in layers))
    merged = {}
    for name in names:
        parts = [(layers[name], weight) for layers, weight in loras if name in layers]
        _check_shapes(name, [layer for layer, _ in parts])
        down = torch.cat([layer.down.float() for layer, _ in parts])
        up = torch.cat([layer.up.float() * (weight * layer.scale) for layer, weight in parts], dim=1)
        merged[name] = LoraLayerWeights(down, up, float(down.shape[0]))
    return merged


@dataclass
class SvdResult:
    layers: dict[str, LoraLayerWeights]
    errors: dict[str, float]  # relative Frobenius error per layer


def svd(loras: list[tuple[dict[str, LoraLayerWeights], float]], rank: int) -> SvdResult:
    """The rank-`rank` approximation of the weighted sum of the LoRAs, layer by layer."""
    layers, errors = {}, {}
    for name, layer in concat(loras).items():
        delta = layer.delta()
        matrix = delta.flatten(1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        k = min(rank, s.shape[0])
        root = s[:k].sqrt()
        up = (u[:, :k] * root).reshape(delta.shape[0], k, *([1] * (delta.dim() - 2)))
        down = (root[:, None] * vh[:k]).reshape(k, *delta.shape[1:])
        approximation = up.flatten(1) @ down.flatten(1)
        norm = matrix.norm()
        errors[name] = float((matrix - approximation).norm() / norm) if norm > 0 else 0.0
        layers[name] = LoraLayerWeights(down.contiguous(), up.contiguous(), float(k))
    return SvdResult(layers, errors)


def error_by_group(errors: dict[str, float]) -> dict[str, float]:
    """The largest relative error per layer group: component and block (`unet.down_blocks.1`, `text_encoder`)."""
    groups: dict[str, float] = {}
    for name, error in errors.items():
        parts = name.split(".")
        group = ".".join(parts[:3]) if parts[0] in ("unet", "transformer") and len(parts) > 3 else parts[0]
        groups[group] = max(groups.get(group, 0.0), error)
    return groups


def _check_shapes(name: str, layers: list[LoraLayerWeights]) -> None:
    shapes = {(layer.up.shape[0], *layer.down.shape[1:]) for layer in layers}
    if len(shapes) > 1:
        raise ValueError(f"layer '{name}' has different shapes in the LoRAs: {sorted(shapes)}")
