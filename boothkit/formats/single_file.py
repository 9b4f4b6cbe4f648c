"""`boothkit export MODEL --format single_file`: a diffusers pipeline (SD 1.x, 2.x, SDXL) as one checkpoint file in
the original layout, the one A1111, Forge, ComfyUI, InvokeAI and diffusers' `from_single_file` read.

The original layout is that of the CompVis LDM repository (SD 1.x, 2.x: Rombach et al. 2022) and of Stability's
"sgm" generative-models repository (SDXL: Podell et al. 2023). Every name is derived from the pipeline's own
configs, so any block layout converts (the tiny test models too), never from a table of SD 1.5 names:

- UNet → `model.diffusion_model.`: block numbers from the UNet config (`boothkit.formats.ldm`).
- VAE → `first_stage_model.`: `encoder.down.i.block.j` (`.downsample.conv`), `decoder.up.k.block.j` with k = the
  number of up blocks − 1 − i (the original decoder counts its levels from the lowest resolution up, diffusers
  from the top down; `.upsample.conv`), `mid.block_1/attn_1/block_2`, `norm_out`, `nin_shortcut` for
  `conv_shortcut`; the mid-block attention's linear `to_q/to_k/to_v/to_out.0` are the original 1×1 convolutions
  `q/k/v/proj_out` (weights reshaped to [out, in, 1, 1]), its `group_norm` is `norm`.
- Text encoders. OpenAI CLIP (SD 1.x; SDXL's first) keeps transformers' `CLIPTextModel` names, `text_model.`
  level included (transformers ≥ 5.6 drops it), under `cond_stage_model.transformer.` (SD 1.x) or
  `conditioner.embedders.0.transformer.` (SDXL). OpenCLIP (SD 2.x under `cond_stage_model.model.`, SDXL's
  second under `conditioner.embedders.1.model.`) has its own names: `transformer.resblocks.N.attn.in_proj_weight`
  / `_bias` (q, k and v stacked), `attn.out_proj`, `ln_1`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `token_embedding`,
  `positional_embedding`, `ln_final` and `text_projection`, which OpenCLIP applies as x @ P (so P is the
  transpose of diffusers' `text_projection.weight`).

diffusers' own single-file converters (`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`) read these names;
the tests load every export with `from_single_file` and compare each tensor and the images.

Not written: the sampler's schedule buffers (`betas`, `alphas_cumprod`, ...: every loader rebuilds them from the
model type) and, for SD 2.x, OpenCLIP's 24th layer, which diffusers' SD 2.x text encoder does not have (the
models read the penultimate layer's states; A1111 and ComfyUI load with missing keys allowed). The SAI model
spec's `modelspec.prediction_type` records v-prediction.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from pathlib import Path

import torch

from boothkit.errors import BoothkitError, first_line
from boothkit.formats.ldm import block_prefixes, to_ldm
from boothkit.formats.models import CLIP_TEXT_MODEL, BaseModel

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (text encoder component, layout, prefix) per model family
TEXT_ENCODERS = {
    "sd1": [("text_encoder", "clip", "cond_stage_model.transformer.")],
    "sd2": [("text_encoder", "open_clip", "cond_stage_model.model.")],
    "sdxl": [("text_encoder", "clip", "conditioner.embedders.0.transformer."),
             ("text_encoder_2", "open_clip", "conditioner.embedders.1.model.")],
}
CKPT_METADATA_KEY = "boothkit_metadata"  # a .ckpt's metadata: {str: str} beside its "state_dict"
SGM = "https://github.com/Stability-AI/generative-models"

# VAE: names inside a resnet / the attention block that differ from diffusers'.
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP: per-layer names that differ from CLIP's (q, k and v are stacked into in_proj_*).
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class UnmappedTensor(BoothkitError):
    pass


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_tensors(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet's tensors under their original names (`model.diffusion_model.input_blocks.4.1…`)."""
    prefixes = block_prefixes(dict(config))
    out = {}
    for key, value in state.items():
        module, param = _split(key)
        ldm = to_ldm(module, prefixes)
        if ldm is None:
            raise UnmappedTensor(f"the UNet's '{key}' has no place in the original (LDM) layout")
        out[f"{UNET_PREFIX}{ldm}.{param}"] = value
    return out


