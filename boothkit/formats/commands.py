"""`boothkit export`, `boothkit info` and `boothkit merge`: LoRA files for the tools people already use."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from boothkit.errors import BoothkitError
from boothkit.formats import kohya, merge
from boothkit.formats.config import ExportConfig, InfoConfig, MergeConfig
from boothkit.formats.lora import (Lora, LoraLayerWeights, check_lora_values, diffusers_tensors, guess_base,
                                   nonfinite_layers, peek_lora, read_lora, read_tensors, save_lora_file)
from boothkit.formats.metadata import PROMPT_ENCODING_KEY, TRAINING_KEY, LoraDescription, lora_metadata, read_trigger
from boothkit.formats.models import BaseModel, base_model
from boothkit.layout import check_output_file, lora_file

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def recorded_base(metadata: dict[str, str]) -> str | None:
    """The base model a LoRA's metadata names (boothkit's training settings, else kohya's `ss_sd_model_name`)."""
    try:
        training = json.loads(metadata.get(TRAINING_KEY) or "{}")
    except ValueError:
        training = {}
    return training.get("base_model") or metadata.get("ss_sd_model_name") or None


def resolve_base(source: str, flag: str | None, revision: str | None) -> BaseModel | None:
    """The LoRA's base model: `--pretrained_model_name_or_path`, else the one its metadata records when it can
    be read (a folder here, or a hub id in the cache); None when neither is at hand."""
    if flag:
        return base_model(flag, revision)
    _, _, metadata = read_tensors(source)
    recorded = recorded_base(metadata)
    if recorded:
        try:
            return base_model(recorded, revision)
        except BoothkitError:
            log.info("the LoRA's recorded base model '%s' is not at hand; its kind is read from the LoRA", recorded)
    return None


def load_for(source: str, base: BaseModel | None) -> tuple[Lora, BaseModel]:
    """Read a LoRA and the model it is for, refusing a LoRA for another kind of model (naming both)."""
    lora = read_lora(source, base)
    check_lora_values(lora, source)
    own = guess_base(lora)
    if base is None:
        if own is None:
            raise BoothkitError(f"cannot tell which model LoRA '{source}' is for: pass --pretrained_model_name_or_path")
        return lora, own
    if own is not None and not own.same_kind(base):
        raise BoothkitError(f"LoRA '{source}' is for {own.describe()}, not for {base.describe()}")
    return lora, base


def check_not_input(target: Path, sources: list[str]) -> None:
    """Refuse an --output that is one of the LoRAs read: replacing it would destroy the input."""
    for source in sources:
        file = lora_file(source)
        if target.exists() and file.exists() and target.samefile(file):
            raise BoothkitError(f"--output '{target}' is the LoRA '{source}' being read; choose another file")


def describe(lora: Lora, base: BaseModel, title: str) -> LoraDescription:
    """The description of a LoRA written from `lora` (export, merge): what its own metadata says."""
    try:
        training = json.loads(lora.metadata[TRAINING_KEY]) if TRAINING_KEY in lora.metadata else None
    except ValueError:
        training = None
    extra = {PROMPT_ENCODING_KEY: lora.metadata[PROMPT_ENCODING_KEY]} if PROMPT_ENCODING_KEY in lora.metadata else {}
    training = training or {}
    return LoraDescription(base, title, read_trigger(lora.metadata), training.get("resolution"), training or None,
                           training.get("instance_images"), extra)


