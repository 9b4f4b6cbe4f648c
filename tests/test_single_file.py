"""`boothkit export MODEL --format single_file` (issue 12): one checkpoint file in the original LDM/sgm layout.

diffusers' own single-file loader (`from_single_file`) is the independent reader: every export loads with no
missing or unexpected tensor, every UNet, VAE and text-encoder tensor equals the pipeline's (fp32: exactly) and
the images equal the pipeline's. The tiny SDXL's two text encoders are equally wide (32), and `from_single_file`
tells SDXL's CLIP-L from its OpenCLIP-G by width (768 vs 1280 in SDXL), so the end-to-end SDXL check uses a tiny
SDXL whose second text encoder is wider (48); the standard tiny models are read back with diffusers' converter
functions directly.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from boothkit.testing import tiny
from boothkit.testing.tiny import build_tiny
from test_lora_stacking import write_style_lora
from test_train import assert_one_line_error

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
OPENAI_CLIP = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")  # transformers' own names
DIFFUSERS_ONLY = ("down_blocks", "up_blocks", "mid_block", "resnets", "conv_shortcut", "time_emb_proj", "samplers.",
                  "conv_norm_out", "group_norm", "self_attn", "layer_norm", "fc1", "text_model")


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """sd15, sd21, the standard tiny sdxl and `sdxl_wide`: its second text encoder 48 wide (see the module doc)."""
    root = tmp_path_factory.mktemp("single-file-models")
    wide = dict(tiny._SDXL_SIZES[False], text=({"hidden": 32}, {"hidden": 48}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tiny._SDXL_SIZES, False, wide)
        sdxl_wide = build_tiny("sdxl", root / "sdxl_wide", seed=0)
    return {**tiny_models, "sdxl": build_tiny("sdxl", root / "sdxl", seed=0), "sdxl_wide": sdxl_wide}


def export(run_cli, source: Path, out: Path, *extra: str, dtype: str = "fp32") -> Path:
    result = run_cli("export", str(source), "--format", "single_file", "--output", str(out), "--dtype", dtype, *extra)
    assert result.code == 0, result.err
    assert out.name in result.out and "tensors" in result.out
    return out


def pipeline_class(model: Path):
    return StableDiffusionXLPipeline if "sdxl" in model.name else StableDiffusionPipeline


def from_single_file(file: Path, model: Path):
    pipe = pipeline_class(model).from_single_file(str(file), config=str(model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_tensors(expected, actual) -> None:
    """Every component's tensors: the same names (none missing, none extra) and equal values."""
    for name in COMPONENTS:
        if getattr(expected, name, None) is None:
            continue
        want, got = getattr(expected, name).state_dict(), getattr(actual, name).state_dict()
        assert sorted(want) == sorted(got), name
        for key, value in want.items():
            assert not got[key].is_meta, f"{name}.{key} was not in the file"
            assert torch.equal(value, got[key]), f"{name}.{key}"


def images(pipe) -> np.ndarray:
    return pipe("a photo of sks dog", num_inference_steps=3, height=32, width=32, guidance_scale=5.0, output_type="np",
                generator=torch.Generator("cpu").manual_seed(4)).images


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl_wide"])
def test_from_single_file_loads_every_tensor_and_the_same_images(kind, models, run_cli, tmp_path):
    model = models[kind]
    file = export(run_cli, model, tmp_path / f"{kind}.safetensors")
    original = pipeline_class(model).from_pretrained(model)
    original.set_progress_bar_config(disable=True)
    loaded = from_single_file(file, model)
    assert_same_tensors(original, loaded)
    assert np.abs(images(original) - images(loaded)).max() <= 1.001 / 255
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    architecture = {"sd15": "stable-diffusion-v1", "sd21": "stable-diffusion-v2-768-v",
                    "sdxl_wide": "stable-diffusion-xl-v1-base"}[kind]
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.sai_model_spec"] == "1.0.0" and metadata["modelspec.title"] == kind
    assert metadata["modelspec.resolution"] == "32x32" and metadata["boothkit.written_by"].startswith("boothkit")
    assert metadata["modelspec.prediction_type"] == ("v" if kind == "sd21" else "epsilon")
    tensors = load_file(file)
    attention = [key for key in tensors if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key)]
    assert attention and all(tensors[key].ndim == 4 for key in attention)  # the original's 1×1 convolutions
    # diffusers' converters also take some diffusers names as they are; A1111's and ComfyUI's modules do not
    original = [key for key in tensors if not key.startswith(OPENAI_CLIP)]
    assert not [key for key in original if any(name in key for name in DIFFUSERS_ONLY)]
    assert any(".nin_shortcut." in key for key in tensors) and any(".skip_connection." in key for key in tensors)


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_diffusers_converters_read_back_every_tensor(kind, models, run_cli, tmp_path):
    """The standard tiny models, read with diffusers' converter functions (the tensor-level round trip)."""
    model = models[kind]
    checkpoint = load_file(export(run_cli, model, tmp_path / "model.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    pairs = [(unet.state_dict(), convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))),
             (vae.state_dict(), convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))]
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    if kind == "sd21":
        converted = convert_open_clip_checkpoint(text, checkpoint, prefix="cond_stage_model.model.")
    else:
        converted = convert_ldm_clip_checkpoint(checkpoint)
    pairs.append((text.state_dict(), converted))
    if kind == "sdxl":
        text_2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
        pairs.append((text_2.state_dict(),
                      convert_open_clip_checkpoint(text_2, checkpoint, prefix="conditioner.embedders.1.model.")))
    used = 0
    for want, got in pairs:
        got = {key if key in want else key.removeprefix("text_model."): value for key, value in got.items()}
        assert sorted(want) == sorted(got)
        for key, value in want.items():
            assert torch.equal(value, got[key]), key
        used += len(got)
    fused_qkv = 2 * sum(key.endswith(("in_proj_weight", "in_proj_bias")) for key in checkpoint)  # 1 file, 3 diffusers
    assert used == len(checkpoint) + fused_qkv


