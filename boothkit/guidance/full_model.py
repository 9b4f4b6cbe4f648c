"""Guidance on fully fine-tuned models: the weak and interpolated models as weight offsets of the fine one.

A LoRA model variant is a LoRA scale (`adapters`); a fully fine-tuned model has no adapter, so its variants are
weights. With θ_ft the fine-tuned weights (the pipeline as loaded), θ_pre the base model's and θ_weak the weak
checkpoint's, the variant with adapter scales (s_fine, s_weak) of `adapters.model_scales` is

    θ = θ_pre + s_fine·(θ_ft − θ_pre) + s_weak·(θ_weak − θ_pre) = θ_ft + (1 − s_fine − s_weak)·D_pre + s_weak·D_weak,

D_pre = θ_pre − θ_ft, D_weak = θ_weak − θ_ft: the fine model (1, 0) is θ_ft; AG's weak model (0, 1) is θ_weak;
WIG's θ_ω (ω, 0) is θ_pre + ω·(θ_ft − θ_pre) (Eq. of weight interpolation). Only the offsets a rule needs are
kept, and only for the tensors that differ: the fine model plus one offset, never three full copies. Each
module's variant weight is computed when that module runs and dropped after it (layer by layer), so θ_ft is
never modified and no rounding accumulates over the steps. Rows of different variants cannot share one
weight: the sampler runs each variant's rows as one batch (the fine model's branches together).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from boothkit.errors import BoothkitError
from boothkit.families import load_family
from boothkit.families.base import ModelFamily

PRE, WEAK_OFFSET = "pre", "weak"


class WeightVariants:
    """Offsets {name: {module: {parameter: tensor}}} of the fine model's modules, applied layer by layer."""

    def __init__(self, offsets: dict[str, dict[torch.nn.Module, dict[str, torch.Tensor]]]):
        self.offsets = offsets
        self.coefficients: dict[str, float] = {}
        self._handles = []
        modules = {module for per_module in offsets.values() for module in per_module}
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._before))
            self._handles.append(module.register_forward_hook(self._after))
        self._saved: dict[torch.nn.Module, dict[str, torch.nn.Parameter]] = {}

    @contextlib.contextmanager
    def apply(self, fine_scale: float, weak_scale: float) -> Iterator[None]:
        """Within the block the modules compute with the variant (s_fine, s_weak) (see the module doc)."""
        self.coefficients = {PRE: 1.0 - fine_scale - weak_scale, WEAK_OFFSET: weak_scale}
        missing = [name for name, c in self.coefficients.items() if c != 0 and name not in self.offsets]
        if missing:
            raise RuntimeError(f"model variant needs the {missing[0]} offset, which was not loaded")
        try:
            yield
        finally:
            self.coefficients = {}

    def _before(self, module: torch.nn.Module, args) -> None:
        active = [(self.offsets[name][module], c) for name, c in self.coefficients.items()
                  if c != 0 and module in self.offsets.get(name, {})]
        if not active:
            return
        saved = {}
        for parameter_name in {p for offsets, _ in active for p in offsets}:
            original = module._parameters[parameter_name]
            value = original.detach().clone()
            for offsets, c in active:
                if parameter_name in offsets:
                    value.add_(offsets[parameter_name], alpha=c)
            saved[parameter_name] = original
            module._parameters[parameter_name] = value
        self._saved[module] = saved

    def _after(self, module: torch.nn.Module, args, output) -> None:
        for parameter_name, original in self._saved.pop(module, {}).items():
            module._parameters[parameter_name] = original


def offsets_to(fine: torch.nn.Module, other: torch.nn.Module) -> dict[torch.nn.Module, dict[str, torch.Tensor]]:
    """{submodule of `fine`: {parameter: other − fine}} for the parameters that differ (same architecture)."""
    other_parameters = dict(other.named_parameters())
    offsets: dict[torch.nn.Module, dict[str, torch.Tensor]] = {}
    for module_name, module in fine.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{parameter_name}" if module_name else parameter_name
            value = other_parameters.get(full_name)
            if value is None or value.shape != parameter.shape:
                raise BoothkitError(f"the models differ in their layers ('{full_name}'): not a fine-tuning of one model")
            if not torch.equal(value, parameter):
                offsets.setdefault(module, {})[parameter_name] = (value.to(parameter) - parameter.detach())
    return offsets


def load_weight_variants(family: ModelFamily, base_model: str | None, weak_dir: str | None, needs_pre: bool,
                         needs_weak: bool, revision: str | None = None) -> WeightVariants:
    """The offsets a rule needs: to the base model (WIG: `--base_model`) and to the weak checkpoint (AG: the
    trained modules saved in `weak/`), for the denoiser and the text encoders."""
    modules = {family.denoiser_name: family.denoiser, **family.named_text_encoders}
    offsets = {}
    if needs_pre:
        if not base_model:
            raise BoothkitError("--method wig guides a personalized model: pass --lora_dir (or --lora) for a LoRA, or, "
                                "when --pretrained_model_name_or_path is a fully fine-tuned model, --base_model (the "
                                "model its fine-tuning started from)")
        base = load_family(base_model, revision, torch_dtype=family.denoiser.dtype)
        other = {family.denoiser_name: base.denoiser, **base.named_text_encoders}
        offsets[PRE] = _merged(offsets_to(module, other[name]) for name, module in modules.items())
    if needs_weak:
        offsets[WEAK_OFFSET] = _merged(offsets_to(module, weak) for module, weak in
                                       _weak_modules(family, modules, weak_dir))
    return WeightVariants(offsets)


def _weak_modules(family: ModelFamily, modules: dict[str, torch.nn.Module], weak_dir: str | None):
    """(fine module, weak module) for each module the weak checkpoint holds (`weak/unet/`, ...)."""
    folder = Path(weak_dir or Path(family.source) / "weak")
    found = [name for name in modules if (folder / name / "config.json").is_file()]
    if not found:
        raise BoothkitError(f"--method ag needs a fine and a weak model: pass --lora_dir (or --lora) for a LoRA with "
                            f"its weak/; for a fully fine-tuned model, '{folder}' holds no trained module folder (unet/, "
                            "transformer/, text_encoder/): train with --weak_checkpoint_step, or pass "
                            "--weak_checkpoint_path")
    for name in found:
        module = modules[name]
        dtype_argument = "torch_dtype" if hasattr(module, "enable_gradient_checkpointing") else "dtype"  # diffusers|transformers
        weak = type(module).from_pretrained(folder / name, **{dtype_argument: module.dtype})
        yield module, weak


def _merged(parts) -> dict[torch.nn.Module, dict[str, torch.Tensor]]:
    merged: dict[torch.nn.Module, dict[str, torch.Tensor]] = {}
    for part in parts:
        for module, offsets in part.items():
            merged.setdefault(module, {}).update(offsets)
    return merged
