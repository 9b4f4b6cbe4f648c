"""SDXL sampling: equality with `StableDiffusionXLPipeline` (UNet and both text-encoder LoRAs), the guidance
identities, `force_zeros_for_empty_prompt`, the family's defaults and the `sample` command."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from boothkit.families import load_family
from boothkit.families.sdxl import StableDiffusionXLFamily
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GuidedSampler, SamplerSettings, load_guidance_adapters
from boothkit.guidance.schedulers import scheduler_class
from boothkit.guidance.settings import family_defaults, resolve_scheduler, sampler_settings
from boothkit.guidance.config import SampleConfig
from boothkit.testing.tiny import build_tiny

PROMPTS = ["a photo of sks dog", "a sks dog in the snow"]
STEPS = 5


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    return build_tiny("sdxl", tmp_path_factory.mktemp("sdxl") / "model", seed=0)


def write_random_lora(model: Path, out: Path, seed: int, pipeline_class=StableDiffusionXLPipeline, alpha: float = 4,
                      std: float = 0.3, **load_kwargs) -> Path:
    """LoRA (rank 4, `alpha`) on the UNet and every text encoder with random nonzero weights (B ~ N(0, std²)),
    saved by the pipeline's own saver with its adapter metadata (so the file records alpha)."""
    pipe = pipeline_class.from_pretrained(model, **load_kwargs)
    generator = torch.Generator().manual_seed(seed)
    targets = {"unet": ["to_k", "to_q", "to_v", "to_out.0"],
               **{name: ["q_proj", "k_proj", "v_proj", "out_proj"] for name in ("text_encoder", "text_encoder_2")
                  if getattr(pipe, name, None) is not None}}
    layers = {}
    for name, modules in targets.items():
        module = getattr(pipe, name)
        module.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=modules, init_lora_weights="gaussian"))
        with torch.no_grad():
            for key, parameter in module.named_parameters():
                if "lora_B" in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        config = module.peft_config["default"].to_dict()
        layers[f"{name}_lora_adapter_metadata"] = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    pipeline_class.save_lora_weights(out, safe_serialization=True, **layers)
    return out


@pytest.fixture(scope="module")
def sdxl_lora(sdxl, tmp_path_factory) -> Path:
    """A fine LoRA with a weak one (other random weights) in its `weak/`."""
    lora = tmp_path_factory.mktemp("sdxl-lora") / "lora"
    write_random_lora(sdxl, lora, seed=1)
    write_random_lora(sdxl, lora / "weak", seed=2)
    return lora


def sampler(model: Path, lora: Path | None, method: str, **scales) -> GuidedSampler:
    family = load_family(str(model))
    guidance = make_guidance(method, **scales)
    adapters = load_guidance_adapters(family, str(lora) if lora else None, None, guidance)
    settings = SamplerSettings(STEPS, 32, 32, "euler", batch_size=3, progress=False)
    return GuidedSampler(family, guidance, settings, adapters)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(generated.image, dtype=np.float64) / 255 for generated in images])


def pipeline_images(model: Path, lora: Path | None, prompt: str, negative: str | None, count: int, seed: int,
                    guidance_scale: float) -> np.ndarray:
    pipe = StableDiffusionXLPipeline.from_pretrained(model)  # its own scheduler: Euler
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe(prompt, negative_prompt=negative, num_images_per_prompt=count, guidance_scale=guidance_scale,
                num_inference_steps=STEPS, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]).images


