"""SDXL sampling items of issue 10: `--guidance_rescale` (Lin et al. 2024), the negative prompt's None vs ""
semantics, the model's own scheduler as the default, and the SDXL-shaped bench model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from test_eval_cache import baseline, best_key, computed, work  # noqa: F401 (a cached evaluation: fixtures)
from test_eval_cache import run as run_evaluation
from test_sdxl import PROMPTS, STEPS, pixels, sdxl, sdxl_lora  # noqa: F401 (the tiny SDXL and its LoRAs: fixtures)
from test_sdxl import sampler as sdxl_sampler

from boothkit.evaluate.runner import Evaluator
from boothkit.families import load_family
from boothkit.guidance.config import SampleConfig
from boothkit.guidance.rules import (FINE_COND, FINE_UNCOND, INTERP_UNCOND, WEAK_COND, WEAK_UNCOND, make_guidance,
                                     rescale_guidance)
from boothkit.guidance.sampler import GuidedSampler, SamplerSettings, load_guidance_adapters
from boothkit.guidance.settings import family_defaults, sampler_settings
from boothkit.testing.tiny import build_sdxl_bench


def sdxl_pipeline_images(model: Path, lora: Path | None, prompt: str, count: int, seed: int, **call) -> np.ndarray:
    """`StableDiffusionXLPipeline` with its own scheduler, `lora` loaded, image i from seed + i (a list of
    generators), `STEPS` steps; `call`: further arguments of the call (guidance_scale, negative_prompt, ...)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe(prompt, num_images_per_prompt=count, num_inference_steps=STEPS, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(count)], **call).images


def test_sdxl_bench_shape(tmp_path):
    """SDXL's structure at reduced width: three levels (no attention in the first), transformer depth growing with
    depth, 64-dim heads, two text encoders (the second projected) concatenated, text_time conditioning."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    out = build_sdxl_bench(tmp_path / "bench")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    params = sum(p.numel() for p in unet.parameters())
    assert 30e6 < params < 60e6, params
    config = unet.config
    assert config.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    depths = list(config.transformer_layers_per_block)
    assert depths[1] > 1 and depths == sorted(depths)
    head_dims = [width // heads for width, heads in zip(config.block_out_channels, config.attention_head_dim)]
    assert head_dims == [64, 64, 64]
    text, text_2 = (CLIPTextConfig.from_pretrained(out / name) for name in ("text_encoder", "text_encoder_2"))
    assert text.hidden_size + text_2.hidden_size == config.cross_attention_dim
    assert text_2.hidden_size > text.hidden_size and text_2.projection_dim == text_2.hidden_size
    assert config.addition_embed_type == "text_time"
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + text_2.projection_dim
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert config.sample_size * 2 ** (len(vae["block_out_channels"]) - 1) == 256


# ---------------------------------------------------------------------------------------------------------------
# --guidance_rescale φ (Lin et al. 2024, Sec. 3.4)


def test_rescale_rule_is_the_equation():
    """Eq. 15: x_rescaled = x_cfg · σ(x_pos)/σ(x_cfg), σ per sample over all other dimensions; Eq. 16:
    φ · x_rescaled + (1 − φ) · x_cfg. Checked in float64 numpy, and against diffusers' `rescale_noise_cfg`."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    generator = torch.Generator().manual_seed(0)
    guided = torch.randn(3, 4, 6, 5, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]).view(
        -1, 1, 1, 1).double()
    reference = torch.randn(3, 4, 6, 5, generator=generator, dtype=torch.float64) + 0.3
    g, r = guided.numpy(), reference.numpy()
    for phi in (0.0, 0.3, 0.7, 1.0):
        sigma_ratio = r.reshape(3, -1).std(axis=1, ddof=1) / g.reshape(3, -1).std(axis=1, ddof=1)
        expected = phi * g * sigma_ratio.reshape(-1, 1, 1, 1) + (1 - phi) * g
        got = rescale_guidance(guided, reference, phi)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.numpy(), rescale_noise_cfg(guided, reference, phi).numpy(), rtol=1e-12)
    full = rescale_guidance(guided, reference, 1.0)  # φ = 1: each sample has the reference's std
    np.testing.assert_allclose(full.flatten(1).std(dim=1).numpy(), reference.flatten(1).std(dim=1).numpy())
    assert rescale_guidance(guided, reference, 0.0) is guided