def file_tensors(layers: dict[str, LoraLayerWeights], base: BaseModel, layout: str, dtype: torch.dtype
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a file in `layout` and the layout's own metadata keys."""
    if layout == "diffusers":
        return diffusers_tensors(layers, dtype)
    if base.family == "sdxl" and not base.denoiser_config and any(name.startswith("unet.") for name in layers):
        raise BoothkitError("the kohya layout names SDXL UNet layers after the UNet's blocks, which its config gives: "
                            "pass --pretrained_model_name_or_path (the SDXL model the LoRA was trained on)")
    return kohya.to_kohya(layers, base, dtype), {}


def write(layers: dict[str, LoraLayerWeights], base: BaseModel, layout: str, dtype: torch.dtype,
          description: LoraDescription, target: Path) -> tuple[int, int]:
    """Write a LoRA file; (tensors, bytes)."""
    summary = Lora(layers)
    tensors, metadata = file_tensors(layers, base, layout, dtype)
    metadata.update(lora_metadata(description, summary.most_common("rank"), summary.most_common("alpha")))
    save_lora_file(tensors, metadata, target)
    return len(tensors), target.stat().st_size


def run_export(config: ExportConfig) -> int:
    if config.format == "single_file":
        from boothkit.formats.single_file import run_single_file

        return run_single_file(config)
    target = check_output_file(config.output, overwrite=config.overwrite)
    check_not_input(target, [config.source])
    lora, base = load_for(config.source, resolve_base(config.source, config.pretrained_model_name_or_path,
                                                       config.revision))
    description = describe(lora, base, target.stem)
    count, size = write(lora.layers, base, config.format, DTYPES[config.dtype], description, target)
    experimental = " (experimental: no ComfyUI core loader reads SANA LoRAs yet)" if base.family == "sana" and \
        config.format == "kohya" else ""
    print(f"{config.format}{experimental}: {count} tensors, {_size(size)}, {config.dtype}, for {base.describe()} "
          f"→ {target}")
    return 0


def run_info(config: InfoConfig) -> int:
    lora = peek_lora(config.file)
    file, metadata, layout = lora.path, lora.metadata, lora.layout
    base = guess_base(lora)
    ranks = sorted({layer.rank for layer in lora.layers.values()})
    alphas = sorted({layer.alpha for layer in lora.layers.values()})
    lines = [f"file: {file}", f"format: {layout}" + (" (PEFT keys)" if layout == "diffusers" else ""),
             f"base model: {base.describe() if base else 'unknown'}",
             f"rank: {_listing(ranks)}", f"alpha: {_listing(alphas)}",
             f"trigger: {read_trigger(metadata) or '(none recorded)'}",
             f"tensors: {_tensor_count(file)} ({len(lora.layers)} layers)"]
    broken = nonfinite_layers(lora)
    if broken:
        lines.append(f"broken: {len(broken)} layer(s) hold NaN or inf values (e.g. '{broken[0]}'); export, merge "
                     "and sample refuse this file")
    lines.append("metadata:" if metadata else "metadata: (none)")
    lines += [f"  {key}: {_short(value)}" for key, value in sorted(metadata.items())]
    print("\n".join(lines))
    return 0


def run_merge(config: MergeConfig) -> int:
    weighted = config.weighted()
    base = resolve_base(weighted[0][0], config.pretrained_model_name_or_path, config.revision)
    loaded = []
    for path, weight in weighted:
        lora, lora_base = load_for(path, base)
        base = base or lora_base
        loaded.append((lora, weight))
    if config.into_base:
        from boothkit.formats.fuse import fuse_into_base

        fuse_into_base(config, base, [(path, weight) for path, weight in weighted])
        return 0
    target = check_output_file(config.output, overwrite=config.overwrite)
    check_not_input(target, [path for path, _ in weighted])
    inputs = [(lora.layers, weight) for lora, weight in loaded]
    if config.method == "concat":
        layers = merge.concat(inputs)
    else:
        result = merge.svd(inputs, config.rank)
        layers = result.layers
        for group, error in merge.error_by_group(result.errors).items():
            print(f"svd rank {config.rank}: {group}: relative error {error:.2e}")
    description = _merged_description([lora for lora, _ in loaded], weighted, base, target.stem)
    count, size = write(layers, base, "diffusers", DTYPES[config.dtype], description, target)
    print(f"merged {len(loaded)} LoRAs ({config.method}): {count} tensors, {_size(size)}, for {base.describe()} → {target}")
    return 0


def _merged_description(loras: list[Lora], weighted: list[tuple[str, float]], base: BaseModel,
                        title: str) -> LoraDescription:
    triggers = [trigger for trigger in (read_trigger(lora.metadata) for lora in loras) if trigger]
    extra = {"boothkit.merged_from": json.dumps([{"path": str(path), "weight": weight} for path, weight in weighted])}
    first = describe(loras[0], base, title)
    if first.extra.get(PROMPT_ENCODING_KEY):
        extra[PROMPT_ENCODING_KEY] = first.extra[PROMPT_ENCODING_KEY]
    return LoraDescription(base, title, ", ".join(dict.fromkeys(triggers)) or None, first.resolution, extra=extra)


def _tensor_count(file: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return len(list(handle.keys()))


def _listing(values: list) -> str:
    shown = [str(int(v)) if float(v).is_integer() else f"{v:g}" for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:6])}{' …' if len(shown) > 6 else ''} (per layer)"


def _short(value: str, limit: int = 300) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else value[:limit] + f"… ({len(value)} characters)"


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
