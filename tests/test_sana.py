"""SANA through the same commands: training (flow matching), resume, diffusers loading, guidance, evaluation."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from safetensors import safe_open
from safetensors.torch import load_file

from boothkit.cli import main as cli_main
from boothkit.data.images import sample_subject_dir
from boothkit.families import FamilyOptions, load_family
from boothkit.families.sana import SanaFamily
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GuidedSampler, SamplerSettings, load_guidance_adapters
from boothkit.testing.tiny import build_tiny

PROMPTS = ["a photo of sks dog", "a sks dog in the snow"]


def train_args(model, out, *extra):
    return ["train", "--pretrained_model_name_or_path", model, "--instance_data_dir", sample_subject_dir(),
            "--instance_prompt", "a photo of sks dog", "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def sana_lora(sana, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sana-lora") / "lora"
    assert cli_main([str(a) for a in train_args(sana, out, "--max_train_steps", 20, "--learning_rate", 1e-2,
                                                "--train_batch_size", 2, "--weak_checkpoint_step", 5)]) == 0
    return out


def test_training_writes_a_lora_sana_pipelines_load(sana, sana_lora):
    with safe_open(str(sana_lora / "pytorch_lora_weights.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith("transformer.") for key in keys)
    assert {part for key in keys for part in ("to_q", "to_k", "to_v", "to_out") if part in key} == \
        {"to_q", "to_k", "to_v", "to_out"}
    assert (sana_lora / "weak" / "pytorch_lora_weights.safetensors").is_file()
    saved = json.loads((sana_lora / "train_config.json").read_text())
    assert saved["resolved"]["family"] == "sana" and saved["config"]["complex_human_instruction"] is True

    def generate(lora):
        pipe = SanaPipeline.from_pretrained(sana)
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(lora)
        return pipe(PROMPTS[0], num_inference_steps=4, height=32, width=32, use_resolution_binning=False,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images

    assert np.abs(generate(sana_lora) - generate(None)).max() > 1e-3


SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_draws_timesteps_from_the_schemes_density(scheme, sana):
    """Timesteps, noisy latents and loss weights under each scheme follow diffusers' SD3 training utilities
    (the diffusers SANA DreamBooth script: u from the density, index ⌊u·T⌋, σ of that index)."""
    options = FamilyOptions(weighting_scheme=scheme, logit_mean=0.4, logit_std=0.7, mode_scale=0.8)
    family = load_family(str(sana), options=options)
    scheduler = family.noise_scheduler
    latents, noise = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)
    noisy, timesteps, target, weights = family.training_sample(
        latents, noise, [torch.Generator().manual_seed(seed) for seed in range(6)])
    u = torch.cat([compute_density_for_timestep_sampling(scheme, 1, 0.4, 0.7, 0.8,
                                                         generator=torch.Generator().manual_seed(seed))
                   for seed in range(6)])
    indices = (u * scheduler.config.num_train_timesteps).long()
    sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    assert torch.equal(timesteps, scheduler.timesteps[indices])
    torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(target, noise - latents)
    torch.testing.assert_close(weights, compute_loss_weighting_for_sd3(scheme, sigmas).flatten())


def test_weighting_scheme_reaches_training(sana, tmp_path, run_cli, monkeypatch):
    """`--weighting_scheme` and its parameters reach the family that draws the training timesteps, and
    each scheme trains differently (the same seed, photos and steps otherwise)."""
    seen = []
    original = SanaFamily.training_sample

    def spy(self, *args):
        seen.append(self.options)
        return original(self, *args)

    monkeypatch.setattr(SanaFamily, "training_sample", spy)
    losses = {}
    for scheme in SCHEMES:
        seen.clear()
        out = tmp_path / scheme
        result = run_cli(*train_args(sana, out, "--max_train_steps", 2, "--weighting_scheme", scheme,
                                     "--logit_mean", 0.4, "--logit_std", 0.7, "--mode_scale", 0.8,
                                     "--lora_layers", "to_q,to_v"))
        assert result.code == 0, result.err
        assert {(o.weighting_scheme, o.logit_mean, o.logit_std, o.mode_scale) for o in seen} == {
            (scheme, 0.4, 0.7, 0.8)}
        keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
        assert all(("to_q" in key or "to_v" in key) for key in keys)
        losses[scheme] = (out / "train_log.csv").read_text().splitlines()[1:]
    assert len({tuple(rows) for rows in losses.values()}) == len(SCHEMES), losses


def test_unknown_lora_layer_is_a_clear_error(sana, tmp_path, run_cli):
    result = run_cli(*train_args(sana, tmp_path / "o", "--lora_layers", "to_qq"))
    assert result.code == 2 and "to_qq" in result.err and "Traceback" not in result.err


def test_resume_is_bit_identical(sana, tmp_path, run_cli):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = ("--max_train_steps", 8, "--checkpointing_steps", 4, "--train_batch_size", 2)
    assert run_cli(*train_args(sana, whole, *args)).code == 0
    # As if stopped after step 4 (the folder as boothkit left it, without the final LoRA).
    shutil.copytree(whole, resumed)
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    result = run_cli(*train_args(sana, resumed, *args, "--resume_from_checkpoint", "latest"))
    assert result.code == 0, result.err
    expected, got = (load_file(d / "pytorch_lora_weights.safetensors") for d in (whole, resumed))
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def sampler(model, lora, method, **scales) -> GuidedSampler:
    family = load_family(str(model))
    guidance = make_guidance(method, **scales)
    adapters = load_guidance_adapters(family, str(lora), None, guidance)
    return GuidedSampler(family, guidance, SamplerSettings(6, 32, 32, "flow_dpm", batch_size=3, progress=False),
                         adapters)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(g.image, dtype=np.float64) / 255 for g in images])


def test_cfg_reproduces_sana_pipeline_and_identities_hold(sana, sana_lora):
    cfg = sampler(sana, sana_lora, "cfg", guidance_scale=4.5).generate(PROMPTS, None, 2, seed=3)
    pipe = SanaPipeline.from_pretrained(sana)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(sana_lora)
    for index, prompt in enumerate(PROMPTS):
        expected = pipe(prompt, num_images_per_prompt=2, guidance_scale=4.5, num_inference_steps=6, height=32,
                        width=32, use_resolution_binning=False, output_type="np",
                        generator=[torch.Generator("cpu").manual_seed(3 + i) for i in range(2)]).images
        assert np.abs(pixels([g for g in cfg if g.prompt_index == index]) - expected).max() <= 1.001 / 255
    wig = sampler(sana, sana_lora, "wig", guidance_scale=4.5, omega=1.0).generate(PROMPTS, None, 2, seed=3)
    ag = sampler(sana, sana_lora, "ag", guidance_scale=1.0, cfg_scale=4.5).generate(PROMPTS, None, 2, seed=3)
    assert np.array_equal(pixels(wig), pixels(cfg))
    assert np.abs(pixels(ag) - pixels(cfg)).max() <= 1.001 / 255


def test_sample_and_evaluate_commands_on_sana(sana, sana_lora, tmp_path, run_cli):
    result = run_cli("sample", "--pretrained_model_name_or_path", sana, "--lora_dir", sana_lora, "--method", "wig",
                     "--omega", 0.3, "--prompt", "a sks dog", "--num_inference_steps", 4, "--output_dir",
                     tmp_path / "samples")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "samples" / "samples.json").read_text())[0]["scheduler"] == "flow_dpm"
    instance, loras = tmp_path / "instance", tmp_path / "loras"
    shutil.copytree(sample_subject_dir(), instance / "dog")
    shutil.copytree(sana_lora, loras / "dog", ignore=shutil.ignore_patterns("checkpoint-*", "validation"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"subjects": ["dog"], "prompts": ["a <subject> in the jungle"]}))
    scorers = {kind: build_tiny(kind, tmp_path / kind) for kind in ("dino", "clip")}
    result = run_cli("evaluate", "--pretrained_model_path", sana, "--lora_base_dir", loras, "--instance_data_dir",
                     instance, "--evaluation_prompts_path", prompts, "--output_dir", tmp_path / "eval",
                     "--method", "ag", "--num_inference_steps", 4, "--dino_model", scorers["dino"],
                     "--clip_model", scorers["clip"], "--optimize", "--max_evaluations", 3)
    assert result.code == 0, result.err
    with open(tmp_path / "eval" / "evaluation_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["subject"], row["num_prompts"]) for row in rows] == [("dog", "1")]
    assert all(math.isfinite(float(rows[0][metric])) for metric in ("DINO", "CLIP-I", "CLIP-T"))


def test_sampling_embeds_prompts_as_the_lora_was_trained(sana, tmp_path, run_cli):
    """A LoRA trained without the complex human instruction is sampled without it, unless a flag says so."""
    from boothkit.guidance.adapters import text_options
    from boothkit.guidance.config import SampleConfig

    out = tmp_path / "plain"
    assert run_cli(*train_args(sana, out, "--max_train_steps", 2, "--no_complex_human_instruction",
                               "--max_sequence_length", 120)).code == 0
    base = {"pretrained_model_name_or_path": str(sana), "prompt": ["x"], "output_dir": str(tmp_path / "o")}
    assert text_options(SampleConfig(**base), out) == (120, False)
    assert text_options(SampleConfig(**base, complex_human_instruction=True), out) == (120, True)
    assert text_options(SampleConfig(**base), None) == (300, True)


def test_prediction_skips_the_prompt_padding_and_matches_the_padded_call(sana):
    """`SanaFamily.predict` drops trailing tokens every row masks out (300-token padding of short prompts): the
    transformer sees only up to the longest prompt, and its output is the full padded call's up to rounding."""
    family = load_family(str(sana))
    conditioning = family.encode_prompts(["a sks dog", "a photo of a sks dog on a red sofa in the snow"],
                                         torch.device("cpu"))
    hidden, mask = (conditioning.tensors[name] for name in ("encoder_hidden_states", "encoder_attention_mask"))
    longest = int(mask.nonzero()[:, 1].max()) + 1
    assert hidden.shape[1] == family.max_sequence_length > longest > int(mask[0].sum())
    seen = []
    handle = family.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    latents = torch.randn(2, family.denoiser.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trimmed = family.predict(latents, 500, conditioning)
        handle.remove()
        padded = family.denoiser(latents, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                                 timestep=torch.full((2,), 500.0) * family.denoiser.config.timestep_scale,
                                 return_dict=False)[0]
    assert seen == [longest]
    assert torch.allclose(trimmed, padded.float(), atol=1e-5, rtol=1e-5) and padded.abs().max() > 0.1
