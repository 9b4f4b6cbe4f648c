"""LoRA adapters for guided sampling: load fine and weak LoRAs side by side, and scale them per sample.

A LoRA layer computes W·x + s·B(A(x)). With s replaced, while a batch runs, by per-row factors (row i times
its own factor·s: `per_sample_scales`), one batch can hold the fine model (fine adapter at 1), the weak model (weak adapter
at 1), the weight interpolation θ_ω = (1−ω)·θ_pre + ω·θ_ft (fine adapter at ω: LoRA is linear in its
scale, so this *is* the interpolated weight, not an output mix) and the base model (all at 0). No weights
are copied and no adapter is (un)loaded inside the sampling loop.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import warnings
import weakref
from pathlib import Path
from typing import Iterator

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from boothkit.errors import BoothkitError, first_line
from boothkit.families.base import ModelFamily
from boothkit import layout
from boothkit.layout import LORA_WEIGHT_NAME, TRAIN_CONFIG_NAME

log = logging.getLogger(__name__)

FINE, WEAK = "fine", "weak"


def model_scales(model: str, omega: float) -> dict[str, float]:
    """LoRA scale of each adapter for a model variant of `boothkit.guidance.rules.Branch`."""
    return {"fine": {FINE: 1.0}, "weak": {WEAK: 1.0}, "interp": {FINE: omega}}[model]


def existing_lora_file(path: str | Path, what: str) -> Path:
    """`layout.lora_file(path)`, with a clear error when there is none."""
    candidate = layout.lora_file(path)
    if not candidate.is_file():
        raise BoothkitError(f"{what} '{path}' has no {LORA_WEIGHT_NAME}")
    return candidate


def load_adapter(family: ModelFamily, path: str | Path, name: str, what: str) -> None:
    """Load a LoRA in any layout boothkit reads (diffusers/PEFT, kohya/A1111 with or without `.alpha`, SANA's
    original names) as adapter `name`, as diffusers' `load_lora_weights` loads it; a LoRA for another kind of
    model is refused naming both, and every tensor of the file must find its layer."""
    file = existing_lora_file(path, what)
    source, expected = _loadable(family, file, path, what)
    try:
        with warnings.catch_warnings():  # fine and weak adapters side by side are intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if isinstance(source, dict):
                family.pipeline.load_lora_weights(source, adapter_name=name)
            else:
                family.pipeline.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except BoothkitError:
        raise
    except Exception as error:  # shape or key mismatches surface as several exception types
        raise BoothkitError(f"{what} '{path}' does not fit model '{family.source}': {first_line(error)}") from None
    loaded = sum(len(get_peft_model_state_dict(module, adapter_name=name)) for module in _adapted_modules(family, name))
    if loaded == 0 or loaded < expected:
        raise BoothkitError(
            f"{what} '{path}' does not fit model '{family.source}': {loaded} of {expected} LoRA tensors "
            "matched its layers"
        )


def _loadable(family: ModelFamily, file: Path, path: str | Path, what: str) -> tuple[Path | dict, int]:
    """What to hand `load_lora_weights` (the file, or for layouts diffusers does not read — SANA's original
    names — a converted state dict) and how many LoRA matrices must load. kohya/A1111 files hold one `.alpha`
    scalar per layer beside its matrices: diffusers folds it into the scale, it is no tensor of its own."""
    from boothkit.formats.lora import check_lora_values, guess_base, peek_lora, peft_state_dict, read_lora

    lora = peek_lora(file)
    check_lora_values(lora, path)
    own, model = guess_base(lora), family.base_model
    if own is not None and not own.same_kind(model):
        raise BoothkitError(f"{what} '{path}' is for {own.describe()}, not for {model.describe()}")
    if lora.layout == "kohya" and family.name == "sana":
        state = peft_state_dict(read_lora(file, model).layers)
        return state, len(state)
    return file, 2 * len(lora.layers)


def _adapted_modules(family: ModelFamily, name: str) -> list[torch.nn.Module]:
    modules = [family.denoiser, *family.text_encoders]
    return [module for module in modules if name in getattr(module, "peft_config", {})]


_LAYERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, list[LoraLayer]]]" = weakref.WeakKeyDictionary()


def lora_layers(module: torch.nn.Module) -> list[LoraLayer]:
    """The LoRA layers inside `module`. Walking a UNet's thousands of modules costs milliseconds, and the sampler
    asks every step: the list is kept until the module's adapters change (another `peft_config` object under
    any name; the cache holds those objects, so a new one can never reuse an old one's identity)."""
    configs = tuple(getattr(module, "peft_config", {}).items())
    cached = _LAYERS.get(module)
    if cached is not None and len(cached[0]) == len(configs) and all(
            name == old_name and config is old_config for (name, config), (old_name, old_config) in zip(configs, cached[0])):
        return cached[1]
    layers = [layer for layer in module.modules() if isinstance(layer, LoraLayer)]
    _LAYERS[module] = (configs, layers)
    return layers