@pytest.mark.parametrize("method", ["cfg", "ag", "wig", "none"])
def test_every_rule_is_rescaled_against_the_fine_conditional_output(method):
    """`combine` = the rule's own equation, then φ against FINE_COND (for AG and WIG the fine model's conditional
    branch, not a weak or interpolated one)."""
    generator = torch.Generator().manual_seed(1)
    out = {branch: torch.randn(2, 4, 3, 3, generator=generator) * (i + 1)
           for i, branch in enumerate((FINE_UNCOND, FINE_COND, WEAK_UNCOND, WEAK_COND, INTERP_UNCOND))}
    plain = make_guidance(method, 4.0, cfg_scale=3.0, omega=0.4)
    rescaled = make_guidance(method, 4.0, cfg_scale=3.0, omega=0.4, guidance_rescale=0.6)
    assert rescaled.guidance_rescale == 0.6 and plain.guidance_rescale == 0.0
    expected = rescale_guidance(plain.combine(out), out[FINE_COND], 0.6)
    assert torch.equal(rescaled.combine(out), expected)
    if method != "none":  # `none` is the conditional output itself: the rescale leaves it (up to rounding)
        assert not torch.allclose(rescaled.combine(out), plain.combine(out), atol=1e-3)
    with pytest.raises(ValueError, match="guidance_rescale"):
        make_guidance(method, 4.0, guidance_rescale=1.5)


@pytest.mark.parametrize("with_lora", [False, True])
def test_cfg_with_guidance_rescale_reproduces_the_sdxl_pipeline(with_lora, sdxl, sdxl_lora):
    lora = sdxl_lora if with_lora else None
    ours = sdxl_sampler(sdxl, lora, "cfg", guidance_scale=9.0, guidance_rescale=0.7).generate(PROMPTS, None, 2, seed=7)
    plain = pixels(sdxl_sampler(sdxl, lora, "cfg", guidance_scale=9.0).generate(PROMPTS, None, 2, seed=7))
    assert np.abs(pixels(ours) - plain).max() > 4 / 255  # φ does change these images
    for index, prompt in enumerate(PROMPTS):
        expected = sdxl_pipeline_images(sdxl, lora, prompt, 2, 7, guidance_scale=9.0, guidance_rescale=0.7)
        assert np.abs(pixels([g for g in ours if g.prompt_index == index]) - expected).max() <= 1.001 / 255