def vae_prefixes(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """{diffusers module prefix: (original prefix, renames inside it)} for an `AutoencoderKL` config."""
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    prefixes: dict[str, tuple[str, dict[str, str]]] = {name: (name, {}) for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        prefixes.update({f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
                         f"{part}.conv_norm_out": (f"{part}.norm_out", {}),
                         f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", _VAE_RESNET),
                         f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", _VAE_RESNET),
                         f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", _VAE_ATTENTION)})
    for i in range(levels):
        for j in range(layers):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if i < levels - 1:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
    for i in range(len(config["up_block_types"])):
        level = levels - 1 - i  # the decoder's levels count up from the lowest resolution in the original
        for j in range(layers + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        if i < levels - 1:
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    return prefixes


def vae_tensors(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """An `AutoencoderKL`'s tensors under their original names (`first_stage_model.decoder.up.1.block.0…`)."""
    prefixes = vae_prefixes(dict(config))
    out = {}
    for key, value in state.items():
        module, param = _split(key)
        for prefix, (original, inner) in prefixes.items():
            if module == prefix or module.startswith(prefix + "."):
                rest = module[len(prefix) + 1:]
                rest = inner.get(rest, rest)
                name = f"{original}.{rest}" if rest else original
                if inner is _VAE_ATTENTION and rest in ("q", "k", "v", "proj_out") and param == "weight" \
                        and value.ndim == 2:
                    value = value.reshape(*value.shape, 1, 1)  # linear → 1×1 convolution
                out[f"{VAE_PREFIX}{name}.{param}"] = value
                break
        else:
            raise UnmappedTensor(f"the VAE's '{key}' has no place in the original (LDM) layout")
    return out


def _with_text_model(key: str) -> str:
    if key.startswith(CLIP_TEXT_MODEL) or key.startswith("text_projection"):
        return key
    return CLIP_TEXT_MODEL + key


def clip_tensors(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP text model's tensors under `prefix`, in transformers' names with `text_model.`."""
    return {prefix + _with_text_model(key): value for key, value in state.items()}


def open_clip_tensors(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model (OpenCLIP weights in transformers' names) in OpenCLIP's own names under `prefix`."""
    out: dict[str, torch.Tensor] = {}
    stacked: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = _with_text_model(key)
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = value.t()  # OpenCLIP: x @ P; diffusers: Linear, x @ W.T
            continue
        inner = name[len(CLIP_TEXT_MODEL):]
        if inner in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[inner]] = value
            continue
        match = _CLIP_LAYER.fullmatch(inner)
        if match is None:
            raise UnmappedTensor(f"the text encoder's '{key}' has no place in the OpenCLIP layout")
        layer, module, param = match.groups()
        block = f"{prefix}transformer.resblocks.{layer}."
        projection = re.fullmatch(r"self_attn\.([qkv])_proj", module)
        if projection:
            stacked.setdefault((block, param), {})[projection.group(1)] = value
        elif module in _OPEN_CLIP_LAYER:
            out[f"{block}{_OPEN_CLIP_LAYER[module]}.{param}"] = value
        else:
            raise UnmappedTensor(f"the text encoder's '{key}' has no place in the OpenCLIP layout")
    for (block, param), parts in stacked.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise UnmappedTensor(f"'{block}attn.in_proj_{param}' lacks one of q, k, v")
        out[f"{block}attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def checkpoint_tensors(pipeline, version: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded SD 1.x / 2.x / SDXL pipeline in the original single-file layout."""
    kind = version.split("-")[0]
    if kind not in TEXT_ENCODERS:
        raise BoothkitError(f"--format single_file writes SD 1.x, SD 2.x and SDXL models, not {version}")
    tensors = unet_tensors(pipeline.unet.state_dict(), pipeline.unet.config)
    tensors.update(vae_tensors(pipeline.vae.state_dict(), pipeline.vae.config))
    for component, layout, prefix in TEXT_ENCODERS[kind]:
        module = getattr(pipeline, component, None)
        if module is None:
            raise BoothkitError(f"the model has no {component}; a single-file checkpoint needs it")
        convert = clip_tensors if layout == "clip" else open_clip_tensors
        tensors.update(convert(module.state_dict(), prefix))
    return tensors


# The command ----------------------------------------------------------------------------------------------------

def is_lora_source(source: str) -> bool:
    """Whether SOURCE is a LoRA (a file, or a folder without `model_index.json`) rather than a pipeline."""
    path = Path(source).expanduser()
    return path.is_file() or (path.is_dir() and not (path / "model_index.json").is_file())


def fused_pipeline(base: BaseModel, lora: str, scale: float, revision: str | None):
    """The base pipeline with `lora` fused in at `scale` (diffusers' `fuse_lora`; the adapter is then unloaded)."""
    from boothkit.families import load_family
    from boothkit.guidance.adapters import load_adapter

    family = load_family(base.source, revision)
    load_adapter(family, lora, "fused", "LoRA")
    family.pipeline.fuse_lora(adapter_names=["fused"], lora_scale=scale)
    family.pipeline.unload_lora_weights()
    return family.pipeline


def checkpoint_metadata(pipeline, base: BaseModel, title: str, extra: dict[str, str]) -> dict[str, str]:
    """The SAI model spec's `modelspec.*` keys of a full model, and boothkit's mark."""
    from boothkit import __version__
    from boothkit.formats.metadata import WRITTEN_BY_KEY

    factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    size = pipeline.unet.config.sample_size
    metadata = {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": base.architecture.removesuffix("/lora"),
        "modelspec.implementation": SGM, "modelspec.title": title,
        "modelspec.prediction_type": "v" if pipeline.scheduler.config.get("prediction_type") == "v_prediction"
        else "epsilon",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        WRITTEN_BY_KEY: f"boothkit {__version__}",
    }
    if isinstance(size, int):
        metadata["modelspec.resolution"] = f"{size * factor}x{size * factor}"
    metadata.update(extra)
    return metadata


def save_checkpoint(tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: Path) -> None:
    """Write `.safetensors` (metadata in its header) or `.ckpt` (`{"state_dict": …, "boothkit_metadata": …}`:
    tensors and strings only, which `torch.load(weights_only=True)` reads), atomically, refusing NaN/inf first."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from boothkit.formats.lora import check_finite
    from boothkit.io import atomic_path

    check_finite(tensors, f"'{target}'", "the model it is made from holds them")
    try:
        with atomic_path(target) as staging:
            if target.suffix.lower() == ".ckpt":
                torch.save({"state_dict": tensors, CKPT_METADATA_KEY: metadata}, staging)
            else:
                save_file(tensors, str(staging), metadata=metadata)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise BoothkitError(f"cannot write '{target}': {first_line(error)}") from None


def ckpt_written_by_boothkit(path: Path) -> bool:
    """Whether a `.ckpt` is one boothkit wrote (its `boothkit_metadata` says so); read without unpickling code."""
    from boothkit.formats.metadata import WRITTEN_BY_KEY

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file, or one holding more than tensors and plain types
        return False
    metadata = data.get(CKPT_METADATA_KEY) if isinstance(data, dict) else None
    return isinstance(metadata, dict) and WRITTEN_BY_KEY in metadata


def run_single_file(config) -> int:
    """`boothkit export SOURCE --format single_file --output FILE` (`ExportConfig`)."""
    from boothkit.formats.commands import DTYPES, _size, check_not_input, load_for, resolve_base
    from boothkit.formats.models import base_model
    from boothkit.layout import check_output_file

    target = check_output_file(config.output, overwrite=config.overwrite, suffixes=(".safetensors", ".ckpt"))
    extra = {"boothkit.source": str(config.source)}
    if is_lora_source(config.source):
        if not config.fuse_lora:
            raise BoothkitError(f"'{config.source}' is a LoRA: add --fuse_lora to merge it (at --lora_scale, default "
                                "1.0) into its base model and write that as one file")
        check_not_input(target, [config.source])
        _, base = load_for(config.source, resolve_base(config.source, config.pretrained_model_name_or_path,
                                                       config.revision))
        if base.source is None:
            raise BoothkitError(f"the base model of LoRA '{config.source}' is not at hand: pass "
                                "--pretrained_model_name_or_path")
        _check_kind(base)
        pipeline = fused_pipeline(base, config.source, config.lora_scale, config.revision)
        extra["boothkit.fused_lora"] = json.dumps({"lora": str(config.source), "scale": config.lora_scale,
                                                   "base_model": base.source})
        what = f"{base.describe()} with LoRA '{config.source}' fused at {config.lora_scale:g}"
    else:
        if config.fuse_lora:
            raise BoothkitError(f"--fuse_lora merges a LoRA given as SOURCE; '{config.source}' is a model")
        if config.pretrained_model_name_or_path:
            raise BoothkitError("--pretrained_model_name_or_path is the base of a LoRA SOURCE; here SOURCE "
                                f"'{config.source}' is the model itself")
        from boothkit.families import load_family

        base = base_model(config.source, config.revision)
        _check_kind(base)
        pipeline = load_family(config.source, config.revision).pipeline
        what = base.describe()
    if target.suffix.lower() == ".ckpt":
        print(f"warning: '{target.name}' is a pickle (.ckpt): loaders that unpickle it can run code hidden in such "
              "files; prefer .safetensors", file=sys.stderr)
    dtype = DTYPES[config.dtype]
    with torch.no_grad():
        tensors = {key: value.detach().to("cpu", dtype).contiguous()
                   for key, value in checkpoint_tensors(pipeline, base.version).items()}
    save_checkpoint(tensors, checkpoint_metadata(pipeline, base, target.stem, extra), target)
    print(f"single_file: {len(tensors)} tensors, {_size(target.stat().st_size)}, {config.dtype}, {what} → {target}")
    return 0


def _check_kind(base: BaseModel) -> None:
    if base.version.split("-")[0] not in TEXT_ENCODERS:
        raise BoothkitError(f"--format single_file writes SD 1.x, SD 2.x and SDXL models, not {base.label}")