@contextlib.contextmanager
def per_sample_scales(modules: list[torch.nn.Module], scales: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, adapter `name`'s contribution to batch row i is multiplied by `scales[name][i]`.

    Adapters whose factors are all 1 are left untouched, so a plain batch runs exactly as without scaling. When
    every factor is 0 or 1, no row has two adapters and the layers have no other active adapter (AG's batch:
    the fine LoRA on its rows, the weak one on the others), each LoRA runs on its own rows only
    (`_forward_by_blocks`), instead of every LoRA on every row times 0 or 1.
    """
    scaled = {name: factors for name, factors in scales.items() if not bool((factors == 1).all())}
    layers = [layer for module in modules for layer in lora_layers(module)] if scaled else []
    blocks = _adapter_blocks(scales, layers) if scaled else None
    replaced, routed = [], []
    try:
        for layer in layers:
            if blocks is not None and "forward" not in vars(layer):
                routed.append(layer)  # the instance attribute wins over the class's forward in Module.__call__
                layer.forward = functools.partial(_forward_by_blocks, layer, blocks)
                continue
            for name, factors in scaled.items():
                if name in layer.lora_B:
                    _check_plain_lora(layer, name)
                    replaced.append((layer, name, layer.scaling[name]))
                    layer.scaling[name] = _row_scaling(layer, layer.scaling[name], factors)
        yield
    finally:
        for layer, name, scaling in replaced:
            layer.scaling[name] = scaling
        for layer in routed:
            del layer.forward


def _adapter_blocks(scales: dict[str, torch.Tensor], layers: list[LoraLayer]) -> list[tuple[str, int, int]] | None:
    """[(adapter, first row, end row)] when the factors select rather than scale: all 0 or 1, at most one adapter
    at 1 per row, each adapter's rows contiguous (a branch-major batch), plain LoRAs, and no other adapter active
    in any layer (another LoRA at its weight on every row has no block). Otherwise None."""
    blocks = []
    for name, factors in scales.items():
        rows = torch.nonzero(factors.detach().cpu() == 1).flatten().tolist()
        if not bool(((factors == 0) | (factors == 1)).all()) or rows != list(range(rows[0], rows[-1] + 1) if rows else []):
            return None
        if rows:
            blocks.append((name, rows[0], rows[-1] + 1))
    ordered = sorted(blocks, key=lambda block: block[1])
    if any(later[1] < earlier[2] for earlier, later in zip(ordered, ordered[1:])):  # a row with two adapters
        return None
    names = set(scales)
    for layer in layers:
        if getattr(layer, "merged", False) or not set(layer.active_adapters) <= names or not all(
                _is_plain_lora(layer, name) for name in names):
            return None
    return blocks


def _forward_by_blocks(layer: LoraLayer, blocks: list[tuple[str, int, int]], x: torch.Tensor, *args, **kwargs):
    """W·x for every row, plus each adapter's s·B(A(x)) on its own rows only: what peft's mixed-adapter batch
    (`adapter_names`) computes, with row slices (views) where peft gathers and scatters copies by index, since
    the rows of one adapter are contiguous here. Rows outside every block get the base model."""
    result = layer.base_layer(x, *args, **kwargs)
    for name, start, end in blocks:
        if name not in layer.lora_A:
            continue
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        rows = layer.lora_dropout[name](x[start:end].to(lora_A.weight.dtype))
        delta = (lora_B(lora_A(rows)) * layer.scaling[name]).to(result.dtype)
        if torch.is_grad_enabled():  # autograd forbids the in-place add on a slice of a leaf: out of place
            result = torch.cat((result[:start], result[start:end] + delta, result[end:]))
        else:
            result[start:end] += delta
    return result


def _row_scaling(layer: LoraLayer, scaling: float, factors: torch.Tensor):
    """What stands in for `layer.scaling[name]`: a `RowScaling` the first time, which learns how many dimensions
    the layer's LoRA output has; then a plain (rows, 1, ..., 1) tensor on the LoRA weights' device and dtype,
    which peft's `* scaling` multiplies without any Python in between."""
    ndim = _OUTPUT_NDIM.get(layer)
    if ndim is None:
        return RowScaling(scaling, factors, layer)
    weight = next(iter(layer.lora_B.values())).weight  # the LoRA output's device and dtype (peft casts to them)
    return (factors * scaling).to(device=weight.device, dtype=weight.dtype).view((factors.shape[0],) + (1,) * (ndim - 1))


def _is_plain_lora(layer: LoraLayer, name: str) -> bool:
    """Not a DoRA or other peft LoRA variant: its output is exactly s·B(A(x))."""
    return not (layer.use_dora.get(name, False) or name in getattr(layer, "lora_variant", {}))


def _check_plain_lora(layer: LoraLayer, name: str) -> None:
    if not _is_plain_lora(layer, name):
        raise BoothkitError(f"adapter '{name}' is a DoRA (or other variant) adapter, which per-sample scaling "
                            "does not support")


_OUTPUT_NDIM: "weakref.WeakKeyDictionary[LoraLayer, int]" = weakref.WeakKeyDictionary()  # of each layer's LoRA output


class RowScaling:
    """Stands in for a LoRA layer's float `scaling[name]` (α/r) while per-sample scales apply.

    peft's LoRA layers add `lora_B(lora_A(x)) * scaling`; `tensor * RowScaling` falls to `__rmul__`, which
    multiplies row i by factors[i]·α/r — the same one multiplication as with the float, with no forward hook on
    any layer (hooks on every LoRA layer cost WIG ~5 % of each forward) — and records the output's shape, so
    that later steps put a plain tensor there (`_row_scaling`).
    """

    def __init__(self, scaling: float, factors: torch.Tensor, layer: LoraLayer):
        self.factors = factors * scaling
        self.layer = layer

    def __rmul__(self, tensor: torch.Tensor) -> torch.Tensor:
        """Row i of a batch-first tensor times factors[i]·scaling."""
        rows = self.factors.shape[0]
        if tensor.shape[0] != rows:
            raise RuntimeError(f"per-sample LoRA scales for {rows} rows, layer saw {tensor.shape[0]}")
        _OUTPUT_NDIM[self.layer] = tensor.ndim
        shape = (rows,) + (1,) * (tensor.ndim - 1)
        return tensor * self.factors.to(device=tensor.device, dtype=tensor.dtype).view(shape)


TEXT_OPTIONS = ("max_sequence_length", "complex_human_instruction")
_ASSUMED: set[str] = set()  # LoRA files whose assumed settings were announced (once per process)


def text_options(config, lora_dir: str | Path | None) -> tuple[int, bool]:
    """Prompt-encoding options for sampling, so that training and sampling embed prompts alike. For each
    option, the first of: the flag, when the user set it; the LoRA file's own metadata
    (`boothkit.prompt_encoding`, which travels with the file); the run's `train_config.json` beside it;
    else the flag's default, announced in one line when the LoRA is a transformer (SANA) LoRA, whose prompts
    these options change (a LoRA from the diffusers SANA example was trained without the instruction)."""
    values = {name: getattr(config, name) for name in TEXT_OPTIONS}
    unset = [name for name in TEXT_OPTIONS if name not in config.model_fields_set]
    if lora_dir is None or not unset:
        return int(values["max_sequence_length"]), bool(values["complex_human_instruction"])
    recorded = _recorded_text_options(Path(lora_dir))
    for name in unset:
        if name in recorded:
            values[name] = recorded[name]
    assumed = [name for name in unset if name not in recorded]
    file = existing_lora_file(lora_dir, "LoRA folder")
    if assumed and str(file) not in _ASSUMED and _is_transformer_lora(file):
        _ASSUMED.add(str(file))
        log.warning("LoRA '%s' does not record how its prompts were embedded; assuming %s (set %s to change)",
                    file, ", ".join(f"{name} {values[name]}" for name in assumed),
                    " or ".join(_flag_to_change(name, values[name]) for name in assumed))
    return int(values["max_sequence_length"]), bool(values["complex_human_instruction"])


def _recorded_text_options(lora_dir: Path) -> dict:
    """What the LoRA's metadata, else its run's train_config.json, says about TEXT_OPTIONS."""
    from boothkit.formats.metadata import read_prompt_encoding

    file = layout.lora_file(lora_dir)
    recorded = read_prompt_encoding(file) if file.is_file() else None
    if recorded is not None:
        return {name: recorded[name] for name in TEXT_OPTIONS if name in recorded}
    saved = file.parent / TRAIN_CONFIG_NAME
    try:
        trained = json.loads(saved.read_text()).get("config", {}) if saved.is_file() else {}
    except (OSError, ValueError, AttributeError):
        trained = {}
    return {name: trained[name] for name in TEXT_OPTIONS if name in trained}


def _is_transformer_lora(file: Path) -> bool:
    with safe_open(str(file), "pt") as handle:
        return any(key.startswith("transformer.") for key in handle.keys())


def _flag_to_change(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--no_{name}" if value else f"--{name}"
    return f"--{name}"