def test_cfg_with_guidance_rescale_reproduces_the_sd_pipeline(sd15, sd15_lora):
    """Every family: SD's pipeline has the same `guidance_rescale`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    family = load_family(str(sd15))
    guidance = make_guidance("cfg", 9.0, guidance_rescale=0.7)
    adapters = load_guidance_adapters(family, str(sd15_lora), None, guidance)
    settings = SamplerSettings(STEPS, 32, 32, "ddim", batch_size=2, progress=False)
    ours = GuidedSampler(family, guidance, settings, adapters).generate(PROMPTS[:1], None, 2, seed=3)
    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(sd15_lora)
    expected = pipe(PROMPTS[0], num_images_per_prompt=2, guidance_scale=9.0, guidance_rescale=0.7,
                    num_inference_steps=STEPS, generator=[torch.Generator("cpu").manual_seed(3 + i) for i in range(2)],
                    output_type="np").images
    assert np.abs(pixels(ours) - expected).max() <= 1.001 / 255


def test_sample_command_applies_and_records_guidance_rescale(sdxl, sdxl_lora, tmp_path, run_cli):
    images, records = {}, {}
    for phi in ("0", "0.7"):
        out = tmp_path / f"phi-{phi}"
        result = run_cli("sample", "--pretrained_model_name_or_path", sdxl, "--lora_dir", sdxl_lora, "--method", "wig",
                         "--omega", "0.3", "--guidance_scale", "9", "--guidance_rescale", phi, "--prompt", "a sks dog",
                         "--num_inference_steps", 3, "--output_dir", out)
        assert result.code == 0, result.err
        records[phi] = json.loads((out / "samples.json").read_text())[0]
        images[phi] = np.asarray(Image.open(out / records[phi]["file"]), dtype=np.float64) / 255
    assert (records["0"]["guidance_rescale"], records["0.7"]["guidance_rescale"]) == (0.0, 0.7)
    assert np.abs(images["0"] - images["0.7"]).max() > 4 / 255
    result = run_cli("sample", "--pretrained_model_name_or_path", sdxl, "--guidance_rescale", "1.5",
                     "--prompt", "a sks dog", "--output_dir", tmp_path / "refused")
    assert result.code == 2 and "--guidance_rescale" in result.err.strip().splitlines()[-1]


def test_evaluate_keys_guidance_rescale(work, computed, monkeypatch):
    """A changed φ is sampled again (another key), the same φ is answered by the cache, and φ = 0 is the run
    without φ (the baseline's key). The sampled images do follow φ."""
    sampled = []
    original = Evaluator.sample

    def sample(self, subject, setting):
        generated = original(self, subject, setting)
        sampled.append(np.stack([np.asarray(g.image, dtype=np.float64) for g in generated]) / 255)
        return generated

    monkeypatch.setattr(Evaluator, "sample", sample)
    baseline_key = best_key(work)
    run_evaluation(work, "--guidance_rescale", 0.7)
    run_evaluation(work, "--guidance_rescale", 0.5)
    assert len(computed) == 2 and len({baseline_key, *computed}) == 3
    assert np.abs(sampled[0] - sampled[1]).max() > 1 / 255
    run_evaluation(work, "--guidance_rescale", 0.7)
    assert len(computed) == 2 and best_key(work) == computed[0]
    run_evaluation(work, "--guidance_rescale", 0)
    assert len(computed) == 2 and best_key(work) == baseline_key


# ---------------------------------------------------------------------------------------------------------------
# No negative prompt (None) vs the empty negative prompt ""


def test_sdxl_negative_none_is_zeros_and_empty_string_is_encoded(sdxl):
    """As `StableDiffusionXLPipeline.encode_prompt`: with `force_zeros_for_empty_prompt`, negative_prompt=None
    gives zero embeddings and zero pooled embeddings; "" is encoded like any prompt."""
    family = load_family(str(sdxl))
    assert family.pipeline.config.force_zeros_for_empty_prompt
    ours = family.encode_prompts([None, "", "blurry"], torch.device("cpu"), negative=True).tensors
    for row, negative in enumerate((None, "", "blurry")):
        _, negative_embeds, _, negative_pooled = family.pipeline.encode_prompt(
            "a sks dog", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative)
        # (a batch of three rounds otherwise than a batch of one)
        assert torch.allclose(ours["encoder_hidden_states"][row], negative_embeds[0], atol=1e-5)
        assert torch.allclose(ours["text_embeds"][row], negative_pooled[0], atol=1e-5)
    assert (ours["text_embeds"][0] == 0).all() and not (ours["text_embeds"][1] == 0).all()


def test_sdxl_negative_none_and_empty_string_sample_as_the_pipeline(sdxl, sdxl_lora):
    cfg = sdxl_sampler(sdxl, sdxl_lora, "cfg", guidance_scale=5.0)
    images = {}
    for negative in (None, ""):
        images[negative] = pixels(cfg.generate(PROMPTS[:1], negative, 2, seed=4))
        expected = sdxl_pipeline_images(sdxl, sdxl_lora, PROMPTS[0], 2, 4, guidance_scale=5.0, negative_prompt=negative)
        assert np.abs(images[negative] - expected).max() <= 1.001 / 255
    assert np.abs(images[None] - images[""]).max() > 2 / 255  # the two are told apart


@pytest.mark.parametrize("kind", ["sd15", "sana"])
def test_sd_and_sana_encode_no_negative_prompt_as_the_empty_one(kind, tiny_models, sana):
    """Their pipelines encode "" for no negative prompt: None and "" are the same conditioning."""
    family = load_family(str(sana if kind == "sana" else tiny_models[kind]))
    none, empty = (family.encode_prompts([negative], torch.device("cpu"), negative=True).tensors
                   for negative in (None, ""))
    assert none.keys() == empty.keys() and all(torch.equal(none[name], empty[name]) for name in none)
    assert not (none["encoder_hidden_states"] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# SDXL's default scheduler: the model's own


def with_scheduler(model: Path, folder: Path, class_name: str) -> Path:
    """A copy of the model whose scheduler is `class_name` (model_index.json and scheduler_config.json)."""
    copy = folder / f"scheduler-{class_name}"
    shutil.copytree(model, copy)
    for path, edit in ((copy / "model_index.json", lambda index: index.update(scheduler=["diffusers", class_name])),
                       (copy / "scheduler" / "scheduler_config.json", lambda config: config.update(_class_name=class_name))):
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return copy


def default_settings(model: Path, **flags):
    config = SampleConfig(pretrained_model_name_or_path=str(model), prompt=["x"], output_dir="unused", **flags)
    family = load_family(str(model))
    loaded = sampler_settings(family, config)
    assert loaded == sampler_settings(family_defaults(str(model)), config)  # read without weights: the same
    return family, loaded


def test_sdxl_samples_with_the_models_own_scheduler(sdxl, sdxl_lora, tmp_path):
    model = with_scheduler(sdxl, tmp_path, "DPMSolverMultistepScheduler")
    family, settings = default_settings(model, num_inference_steps=STEPS)
    assert settings.scheduler == "dpm"
    guidance = make_guidance("cfg", 5.0)
    adapters = load_guidance_adapters(family, str(sdxl_lora), None, guidance)
    ours = pixels(GuidedSampler(family, guidance, replace(settings, progress=False), adapters)
                  .generate(PROMPTS[:1], None, 2, seed=6))
    expected = sdxl_pipeline_images(model, sdxl_lora, PROMPTS[0], 2, 6, guidance_scale=5.0)  # its own scheduler
    assert type(StableDiffusionXLPipeline.from_pretrained(model).scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert np.abs(ours - expected).max() <= 1.001 / 255
    euler = pixels(sdxl_sampler(model, sdxl_lora, "cfg", guidance_scale=5.0).generate(PROMPTS[:1], None, 2, seed=6))
    assert np.abs(ours - euler).max() > 2 / 255  # not the Euler of before


def test_default_schedulers_of_the_families(sdxl, tiny_models, sana, tmp_path):
    """SDXL: the model's own (Euler for the base model); SD keeps DDIM and SANA FlowDPM-Solver whatever their
    model's scheduler; `--scheduler model` asks any family for the model's own."""
    assert default_settings(sdxl)[1].scheduler == "euler"
    assert default_settings(with_scheduler(sdxl, tmp_path, "UniPCMultistepScheduler"))[1].scheduler == "unipc"
    sd_pndm = with_scheduler(tiny_models["sd15"], tmp_path, "PNDMScheduler")
    assert default_settings(sd_pndm)[1].scheduler == "ddim"
    assert default_settings(sd_pndm, scheduler="model")[1].scheduler == "pndm"
    assert default_settings(sana)[1].scheduler == "flow_dpm"
    assert default_settings(sana, scheduler="model")[1].scheduler == "dpm"  # the model's config, unchanged
    assert default_settings(sdxl, scheduler="heun")[1].scheduler == "heun"
