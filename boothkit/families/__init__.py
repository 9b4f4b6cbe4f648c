"""Model families, detected from a pipeline's `model_index.json`."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from boothkit.errors import BoothkitError, first_line
from boothkit.families.base import Conditioning, FamilyOptions, LatentDistribution, ModelFamily

# Each family by the pipeline class that a model's `model_index.json` names (its `pipeline_class_names`), and
# where the family is defined: its module, and what that imports (SANA: diffusers' SanaPipeline), loads only
# when a model of the family does.
FAMILY_OF_PIPELINE: dict[str, str] = {
    "StableDiffusionPipeline": "boothkit.families.sd:StableDiffusionFamily",
    "StableDiffusionXLPipeline": "boothkit.families.sdxl:StableDiffusionXLFamily",
    "SanaPipeline": "boothkit.families.sana:SanaFamily",
}
# Pipelines of the field that boothkit knows but does not support yet: a clearer message than "unsupported".
PLANNED: dict[str, str] = {}

__all__ = ["Conditioning", "FamilyOptions", "LatentDistribution", "ModelFamily", "FAMILIES", "load_family",
           "family_class_for", "load_vae", "weights_dtype"]
_PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _family_class(spec: str) -> type[ModelFamily]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str):
    if name == "FAMILIES":  # every family class, in FAMILY_OF_PIPELINE's order (imports every family's module)
        return tuple(dict.fromkeys(_family_class(spec) for spec in FAMILY_OF_PIPELINE.values()))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def weights_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of frozen weights for `--mixed_precision`; fp16 kernels are GPU-only in practice."""
    if precision == "fp16" and device.type == "cpu":
        raise BoothkitError("--mixed_precision fp16 needs a GPU; use bf16 or no on a CPU")
    return _PRECISIONS[precision]


def _looks_local(source: str) -> bool:
    return os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source) or source.count("/") > 1


def read_model_index(source: str, revision: str | None = None) -> dict:
    """The pipeline's `model_index.json`, from a local folder or the hub; a clear error otherwise."""
    if _looks_local(source):
        folder = Path(source).expanduser()
        if folder.is_file():
            raise BoothkitError(f"model '{source}' is a file; give the folder of a diffusers pipeline (single-file "
                                "checkpoints are not supported yet)")
        if not folder.is_dir():
            raise BoothkitError(f"model '{source}' not found: no such folder")
        if not (folder / "model_index.json").is_file():
            raise BoothkitError(f"model folder '{source}' is not a diffusers pipeline (no model_index.json)")
    try:
        index = DiffusionPipeline.load_config(source, revision=revision)
    except Exception as error:  # hub/network/parse errors all mean: this model cannot be used
        raise BoothkitError(f"cannot load model '{source}': {first_line(error)}") from None
    return index


def _check_components(folder: Path, index: dict, skipped: set[str]) -> None:
    """Every component `model_index.json` names (e.g. `unet`) that will be loaded has its folder: a clear line
    instead of diffusers' "no file named config.json found in directory" about the pipeline's folder."""
    for name, spec in index.items():
        if name.startswith("_") or name in skipped or not isinstance(spec, (list, tuple)) or None in spec:
            continue
        if not (folder / name).is_dir():
            raise BoothkitError(f"model folder '{folder}' lacks its '{name}' folder (model_index.json names it)")


def family_class_for(model_index: dict, source: str) -> type[ModelFamily]:
    class_name = model_index.get("_class_name", "")
    if class_name in FAMILY_OF_PIPELINE:
        return _family_class(FAMILY_OF_PIPELINE[class_name])
    if class_name in PLANNED:
        raise BoothkitError(f"model '{source}' is a {PLANNED[class_name]} pipeline, which boothkit does not support yet")
    supported = ", ".join(FAMILY_OF_PIPELINE)
    raise BoothkitError(f"model '{source}' is a {class_name or 'unknown'} pipeline; boothkit supports: {supported}")


def load_family(source: str, revision: str | None = None, variant: str | None = None,
                torch_dtype: torch.dtype = torch.float32, options: FamilyOptions = FamilyOptions(),
                vae: str | None = None) -> ModelFamily:
    """Detect the family from `model_index.json` and load its pipeline (hub id or local path) with `options`
    (`FamilyOptions.from_config(config)`; `family.with_options` changes them without reloading), and with the
    VAE `vae` (`--pretrained_vae_model_name_or_path`) instead of its own when given."""
    index = read_model_index(source, revision)
    family = family_class_for(index, source)
    components = {"vae": load_vae(vae, torch_dtype)} if vae else {}
    if _looks_local(source):
        _check_components(Path(source).expanduser(), index, skipped=set(family.load_kwargs()) | set(components))
    try:
        return family.from_pretrained(source, revision=revision, variant=variant, torch_dtype=torch_dtype,
                                      options=options, components=components)
    except (OSError, ValueError) as error:
        raise BoothkitError(f"cannot load model '{source}': {first_line(error)}") from None


def load_vae(source: str, torch_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An `AutoencoderKL` from a VAE's folder or hub id (its `config.json` at the top, as
    madebyollin/sdxl-vae-fp16-fix) or from a pipeline's `vae/` folder."""
    from diffusers import AutoencoderKL

    folder = Path(source).expanduser()
    if _looks_local(source) and not folder.is_dir():
        raise BoothkitError(f"VAE '{source}' not found: no such folder")
    subfolder = "vae" if (folder / "vae" / "config.json").is_file() and not (folder / "config.json").is_file() else None
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=torch_dtype)
    except Exception as error:  # missing files, hub errors, a config of another model class ...
        raise BoothkitError(f"cannot load VAE '{source}': {first_line(error)}") from None
    vae.requires_grad_(False)
    return vae
