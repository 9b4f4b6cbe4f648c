"""Several LoRAs at once (`--lora PATH[:WEIGHT]`, `--lora_scale`): CFG equals diffusers' `set_adapters` with the
same weights; AG and WIG act on the subject LoRA only, the others keep their weight in every branch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from boothkit.families import load_family
from boothkit.guidance import rules
from boothkit.guidance.config import SampleConfig, parse_lora
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GuidedSampler, SamplerSettings, load_guidance_adapters
from test_sample import error_line
from test_sdxl import write_random_lora

PROMPTS = ["a photo of sks dog", "a sks dog in the snow"]
SUBJECT, STYLE = 0.8, 0.6  # weights of the subject LoRA and of the other ("style") LoRA


def write_style_lora(model: Path, out: Path, seed: int) -> Path:
    """A LoRA with random nonzero weights on the UNet and text encoder, α/r = 0.5 (so a weight is not α/r)."""
    return write_random_lora(model, out, seed, StableDiffusionPipeline, alpha=2, std=0.5, safety_checker=None,
                             requires_safety_checker=False)


@pytest.fixture(scope="module")
def style_lora(sd15, tmp_path_factory) -> Path:
    return write_style_lora(sd15, tmp_path_factory.mktemp("style") / "style", seed=5)


def sampler(model: Path, lora: Path | None, method: str, weight: float = 1.0,
            extras: tuple[tuple[Path, float], ...] = (), steps: int = 8, **scales) -> GuidedSampler:
    family = load_family(str(model))
    guidance = make_guidance(method, **scales)
    adapters = load_guidance_adapters(family, str(lora) if lora else None, None, guidance, lora_weight=weight,
                                      extras=[(str(path), w) for path, w in extras])
    return GuidedSampler(family, guidance, SamplerSettings(steps, 32, 32, "ddim", progress=False), adapters)


def reference(model: Path, loras: dict[str, tuple[Path, float]]) -> StableDiffusionPipeline:
    """A diffusers pipeline with each LoRA loaded as its own adapter, all active at their weights."""
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for name, (path, _) in loras.items():
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(list(loras), adapter_weights=[weight for _, weight in loras.values()])
    return pipe


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(generated.image, dtype=np.float64) / 255 for generated in images])


def pipeline_images(pipe: StableDiffusionPipeline, prompt: str, seed: int, scale: float, steps: int = 8,
                    count: int = 1) -> np.ndarray:
    return pipe(prompt, num_images_per_prompt=count, guidance_scale=scale, num_inference_steps=steps, height=32,
                width=32, generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(count)],
                output_type="np").images


def unet_output(pipe: StableDiffusionPipeline, latents, timestep, prompt: str) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt([prompt] * latents.shape[0], "cpu", 1, False)
    return pipe.unet(latents, timestep, encoder_hidden_states=embeds).sample


def test_cfg_with_two_loras_is_diffusers_set_adapters(sd15, sd15_lora, style_lora):
    ours = sampler(sd15, sd15_lora, "cfg", SUBJECT, ((style_lora, STYLE),), guidance_scale=6.0)
    got = ours.generate(PROMPTS, None, 2, seed=11)
    pipe = reference(sd15, {"a": (sd15_lora, SUBJECT), "b": (style_lora, STYLE)})
    expected = np.concatenate([pipeline_images(pipe, prompt, 11, 6.0, count=2) for prompt in PROMPTS])
    assert np.abs(pixels(got) - expected).max() <= 1.001 / 255
    # Neither weight is a no-op: without the style, or with the subject at 1, the images differ.
    pipe.set_adapters(["a", "b"], [SUBJECT, 0.0])
    assert np.abs(pipeline_images(pipe, PROMPTS[0], 11, 6.0) - expected[:1]).max() > 4 / 255
    pipe.set_adapters(["a", "b"], [1.0, STYLE])
    assert np.abs(pipeline_images(pipe, PROMPTS[0], 11, 6.0) - expected[:1]).max() > 4 / 255


@pytest.mark.parametrize("omega", [0.0, 0.3])
def test_wig_interpolates_the_subject_only(sd15, sd15_lora, style_lora, omega):
    """ε(x,∅;θ_ω) + λ·[ε(x,c;θ_ft) − ε(x,∅;θ_ω)] with θ_ft = subject at its weight + style, θ_ω = subject at
    ω·weight + style at its weight: each branch built by hand as a diffusers pipeline."""
    ours = sampler(sd15, sd15_lora, "wig", SUBJECT, ((style_lora, STYLE),), guidance_scale=3.0, omega=omega)
    latents, timestep = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    guided = ours.denoise(latents, timestep, ours.conditioning([PROMPTS[0]] * 2, None))
    pipe = reference(sd15, {"a": (sd15_lora, SUBJECT), "b": (style_lora, STYLE)})
    fine_cond = unet_output(pipe, latents, timestep, PROMPTS[0])
    pipe.set_adapters(["a", "b"], [omega * SUBJECT, STYLE])
    weak_uncond = unet_output(pipe, latents, timestep, "")
    torch.testing.assert_close(guided, rules.cfg(weak_uncond, fine_cond, 3.0), rtol=1e-4, atol=1e-5)
    pipe.set_adapters(["a", "b"], [omega * SUBJECT, 0.0])  # the style does reach the weak branch
    assert (unet_output(pipe, latents, timestep, "") - weak_uncond).abs().max() > 1e-3


def test_ag_swaps_the_subject_for_its_weak_lora(sd15, sd15_lora, style_lora):
    ours = sampler(sd15, sd15_lora, "ag", SUBJECT, ((style_lora, STYLE),), guidance_scale=2.5, cfg_scale=4.0)
    latents, timestep = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor(300)
    guided = ours.denoise(latents, timestep, ours.conditioning([PROMPTS[0]] * 2, None))
    fine = reference(sd15, {"a": (sd15_lora, SUBJECT), "b": (style_lora, STYLE)})
    weak = reference(sd15, {"a": (sd15_lora / "weak", SUBJECT), "b": (style_lora, STYLE)})
    expected = rules.cfg_autoguidance(
        unet_output(fine, latents, timestep, ""), unet_output(fine, latents, timestep, PROMPTS[0]),
        unet_output(weak, latents, timestep, ""), unet_output(weak, latents, timestep, PROMPTS[0]), 4.0, 2.5)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)


def test_wig_at_omega_one_is_cfg_and_a_zero_weight_style_is_no_style(sd15, sd15_lora, style_lora):
    both = ((style_lora, STYLE),)
    cfg = pixels(sampler(sd15, sd15_lora, "cfg", SUBJECT, both, guidance_scale=5.0).generate(PROMPTS, None, 1, 0))
    wig = pixels(sampler(sd15, sd15_lora, "wig", SUBJECT, both, guidance_scale=5.0, omega=1.0)
                 .generate(PROMPTS, None, 1, 0))
    assert np.array_equal(wig, cfg)
    alone = sampler(sd15, sd15_lora, "wig", SUBJECT, guidance_scale=5.0, omega=0.4).generate(PROMPTS, None, 1, 0)
    muted = sampler(sd15, sd15_lora, "wig", SUBJECT, ((style_lora, 0.0),), guidance_scale=5.0, omega=0.4)
    assert np.abs(pixels(muted.generate(PROMPTS, None, 1, 0)) - pixels(alone)).max() <= 1.001 / 255


# The command ------------------------------------------------------------------------------------------

def sample_args(model, out, *extra):
    return ["sample", "--pretrained_model_name_or_path", model, "--output_dir", out, "--num_inference_steps", 4,
            "--height", 32, "--width", 32, "--prompt", PROMPTS[0], "--seed", 3, *extra]


def test_sample_command_stacks_loras(sd15, sd15_lora, style_lora, tmp_path, run_cli):
    """`--lora A:0.8 --lora B:0.6`: the image is diffusers' with both adapters at these weights, and
    samples.json lists them, the subject first; `--lora_dir A --lora_scale 0.8 --lora B:0.6` is the same."""
    first = tmp_path / "first"
    result = run_cli(*sample_args(sd15, first, "--lora", f"{sd15_lora}:{SUBJECT}", "--lora", f"{style_lora}:{STYLE}",
                                  "--guidance_scale", 6))
    assert result.code == 0, result.err
    record = json.loads((first / "samples.json").read_text())[0]
    assert record["loras"] == [{"path": str(sd15_lora), "weight": SUBJECT}, {"path": str(style_lora), "weight": STYLE}]
    image = np.asarray(Image.open(next(first.glob("*.png"))), dtype=np.float64) / 255
    pipe = reference(sd15, {"a": (sd15_lora, SUBJECT), "b": (style_lora, STYLE)})
    assert np.abs(image - pipeline_images(pipe, PROMPTS[0], 3, 6.0, steps=4)[0]).max() <= 1.001 / 255
    second = tmp_path / "second"
    result = run_cli(*sample_args(sd15, second, "--lora_dir", sd15_lora, "--lora_scale", SUBJECT,
                                  "--lora", f"{style_lora}:{STYLE}", "--guidance_scale", 6))
    assert result.code == 0, result.err
    assert json.loads((second / "samples.json").read_text())[0]["loras"] == record["loras"]
    assert np.array_equal(np.asarray(Image.open(next(second.glob("*.png")))), np.asarray(Image.open(
        next(first.glob("*.png")))))


def test_ag_uses_the_subjects_weak_lora(sd15, sd15_lora, style_lora, tmp_path, run_cli):
    out = tmp_path / "o"
    result = run_cli(*sample_args(sd15, out, "--lora", sd15_lora, "--lora", f"{style_lora}:-0.5", "--method", "ag"))
    assert result.code == 0, result.err
    record = json.loads((out / "samples.json").read_text())[0]
    assert record["weak_lora"] == str(sd15_lora / "weak")
    assert record["loras"] == [{"path": str(sd15_lora), "weight": 1.0}, {"path": str(style_lora), "weight": -0.5}]


def test_lora_flag_errors(sd15, sd15_lora, tmp_path, run_cli):
    def line(*extra):
        return error_line(run_cli(*sample_args(sd15, tmp_path / "o", *extra)))

    assert f"'{tmp_path / 'nowhere'}'" in line("--lora", f"{tmp_path / 'nowhere'}:0.5")
    assert "pytorch_lora_weights.safetensors" in line("--lora_dir", sd15_lora, "--lora", tmp_path / "nowhere")
    assert "not a number" in line("--lora", f"{sd15_lora}:abc")
    for bad in ("nan", "inf", "-inf", "1e400"):
        assert "finite" in line("--lora", f"{sd15_lora}:{bad}")
    assert "give one" in line("--lora", f"{sd15_lora}:0.5", "--lora_scale", 0.7)
    assert "--lora_dir or --lora" in line("--lora_scale", 0.7)
    assert not list(tmp_path.glob("o/*.png"))


def test_parse_lora(tmp_path):
    assert parse_lora("a/b") == ("a/b", 1.0)
    assert parse_lora("a/b:0.25") == ("a/b", 0.25)
    assert parse_lora("a/b:-1") == ("a/b", -1.0)  # a negative LoRA is legitimate
    assert parse_lora("run:2/lora:0.5") == ("run:2/lora", 0.5)
    assert parse_lora("run:2/lora") == ("run:2/lora", 1.0)  # the tail is no number: all of it is the path
    folder = tmp_path / "style:2"  # an existing path is never split
    folder.mkdir()
    assert parse_lora(str(folder)) == (str(folder), 1.0)
    assert parse_lora(f"{folder}:0.5") == (str(folder), 0.5)
    config = SampleConfig(pretrained_model_name_or_path="m", prompt=["x"], output_dir="o", lora=["a:0.5", "b"])
    assert config.lora_stack() == [("a", 0.5), ("b", 1.0)]
    config = SampleConfig(pretrained_model_name_or_path="m", prompt=["x"], output_dir="o", lora=["a"], lora_scale=-0.3)
    assert config.lora_stack() == [("a", -0.3)]
    config = SampleConfig(pretrained_model_name_or_path="m", prompt=["x"], output_dir="o", lora_dir="s", lora=["a"])
    assert config.lora_stack() == [("s", 1.0), ("a", 1.0)]
