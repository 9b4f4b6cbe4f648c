"""Guided sampling: equalities with diffusers pipelines, the rules' identities, batching, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from boothkit.families import load_family
from boothkit.guidance import rules
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GuidedSampler, SamplerSettings, load_guidance_adapters

PROMPTS = ["a photo of sks dog", "a sks dog in the snow"]


def sampler(model: Path, lora: Path | None, method: str, batch_size: int = 4, batched: bool = True,
            steps: int = 8, **scales) -> GuidedSampler:
    family = load_family(str(model))
    guidance = make_guidance(method, **scales)
    adapters = load_guidance_adapters(family, str(lora) if lora else None, None, guidance)
    settings = SamplerSettings(steps, 32, 32, "ddim", batch_size=batch_size, batched_branches=batched, progress=False)
    return GuidedSampler(family, guidance, settings, adapters)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(generated.image, dtype=np.float64) / 255 for generated in images])


def reference_pipeline(model: Path, lora: Path | None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe


@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_cfg_reproduces_the_diffusers_pipeline(kind, tiny_models, sd15_lora, sd21_lora):
    model, lora = tiny_models[kind], {"sd15": sd15_lora, "sd21": sd21_lora}[kind]
    ours = sampler(model, lora, "cfg", batch_size=3, guidance_scale=6.0).generate(PROMPTS, None, 2, seed=11)
    pipe = reference_pipeline(model, lora)
    for prompt_index, prompt in enumerate(PROMPTS):
        expected = pipe(prompt, num_images_per_prompt=2, guidance_scale=6.0, num_inference_steps=8,
                        generator=[torch.Generator("cpu").manual_seed(11 + i) for i in range(2)],
                        output_type="np").images
        got = pixels([g for g in ours if g.prompt_index == prompt_index])
        assert np.abs(got - expected).max() <= 1.001 / 255


def test_negative_prompt_matches_the_pipeline(sd15, sd15_lora):
    ours = sampler(sd15, sd15_lora, "cfg", guidance_scale=4.0).generate(PROMPTS[:1], "blurry, cartoon", 1, seed=2)
    expected = reference_pipeline(sd15, sd15_lora)(
        PROMPTS[0], negative_prompt="blurry, cartoon", guidance_scale=4.0, num_inference_steps=8,
        generator=[torch.Generator("cpu").manual_seed(2)], output_type="np").images
    assert np.abs(pixels(ours) - expected).max() <= 1.001 / 255


def test_ag_with_lambda_one_is_cfg_and_wig_with_omega_one_is_cfg(sd15, sd15_lora):
    cfg = pixels(sampler(sd15, sd15_lora, "cfg", guidance_scale=5.0).generate(PROMPTS, None, 2, seed=0))
    ag = pixels(sampler(sd15, sd15_lora, "ag", guidance_scale=1.0, cfg_scale=5.0).generate(PROMPTS, None, 2, seed=0))
    wig = pixels(sampler(sd15, sd15_lora, "wig", guidance_scale=5.0, omega=1.0).generate(PROMPTS, None, 2, seed=0))
    assert np.abs(ag - cfg).max() <= 1.001 / 255
    assert np.array_equal(wig, cfg)
    # And the rules are not trivially equal: other settings change the images.
    ag2 = pixels(sampler(sd15, sd15_lora, "ag", guidance_scale=2.0, cfg_scale=5.0).generate(PROMPTS, None, 2, seed=0))
    wig0 = pixels(sampler(sd15, sd15_lora, "wig", guidance_scale=5.0, omega=0.0).generate(PROMPTS, None, 2, seed=0))
    assert np.abs(ag2 - cfg).max() > 2 / 255 and np.abs(wig0 - cfg).max() > 2 / 255


def unet_output(pipe: StableDiffusionPipeline, latents, timestep, prompt: str) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt([prompt] * latents.shape[0], "cpu", 1, False)
    return pipe.unet(latents, timestep, encoder_hidden_states=embeds).sample


@pytest.mark.parametrize("omega", [0.0, 0.3])
def test_wig_weak_branch_is_the_weight_interpolation(sd15, sd15_lora, omega):
    """ε(x,∅;θ_ω): ω = 0 is the base model (LoRA unloaded); otherwise diffusers' own LoRA scale ω."""
    ours = sampler(sd15, sd15_lora, "wig", guidance_scale=3.0, omega=omega)
    latents, timestep = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    guided = ours.denoise(latents, timestep, ours.conditioning(["a photo of sks dog"] * 2, None))
    fine = reference_pipeline(sd15, sd15_lora)
    fine_cond = unet_output(fine, latents, timestep, "a photo of sks dog")
    weak = reference_pipeline(sd15, sd15_lora)
    if omega == 0.0:
        weak.unload_lora_weights()
    else:
        weak.set_adapters(weak.get_active_adapters(), [omega])
    weak_uncond = unet_output(weak, latents, timestep, "")
    torch.testing.assert_close(guided, rules.cfg(weak_uncond, fine_cond, 3.0), rtol=1e-4, atol=1e-5)
    if omega > 0:  # interpolating weights is not interpolating outputs
        base = reference_pipeline(sd15, None)
        mixed = (1 - omega) * unet_output(base, latents, timestep, "") + omega * unet_output(fine, latents, timestep, "")
        assert (weak_uncond - mixed).abs().max() > 1e-4