def test_ckpt_is_a_plain_dict_of_tensors_that_loaders_read(models, run_cli, tmp_path):
    model = models["sd21"]
    result = run_cli("export", str(model), "--format", "single_file", "--output", str(tmp_path / "m.ckpt"),
                     "--dtype", "fp32")
    assert result.code == 0, result.err
    assert "warning:" in result.err and "pickle" in result.err
    data = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert set(data) == {"state_dict", "boothkit_metadata"}
    assert all(isinstance(value, torch.Tensor) for value in data["state_dict"].values())
    assert data["boothkit_metadata"]["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    original = StableDiffusionPipeline.from_pretrained(model)
    assert_same_tensors(original, from_single_file(tmp_path / "m.ckpt", model))


def test_fuse_lora_equals_diffusers_fuse_lora(models, run_cli, tmp_path):
    model = models["sd15"]
    style = write_style_lora(model, tmp_path / "style", seed=5)
    assert_one_line_error(run_cli("export", str(style), "--format", "single_file", "--output",
                                  str(tmp_path / "no.safetensors")), "add --fuse_lora")
    assert_one_line_error(run_cli("export", str(model), "--format", "single_file", "--fuse_lora", "--output",
                                  str(tmp_path / "no.safetensors")), "is a model")
    assert_one_line_error(run_cli("export", str(style), "--fuse_lora", "--output", str(tmp_path / "no.safetensors")),
                          "--format single_file")
    file = export(run_cli, style, tmp_path / "fused.safetensors", "--fuse_lora", "--lora_scale", "0.7",
                  "--pretrained_model_name_or_path", str(model))
    reference = StableDiffusionPipeline.from_pretrained(model)
    reference.load_lora_weights(style)
    reference.fuse_lora(lora_scale=0.7)
    reference.unload_lora_weights()
    base = StableDiffusionPipeline.from_pretrained(model)
    changed = [key for key, value in base.unet.state_dict().items()
               if not torch.equal(value, reference.unet.state_dict()[key])]
    assert changed  # the LoRA changes the UNet
    assert_same_tensors(reference, from_single_file(file, model))


def test_output_safety_and_dtype(models, run_cli, tmp_path):
    model = models["sd15"]
    for name in ("mine.safetensors", "mine.ckpt"):  # a user's file is never replaced, --overwrite or not
        mine = tmp_path / name
        if name.endswith(".ckpt"):
            torch.save({"state_dict": {"x": torch.zeros(1)}}, mine)
        else:
            save_file({"x": torch.zeros(1)}, mine)
        before = mine.read_bytes()
        for extra in ((), ("--overwrite",)):
            result = run_cli("export", str(model), "--format", "single_file", "--output", str(mine), *extra)
            assert_one_line_error(result, "boothkit did not write it")
        assert mine.read_bytes() == before
    full = export(run_cli, model, tmp_path / "full.safetensors")
    half = export(run_cli, model, tmp_path / "half.safetensors", dtype="fp16")
    assert all(value.dtype == torch.float16 for value in load_file(half).values())
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55
    assert_one_line_error(run_cli("export", str(model), "--format", "single_file", "--output", str(half)),
                          "pass --overwrite")
    ckpt = export(run_cli, model, tmp_path / "ours.ckpt")
    export(run_cli, model, ckpt, "--overwrite", dtype="fp16")  # boothkit's own .ckpt is replaced with --overwrite
    assert_one_line_error(run_cli("export", str(model), "--format", "single_file", "--output",
                                  str(tmp_path / "x.bin")), ".safetensors")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["decoder.conv_out.bias"][0] = float("nan")
    save_file(tensors, weights)
    assert_one_line_error(run_cli("export", str(broken), "--format", "single_file", "--output",
                                  str(tmp_path / "nan.safetensors")), "NaN")
    assert not (tmp_path / "nan.safetensors").exists()
