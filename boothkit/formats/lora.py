"""LoRA files in every layout boothkit reads, as one in-memory form: `{component.module: LoraLayerWeights}`.

A LoRA layer adds (α/r)·up·down to the weight W of one module (Hu et al. 2021, eq. 3). Names are the
diffusers module paths of the pipeline's components (`unet.down_blocks.0…to_q`, `text_encoder.text_model…`,
`text_encoder_2.…`, `transformer.…`); CLIP text-encoder paths always keep `text_model.` (transformers ≥ 5.6
drops that level from `CLIPTextModel`, the files of every other tool keep it). Readers: diffusers/PEFT files
(boothkit's, the diffusers trainers'), kohya/A1111 files with or without `.alpha` (`boothkit.formats.kohya`)
and SANA LoRAs in the original repository's names (`boothkit.formats.sana`). Writer: the diffusers layout
(PEFT keys, `lora_adapter_metadata` that peft 0.13+ reads).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from boothkit.errors import BoothkitError, first_line
from boothkit.formats.models import CLIP_TEXT_MODEL, BaseModel, version_from_cross_attention, version_from_metadata

# The suffixes of a layer's two matrices in diffusers/PEFT files (PEFT's, and diffusers' two older spellings).
_MATRICES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_linear_layer.down.weight": "down",
             ".lora_linear_layer.up.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up"}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# LoraConfig fields that peft 0.13 (the oldest peft diffusers' metadata loading works with) accepts; newer
# peft adds fields (`lora_bias`, `use_qalora`, `target_parameters`, ...) that older releases reject.
PEFT_013_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "bias",
                   "use_rslora", "use_dora", "init_lora_weights", "fan_in_fan_out")


@dataclass
class LoraLayerWeights:
    """One LoRA layer: W + (alpha/rank)·up·down. Conv layers keep their 4-D kernels (down: r×in×kh×kw,
    up: out×r×1×1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """ΔW = (α/r)·up·down, in float32, shaped like the weight."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * self.scale).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class Lora:
    """A LoRA's layers, the metadata of its file and the layout it was read from."""

    layers: dict[str, LoraLayerWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "diffusers"
    path: Path | None = None

    @property
    def components(self) -> list[str]:
        return sorted({name.split(".", 1)[0] for name in self.layers})

    def most_common(self, what: str) -> float:
        """The most common rank or alpha of the layers (what ss_network_dim / ss_network_alpha report)."""
        values = Counter(getattr(layer, what) for layer in self.layers.values())
        return values.most_common(1)[0][0] if values else 0


def canonical_name(component: str, module: str) -> str:
    """`component.module`, with `text_model.` in text-encoder paths whatever transformers wrote."""
    if component in TEXT_ENCODERS and not module.startswith(CLIP_TEXT_MODEL):
        module = CLIP_TEXT_MODEL + module
    return f"{component}.{module}"


def read_tensors(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """The file of a LoRA file or folder, its tensors and its metadata; one clear line when unreadable."""
    from boothkit.layout import lora_file

    file = lora_file(path)
    if not file.is_file():
        raise BoothkitError(f"LoRA '{path}' not found" + (f" (no {file.name} in the folder)" if file != Path(path) else ""))
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return file, load_file(str(file)), metadata
    except SafetensorError as error:
        raise BoothkitError(f"cannot read LoRA file '{file}': not a valid .safetensors file ({first_line(error)})") from None
    except OSError as error:
        raise BoothkitError(f"cannot read LoRA file '{file}': {first_line(error)}") from None


def read_lora(path: str | Path, base: BaseModel | None = None) -> Lora:
    """Read a LoRA in any layout boothkit knows. kohya files name modules in ways only the model's module tree
    resolves: they need `base` (a `BaseModel` with its source), or a base model recorded in their metadata."""
    from boothkit.formats import kohya

    file, tensors, metadata = read_tensors(path)
    if kohya.is_kohya(tensors):
        base = kohya_base(file, metadata, base)
        own = guess_base(Lora(kohya.raw_layers(tensors), metadata, "kohya", file))
        if own is not None and not own.same_kind(base):  # before its names are looked up in the wrong model
            raise BoothkitError(f"LoRA '{path}' is for {own.describe()}, not for {base.describe()}")
        return Lora(kohya.from_kohya(tensors, base), metadata, "kohya", file)
    return Lora(_from_diffusers(file, tensors, metadata), metadata, "diffusers", file)


def peek_lora(path: str | Path) -> Lora:
    """A LoRA as stored, without resolving kohya names to modules (which needs the base model): diffusers
    files by layer name, kohya files by stem. Enough to tell its kind, rank, alpha and model (`guess_base`)."""
    from boothkit.formats import kohya

    file, tensors, metadata = read_tensors(path)
    if kohya.is_kohya(tensors):
        return Lora(kohya.raw_layers(tensors), metadata, "kohya", file)
    return Lora(_from_diffusers(file, tensors, metadata), metadata, "diffusers", file)


def peft_state_dict(layers: dict[str, LoraLayerWeights]) -> dict[str, torch.Tensor]:
    """PEFT keys with each layer's scale folded into its up matrix (α = r): what `load_lora_weights` loads
    from a dict at the LoRA's strength (a dict carries no adapter metadata)."""
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A.weight"] = layer.down
        tensors[f"{name}.lora_B.weight"] = layer.up * layer.scale
    return tensors


def kohya_base(file: Path, metadata: dict[str, str], base: BaseModel | None) -> BaseModel:
    from boothkit.formats.models import base_model

    if base is not None and base.source:
        return base
    recorded = metadata.get("ss_sd_model_name") or ""
    if recorded and Path(recorded).expanduser().is_dir():
        return base_model(recorded)
    raise BoothkitError(f"LoRA file '{file}' is in the kohya layout, whose names only the base model resolves: "
                        "pass --pretrained_model_name_or_path")


def _from_diffusers(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, LoraLayerWeights]:
    adapters = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _MATRICES if key.endswith(s)), None)
        if suffix is None or "." not in key.removesuffix(suffix):
            raise BoothkitError(f"LoRA file '{file}' is neither a diffusers/PEFT nor a kohya LoRA: it holds '{key}'")
        matrices.setdefault(key.removesuffix(suffix), {})[_MATRICES[suffix]] = value
    layers = {}
    for name, pair in matrices.items():
        if set(pair) != {"down", "up"}:
            raise BoothkitError(f"LoRA file '{file}' lacks the {'up' if 'down' in pair else 'down'} matrix of '{name}'")
        component, module = name.split(".", 1)
        layers[canonical_name(component, module)] = LoraLayerWeights(
            pair["down"], pair["up"], _alpha(adapters, component, module, pair["down"].shape[0]))
    return layers


def _alpha(adapters: dict, component: str, module: str, rank: int) -> float:
    """The layer's alpha from diffusers' adapter metadata: its `alpha_pattern` entry, else `lora_alpha`, else
    the rank (scale 1, what diffusers assumes for a file without metadata)."""
    bare = module.removeprefix(CLIP_TEXT_MODEL)
    for key, value in (adapters.get(f"{component}.alpha_pattern") or {}).items():
        key = key.removeprefix(CLIP_TEXT_MODEL)
        if bare == key or bare.endswith("." + key):
            return float(value)
    alpha = adapters.get(f"{component}.lora_alpha")
    return float(alpha) if alpha is not None else float(rank)


def guess_base(lora: Lora) -> BaseModel | None:
    """The model a LoRA is for: its metadata's word, else its layers (named as in diffusers or kohya files): a
    transformer or SANA's original blocks (SANA), a second text encoder (SDXL), else the width its
    cross-attention keys read (768 SD 1.x, 1024 SD 2.x, 2048 SDXL)."""
    version = version_from_metadata(lora.metadata)
    names = list(lora.layers)
    if version is None:
        if any(name.startswith(("transformer.", "lora_unet_blocks_", "lora_unet_transformer_blocks_")) for name in names):
            version = "sana"
        elif any(name.startswith(("text_encoder_2.", "lora_te2_")) for name in names):
            version = "sdxl"
        else:
            widths = {layer.down.shape[1] for name, layer in lora.layers.items() if name.endswith(("attn2.to_k", "attn2_to_k"))}
            version = version_from_cross_attention(widths.pop()) if len(widths) == 1 else None
    return BaseModel(version, lora.metadata.get("ss_sd_model_name") or None) if version else None


def diffusers_tensors(layers: dict[str, LoraLayerWeights], dtype: torch.dtype = torch.float32
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (PEFT keys: `component.module.lora_A.weight`, `.lora_B.weight`) and the
    `lora_adapter_metadata` entry of a diffusers-layout file: per component the most common rank and alpha,
    with `rank_pattern`/`alpha_pattern` for the layers that differ, and only fields peft 0.13+ reads.
    Text-encoder module names in the patterns and targets drop `text_model.`, so that they match with and
    without that level."""
    tensors, adapters = {}, {}
    by_component: dict[str, dict[str, LoraLayerWeights]] = {}
    for name, layer in layers.items():
        component, module = name.split(".", 1)
        by_component.setdefault(component, {})[module] = layer
        tensors[f"{name}.lora_A.weight"] = layer.down.to(dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = layer.up.to(dtype).contiguous()
    for component, modules in by_component.items():
        component_lora = Lora({f"{component}.{module}": layer for module, layer in modules.items()})
        rank, alpha = component_lora.most_common("rank"), component_lora.most_common("alpha")
        targets = {module: module.removeprefix(CLIP_TEXT_MODEL) for module in modules}
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets.values()),
                  "rank_pattern": {targets[m]: layer.rank for m, layer in modules.items() if layer.rank != rank},
                  "alpha_pattern": {targets[m]: layer.alpha for m, layer in modules.items() if layer.alpha != alpha},
                  "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                  "init_lora_weights": True, "fan_in_fan_out": False}
        assert set(config) <= set(PEFT_013_FIELDS)
        adapters.update({f"{component}.{key}": value for key, value in config.items()})
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(adapters, sort_keys=True)}


DIVERGED = "the training diverged (try a lower --learning_rate)"


def check_finite(tensors: dict[str, torch.Tensor], what: str, why: str = DIVERGED) -> None:
    """Refuse (one line) to save tensors holding NaN or ±inf: such weights only ever produce black images."""
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise BoothkitError(f"will not save {what}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[0]}); {why}")


def nonfinite_layers(lora: Lora) -> list[str]:
    """The layers of `lora` whose matrices or alpha hold NaN or ±inf."""
    return [name for name, layer in lora.layers.items() if not math.isfinite(layer.alpha)
            or not (torch.isfinite(layer.down).all() and torch.isfinite(layer.up).all())]


def check_lora_values(lora: Lora, source: str | Path) -> None:
    """Refuse (one line) a LoRA with NaN or ±inf in a matrix or an alpha: it only ever produces black images, and
    nothing made from it (an export, a merge, a fused model, samples) may hold such values."""
    bad = nonfinite_layers(lora)
    if bad:
        raise BoothkitError(f"LoRA '{source}' holds NaN or inf values in {len(bad)} layer(s) (e.g. '{bad[0]}'): "
                            "it is broken (a diverged training?); use another file")


def save_lora_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: Path,
                   why: str = "the LoRA it is made from holds them") -> Path:
    """Write a LoRA file atomically (umask permissions), refusing non-finite tensors before anything is written."""
    from safetensors.torch import save_file

    from boothkit.io import atomic_path

    check_finite(tensors, f"'{target}'", why)
    try:
        with atomic_path(target) as staging:
            save_file({key: value.contiguous() for key, value in tensors.items()}, str(staging), metadata=metadata)
    except SafetensorError as error:  # safetensors reports the folder's OSError (read-only, disk full) as its own
        raise BoothkitError(f"cannot write '{target}': {first_line(error)}") from None
    return target