def test_ag_branches_match_separate_fine_and_weak_pipelines(sd15, sd15_lora):
    ours = sampler(sd15, sd15_lora, "ag", guidance_scale=2.5, cfg_scale=4.0)
    latents, timestep = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor(300)
    guided = ours.denoise(latents, timestep, ours.conditioning(["a photo of sks dog"] * 2, None))
    fine, weak = reference_pipeline(sd15, sd15_lora), reference_pipeline(sd15, sd15_lora / "weak")
    expected = rules.cfg_autoguidance(
        unet_output(fine, latents, timestep, ""), unet_output(fine, latents, timestep, "a photo of sks dog"),
        unet_output(weak, latents, timestep, ""), unet_output(weak, latents, timestep, "a photo of sks dog"),
        4.0, 2.5)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,rows", [("ag", {"fine": 4, "weak": 4}), ("wig", {"fine": 4})])
def test_each_lora_runs_only_on_the_rows_that_use_it(sd15, sd15_lora, method, rows):
    """AG's batch of 2 latents (fine and weak, each uncond and cond: 8 rows) selects one LoRA per row: each runs
    on its own 4 rows only, not both on all 8 times 0 or 1. WIG's 4 rows scale the
    fine LoRA by 1 and ω: it runs on every row."""
    ours = sampler(sd15, sd15_lora, method, guidance_scale=2.5, cfg_scale=4.0, omega=0.5)
    seen = {}
    layer = next(m for m in ours.family.denoiser.modules() if isinstance(m, LoraLayer))
    hooks = [layer.lora_A[name].register_forward_hook(
        lambda module, args, out, name=name: seen.__setitem__(name, args[0].shape[0])) for name in layer.lora_A]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours.denoise(latents, torch.tensor(300), ours.conditioning(["a photo of sks dog"] * 2, None))
    for hook in hooks:
        hook.remove()
    assert seen == rows
    assert "forward" not in vars(layer)  # the routing ends with the call


@pytest.mark.parametrize("method,scales", [("cfg", {"guidance_scale": 5.0}),
                                           ("ag", {"guidance_scale": 2.0, "cfg_scale": 5.0}),
                                           ("wig", {"guidance_scale": 5.0, "omega": 0.4})])
def test_batched_branches_equal_branch_by_branch(sd15, sd15_lora, method, scales):
    batched = sampler(sd15, sd15_lora, method, **scales)
    one_by_one = sampler(sd15, sd15_lora, method, batched=False, **scales)
    latents, timestep = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor(700)
    conditioning = batched.conditioning(["a photo of sks dog", "a sks dog", "a dog"], "ugly")
    torch.testing.assert_close(batched.denoise(latents, timestep, conditioning),
                               one_by_one.denoise(latents, timestep, conditioning), rtol=1e-4, atol=1e-5)


def test_an_image_does_not_depend_on_its_batch(sd15, sd15_lora):
    alone = sampler(sd15, sd15_lora, "wig", batch_size=1, guidance_scale=4.0, omega=0.5)
    crowd = sampler(sd15, sd15_lora, "wig", batch_size=4, guidance_scale=4.0, omega=0.5)
    single = pixels(alone.generate([PROMPTS[1]], None, 1, seed=7))
    shared = crowd.generate([PROMPTS[0], PROMPTS[1]], None, 2, seed=7)
    assert shared[2].prompt == PROMPTS[1] and shared[2].seed == 7
    assert np.abs(pixels([shared[2]]) - single).max() <= 1.001 / 255


# The command ------------------------------------------------------------------------------------------

def sample_args(model, lora, out, *extra):
    return ["sample", "--pretrained_model_name_or_path", model, "--lora_dir", lora, "--output_dir", out,
            "--num_inference_steps", 4, *extra]