def with_force_zeros(model: Path, folder: Path, value: bool) -> Path:
    """A copy of the model whose `model_index.json` sets `force_zeros_for_empty_prompt` to `value`."""
    copy = folder / f"force-zeros-{value}"
    shutil.copytree(model, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = value
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


@pytest.mark.parametrize("with_lora", [False, True])
def test_cfg_reproduces_the_sdxl_pipeline(with_lora, sdxl, sdxl_lora):
    lora = sdxl_lora if with_lora else None
    ours = sampler(sdxl, lora, "cfg", guidance_scale=5.0).generate(PROMPTS, None, 2, seed=7)
    for index, prompt in enumerate(PROMPTS):
        expected = pipeline_images(sdxl, lora, prompt, None, 2, 7, 5.0)
        assert np.abs(pixels([g for g in ours if g.prompt_index == index]) - expected).max() <= 1.001 / 255


def test_negative_prompt_matches_the_pipeline(sdxl, sdxl_lora):
    ours = sampler(sdxl, sdxl_lora, "cfg", guidance_scale=4.0).generate(PROMPTS[:1], "blurry, cartoon", 2, seed=3)
    expected = pipeline_images(sdxl, sdxl_lora, PROMPTS[0], "blurry, cartoon", 2, 3, 4.0)
    assert np.abs(pixels(ours) - expected).max() <= 1.001 / 255


@pytest.mark.parametrize("force_zeros", [True, False])
def test_force_zeros_for_empty_prompt_is_honoured(force_zeros, sdxl, sdxl_lora, tmp_path):
    model = with_force_zeros(sdxl, tmp_path, force_zeros)
    family = load_family(str(model))
    negative = family.encode_prompts([None, "blurry"], torch.device("cpu"), negative=True).tensors
    zero_rows = [bool((negative[name][0] == 0).all()) for name in ("encoder_hidden_states", "text_embeds")]
    assert zero_rows == [force_zeros, force_zeros]
    assert not (negative["text_embeds"][1] == 0).all()  # a real negative prompt is always encoded
    ours = sampler(model, sdxl_lora, "cfg", guidance_scale=5.0).generate(PROMPTS[:1], None, 1, seed=5)
    expected = pipeline_images(model, sdxl_lora, PROMPTS[0], None, 1, 5, 5.0)
    assert np.abs(pixels(ours) - expected).max() <= 1.001 / 255


def test_force_zeros_changes_the_images(sdxl, sdxl_lora, tmp_path):
    """The setting matters for this model: sampling with the other value gives other images."""
    images = [pixels(sampler(with_force_zeros(sdxl, tmp_path, value), sdxl_lora, "cfg", guidance_scale=5.0)
                     .generate(PROMPTS[:1], None, 1, seed=5)) for value in (True, False)]
    assert np.abs(images[0] - images[1]).max() > 2 / 255


def test_wig_omega_one_and_ag_lambda_one_are_cfg(sdxl, sdxl_lora):
    cfg = pixels(sampler(sdxl, sdxl_lora, "cfg", guidance_scale=5.0).generate(PROMPTS, "blurry", 2, seed=0))
    wig = pixels(sampler(sdxl, sdxl_lora, "wig", guidance_scale=5.0, omega=1.0).generate(PROMPTS, "blurry", 2, seed=0))
    ag = pixels(sampler(sdxl, sdxl_lora, "ag", guidance_scale=1.0, cfg_scale=5.0).generate(PROMPTS, "blurry", 2, seed=0))
    assert np.array_equal(wig, cfg)
    assert np.abs(ag - cfg).max() <= 1.001 / 255
    # Not trivially equal: other settings (the text-encoder LoRAs scaled by ω included) change the images.
    wig0 = pixels(sampler(sdxl, sdxl_lora, "wig", guidance_scale=5.0, omega=0.0).generate(PROMPTS, "blurry", 2, seed=0))
    ag2 = pixels(sampler(sdxl, sdxl_lora, "ag", guidance_scale=2.0, cfg_scale=5.0).generate(PROMPTS, "blurry", 2, seed=0))
    assert np.abs(wig0 - cfg).max() > 2 / 255 and np.abs(ag2 - cfg).max() > 2 / 255


def test_time_ids_are_the_pipelines_defaults(sdxl):
    family = load_family(str(sdxl))
    pipe = family.pipeline
    latents = torch.zeros(3, 4, 24, 16)
    expected = pipe._get_add_time_ids((48, 32), (0, 0), (48, 32), torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(family.time_ids(latents, torch.float32), expected.repeat(3, 1))


def test_family_defaults_are_the_pipelines(sdxl):
    family = load_family(str(sdxl))
    assert isinstance(family, StableDiffusionXLFamily) and family.name == "sdxl"
    assert family.text_encoders == [family.pipeline.text_encoder, family.pipeline.text_encoder_2]
    assert family.default_scheduler == "model"  # the model's own scheduler, as the pipeline samples with
    assert scheduler_class(resolve_scheduler(family.default_scheduler, family)) is type(family.pipeline.scheduler)
    pipe = family.pipeline
    assert family.default_resolution == pipe.default_sample_size * pipe.vae_scale_factor == 32
    config = SampleConfig(pretrained_model_name_or_path=str(sdxl), prompt=["x"], output_dir="unused")
    loaded = sampler_settings(family, config)
    assert loaded == sampler_settings(family_defaults(str(sdxl)), config)
    assert (loaded.num_inference_steps, loaded.scheduler, loaded.height) == (50, "euler", 32)
    assert family.default_guidance_scale == 5.0


def test_long_prompts_are_warned_about_once(sdxl, caplog):
    family = load_family(str(sdxl))
    long_prompt = "a sks dog " + "very " * 90
    with caplog.at_level(logging.WARNING):
        family.encode_prompts([long_prompt, "a sks dog"], torch.device("cpu"))
    warnings = [record.getMessage() for record in caplog.records if record.name.startswith("boothkit")]
    assert len(warnings) == 1 and "reads the first 77" in warnings[0]


def test_ddpm_training_sample_follows_the_schedule(sdxl):
    family = load_family(str(sdxl))
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    noisy, timesteps, target, weights = family.training_sample(latents, noise, generators)
    expected_t = torch.cat([torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    assert torch.equal(timesteps, expected_t)
    alpha = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, alpha.sqrt() * latents + (1 - alpha).sqrt() * noise, atol=1e-6)
    assert torch.equal(target, noise) and torch.equal(weights, torch.ones(2))


@pytest.mark.parametrize("method", ["cfg", "ag"])
def test_sample_command_on_sdxl(method, sdxl, sdxl_lora, tmp_path, run_cli):
    out = tmp_path / "out"
    result = run_cli("sample", "--pretrained_model_name_or_path", sdxl, "--lora_dir", sdxl_lora, "--method", method,
                     "--prompt", "a sks dog", "--num_images_per_prompt", 2, "--num_inference_steps", 3,
                     "--output_dir", out)
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_a_sks_dog.png", "0001_a_sks_dog.png"]
    records = json.loads((out / "samples.json").read_text())
    assert [(r["scheduler"], r["height"], r["steps"]) for r in records] == [("euler", 32, 3)] * 2
    assert records[0]["guidance_scale"] == (5.0 if method == "cfg" else 2.0)


def test_weight_interpolation_scales_both_text_encoders_loras(sdxl, sdxl_lora):
    """θ_ω at ω = 0 is the base model: its negative-prompt embeddings are the base model's, through both
    text encoders (whose LoRAs the interpolation scales too)."""
    from boothkit.guidance.rules import INTERP_UNCOND

    wig = sampler(sdxl, sdxl_lora, "wig", guidance_scale=5.0, omega=0.0)
    interpolated = wig.conditioning(PROMPTS, "blurry")[INTERP_UNCOND].tensors
    base = load_family(str(sdxl)).encode_prompts(["blurry"] * 2, torch.device("cpu"), negative=True).tensors
    fine = wig.family.encode_prompts(["blurry"] * 2, torch.device("cpu"), negative=True).tensors
    for name in ("encoder_hidden_states", "text_embeds"):
        assert torch.allclose(interpolated[name], base[name], atol=1e-6)
        assert not torch.allclose(fine[name], base[name], atol=1e-3)  # the LoRA does change them


@torch.no_grad()
def test_decode_is_the_pipelines(sdxl):
    """Latents de-normalised with the VAE's latents_mean/std when it has them (as the pipeline does), and an fp16
    VAE with `force_upcast` decodes in float32 and stays fp16."""
    family = load_family(str(sdxl))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = pixels_of(family.decode(latents))
    family.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.0, 0.5, 1.5])
    settings = SamplerSettings(STEPS, 32, 32, "euler", progress=False)
    ours = GuidedSampler(family, make_guidance("cfg", 5.0), settings, []).generate(PROMPTS[:1], None, 1, seed=1)
    family.pipeline.set_progress_bar_config(disable=True)
    expected = family.pipeline(PROMPTS[0], num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                               generator=[torch.Generator("cpu").manual_seed(1)]).images
    assert np.abs(pixels(ours) - expected).max() <= 1.001 / 255
    assert np.abs(pixels_of(family.decode(latents)) - plain).max() > 2 / 255  # the statistics are used
    family.vae.register_to_config(latents_mean=None, latents_std=None)
    family.vae.to(torch.float16).to(torch.float32)  # the weights as fp16 holds them, computing in float32
    rounded = pixels_of(family.decode(latents))
    family.vae.to(torch.float16)
    assert np.array_equal(pixels_of(family.decode(latents)), rounded)
    assert family.vae.dtype == torch.float16


def pixels_of(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