@pytest.mark.parametrize("method", ["cfg", "ag", "wig", "none"])
def test_sample_command_writes_images_and_metadata(method, sd15, sd15_lora, tmp_path, run_cli):
    out = tmp_path / "out"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# subject prompts\na sks dog on the beach\n\n")
    result = run_cli(*sample_args(sd15, sd15_lora, out, "--method", method, "--prompt", "a sks dog",
                                  "--prompts_file", prompts_file, "--num_images_per_prompt", 2, "--seed", 4,
                                  "--omega", 0.3, "--scheduler", "euler_a", "--batch_size", 3))
    assert result.code == 0, result.err
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["0000_a_sks_dog.png", "0001_a_sks_dog.png", "0002_a_sks_dog_on_the_beach.png",
                     "0003_a_sks_dog_on_the_beach.png"]
    records = json.loads((out / "samples.json").read_text())
    assert [r["seed"] for r in records] == [4, 5, 4, 5]
    assert {r["method"] for r in records} == {method}
    assert records[0]["scheduler"] == "euler_a" and records[0]["steps"] == 4
    assert (records[0]["omega"] == 0.3) == (method == "wig")
    assert (records[0]["weak_lora"] is not None) == (method == "ag")
    # each PNG carries its settings as A1111 writes them (its "PNG Info", ComfyUI and image browsers read them)
    lines = Image.open(out / names[2]).text["parameters"].splitlines()
    assert lines[0] == f"a sks dog on the beach <lora:{Path(sd15_lora).name}:1>" and len(lines) == 2
    fields = dict(part.split(": ", 1) for part in lines[1].split(", "))
    assert (fields["Steps"], fields["Sampler"], fields["Seed"], fields["Guidance"]) == ("4", "euler_a", "4", method)
    assert fields["Size"] == f"{records[2]['width']}x{records[2]['height']}" and fields["Model"] == Path(sd15).name
    assert ("WIG omega" in fields) == (method == "wig") and ("AG CFG scale" in fields) == (method == "ag")


def test_prompts_json_file(sd15, sd15_lora, tmp_path, run_cli):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a sks dog", "a sks dog in a bucket"]))
    assert run_cli(*sample_args(sd15, sd15_lora, tmp_path / "o", "--prompts_file", prompts)).code == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 2
    prompts.write_text("[\"unclosed")
    result = run_cli(*sample_args(sd15, sd15_lora, tmp_path / "o2", "--prompts_file", prompts))
    assert result.code == 2 and "malformed JSON" in result.err and "Traceback" not in result.err


def error_line(result) -> str:
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.err
    return lines[0]


def test_sample_errors(sd15, sd15_lora, tmp_path, run_cli):
    empty = tmp_path / "empty_lora"
    empty.mkdir()
    assert "pytorch_lora_weights.safetensors" in error_line(
        run_cli(*sample_args(sd15, empty, tmp_path / "o", "--prompt", "x")))
    no_weak = tmp_path / "no_weak"
    no_weak.mkdir()
    (no_weak / "pytorch_lora_weights.safetensors").write_bytes(
        (sd15_lora / "pytorch_lora_weights.safetensors").read_bytes())
    assert "weak" in error_line(run_cli(*sample_args(sd15, no_weak, tmp_path / "o", "--prompt", "x", "--method", "ag")))
    assert "--omega" in error_line(run_cli(*sample_args(sd15, sd15_lora, tmp_path / "o", "--prompt", "x",
                                                        "--method", "wig", "--omega", 1.5)))
    assert "unknown scheduler" in error_line(run_cli(*sample_args(sd15, sd15_lora, tmp_path / "o", "--prompt", "x",
                                                                  "--scheduler", "warp9")))
    assert "--prompt" in error_line(run_cli(*sample_args(sd15, sd15_lora, tmp_path / "o")))


@pytest.mark.parametrize("damage", ["shapes", "names"])
def test_a_lora_for_another_model_is_a_clear_error(damage, sd15, sd15_lora, tmp_path, run_cli):
    weights = load_file(sd15_lora / "pytorch_lora_weights.safetensors")
    if damage == "shapes":  # as if trained on a model with other widths
        foreign = {key: torch.zeros(value.shape[0] + 3, value.shape[-1] + 5) if value.ndim == 2 else value
                   for key, value in weights.items()}
    else:  # as if trained on another architecture
        foreign = {key.replace("down_blocks", "encoder_blocks").replace("text_encoder.encoder", "text_encoder.trunk"):
                   value for key, value in weights.items()}
    folder = tmp_path / "foreign"
    folder.mkdir()
    save_file(foreign, folder / "pytorch_lora_weights.safetensors")
    line = error_line(run_cli(*sample_args(sd15, folder, tmp_path / "o", "--prompt", "x")))
    assert "does not fit" in line


def test_guidance_scale_zero_is_kept(sd15, sd15_lora, tmp_path, run_cli):
    out = tmp_path / "o"
    assert run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "x", "--guidance_scale", 0)).code == 0
    assert json.loads((out / "samples.json").read_text())[0]["guidance_scale"] == 0.0
