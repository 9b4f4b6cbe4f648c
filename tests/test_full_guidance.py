"""Guidance on a fully fine-tuned model (issue 12): WIG's θ_ω = θ_pre + ω·(θ_ft − θ_pre) and AG's weak model are
weights, checked against diffusers pipelines holding those weights; ω = 1 is CFG; the fine weights are left
as they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from boothkit.families import load_family
from boothkit.guidance.full_model import load_weight_variants
from boothkit.guidance import rules
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GuidedSampler, SamplerSettings
from test_sample import PROMPTS, pixels, unet_output
from test_train import assert_one_line_error, train_args


@pytest.fixture(scope="module")
def full_model(sd15, tmp_path_factory) -> Path:
    """A fully fine-tuned tiny SD 1.5 (UNet and text encoder), with its weak checkpoint."""
    from boothkit.cli import main
    from boothkit.data.images import sample_subject_dir

    out = tmp_path_factory.mktemp("full") / "model"
    args = train_args(sd15, sample_subject_dir(), out, "--train_mode", "full", "--train_text_encoder",
                      "--learning_rate", 1e-3, "--max_train_steps", 6, "--weak_checkpoint_step", 2)
    assert main([str(arg) for arg in args]) == 0
    return out


def full_sampler(model: Path, method: str, base: Path | None = None, batched: bool = True, **scales):
    family = load_family(str(model))
    guidance = make_guidance(method, **scales)
    variants = load_weight_variants(family, str(base) if base else None, None, method == "wig", guidance.needs_weak) \
        if method in ("wig", "ag") else None
    settings = SamplerSettings(8, 32, 32, "ddim", batch_size=4, batched_branches=batched, progress=False)
    return GuidedSampler(family, guidance, settings, [], variants)


def pipeline(model: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def interpolated(base: Path, fine: Path, omega: float) -> StableDiffusionPipeline:
    """A pipeline whose UNet and text encoder hold θ_pre + ω·(θ_ft − θ_pre), computed tensor by tensor."""
    pipe, tuned = pipeline(base), pipeline(fine)
    for name in ("unet", "text_encoder"):
        theirs = getattr(tuned, name).state_dict()
        mixed = {key: value + omega * (theirs[key] - value) for key, value in getattr(pipe, name).state_dict().items()}
        getattr(pipe, name).load_state_dict(mixed)
    return pipe


@pytest.mark.parametrize("omega", [0.0, 0.3])
def test_wig_on_a_full_model_interpolates_its_weights(sd15, full_model, omega):
    ours = full_sampler(full_model, "wig", base=sd15, guidance_scale=3.0, omega=omega)
    fine_before = {k: v.clone() for k, v in ours.family.denoiser.state_dict().items()}
    latents, timestep = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    guided = ours.denoise(latents, timestep, ours.conditioning([PROMPTS[0]] * 2, None))
    cond = unet_output(pipeline(full_model), latents, timestep, PROMPTS[0])
    uncond = unet_output(interpolated(sd15, full_model, omega), latents, timestep, "")
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert all(torch.equal(v, fine_before[k]) for k, v in ours.family.denoiser.state_dict().items())  # θ_ft kept


def test_wig_at_omega_one_is_cfg_and_the_branches_may_run_one_by_one(sd15, full_model):
    cfg = pixels(full_sampler(full_model, "cfg", guidance_scale=5.0).generate(PROMPTS, None, 2, seed=1))
    wig = pixels(full_sampler(full_model, "wig", base=sd15, guidance_scale=5.0, omega=1.0).generate(PROMPTS, None, 2, seed=1))
    assert np.abs(wig - cfg).max() <= 1.001 / 255
    half = full_sampler(full_model, "wig", base=sd15, guidance_scale=5.0, omega=0.5)
    batched = pixels(half.generate(PROMPTS, None, 2, seed=1))
    one_by_one = pixels(full_sampler(full_model, "wig", base=sd15, batched=False, guidance_scale=5.0,
                                     omega=0.5).generate(PROMPTS, None, 2, seed=1))
    assert np.abs(batched - one_by_one).max() <= 1.001 / 255 and np.abs(batched - cfg).max() > 2 / 255


def test_ag_on_a_full_model_uses_its_weak_checkpoint(sd15, full_model):
    ours = full_sampler(full_model, "ag", guidance_scale=2.5, cfg_scale=4.0)
    latents, timestep = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor(300)
    guided = ours.denoise(latents, timestep, ours.conditioning([PROMPTS[0]] * 2, None))
    fine = pipeline(full_model)
    weak = pipeline(full_model)
    weak.unet = UNet2DConditionModel.from_pretrained(full_model / "weak" / "unet")
    weak.text_encoder = type(weak.text_encoder).from_pretrained(full_model / "weak" / "text_encoder")
    outputs = [unet_output(model, latents, timestep, p) for model in (fine, weak) for p in ("", PROMPTS[0])]
    torch.testing.assert_close(guided, rules.cfg_autoguidance(*outputs, 4.0, 2.5), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs[1], outputs[3], atol=1e-4)  # the weak model is another model


def test_sample_command_on_a_full_model(sd15, full_model, tmp_path, run_cli):
    out = tmp_path / "images"
    result = run_cli("sample", "--pretrained_model_name_or_path", str(full_model), "--method", "wig", "--base_model",
                     str(sd15), "--omega", "0.3", "--prompt", PROMPTS[0], "--output_dir", str(out),
                     "--num_inference_steps", "2")
    assert result.code == 0, result.err
    record = json.loads((out / "samples.json").read_text())[0]
    assert record["base_model"] == str(sd15) and record["method"] == "wig"
    result = run_cli("sample", "--pretrained_model_name_or_path", str(full_model), "--method", "wig",
                     "--prompt", PROMPTS[0], "--output_dir", str(tmp_path / "b"), "--num_inference_steps", "2")
    assert_one_line_error(result, "--base_model")
    result = run_cli("sample", "--pretrained_model_name_or_path", str(sd15), "--method", "ag",
                     "--prompt", PROMPTS[0], "--output_dir", str(tmp_path / "c"), "--num_inference_steps", "2")
    assert_one_line_error(result, "weak")
    result = run_cli("sample", "--pretrained_model_name_or_path", str(full_model), "--method", "ag",
                     "--prompt", PROMPTS[0], "--output_dir", str(tmp_path / "d"), "--num_inference_steps", "2")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "d" / "samples.json").read_text())[0]["weak_lora"] == str(full_model / "weak")


def test_evaluate_scores_a_full_model_with_each_method(sd15, full_model, tmp_path, run_cli, monkeypatch):
    """A subject folder that is a fully fine-tuned model (next to LoRA subjects) evaluates with cfg, ag (its
    weak/ modules) and wig (towards --pretrained_model_name_or_path); a changed model is never answered from
    the cache."""
    import shutil

    from boothkit.data.images import sample_subject_dir
    from boothkit.testing.tiny import build_tiny
    from test_evaluate import PROMPTS as EVAL_PROMPTS
    from test_evaluate import read_summary

    instance, models = tmp_path / "instance", tmp_path / "models"
    shutil.copytree(sample_subject_dir(), instance / "dog2")
    shutil.copytree(full_model, models / "dog2", ignore=shutil.ignore_patterns("checkpoint-*", "validation"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(EVAL_PROMPTS))
    scorers = {kind: build_tiny(kind, tmp_path / kind, seed=0) for kind in ("dino", "clip")}

    def evaluate(method: str, out: Path, *extra: str):
        result = run_cli("evaluate", "--pretrained_model_name_or_path", str(sd15), "--lora_base_dir", str(models),
                         "--instance_data_dir", str(instance), "--evaluation_prompts_path", str(prompts),
                         "--output_dir", str(out), "--dino_model", str(scorers["dino"]), "--clip_model",
                         str(scorers["clip"]), "--num_inference_steps", "2", "--max_prompts", "1", "--method", method,
                         "--max_evaluations", "2", *extra)
        assert result.code == 0, result.err
        return result

    for method, extra in (("cfg", ()), ("ag", ()), ("wig", ("--omega_grid", "0", "1"))):
        evaluate(method, tmp_path / f"eval-{method}", *extra)
        rows = read_summary(tmp_path / f"eval-{method}")
        assert rows and all(float(row["DINO"]) == float(row["DINO"]) for row in rows), method  # finite scores
    from boothkit.evaluate.runner import Evaluator

    sampled: list[str] = []
    sample = Evaluator.sample
    monkeypatch.setattr(Evaluator, "sample", lambda self, subject, setting: sampled.append(subject.folder)
                        or sample(self, subject, setting))
    evaluate("cfg", tmp_path / "eval-cfg")
    assert sampled == []  # the same model: answered from the cache
    weights = models / "dog2" / "unet" / "diffusion_pytorch_model.safetensors"  # change the model: no cache hit
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    save_file({key: value * 1.01 if key.endswith("conv_in.weight") else value for key, value in state.items()}, weights)
    evaluate("cfg", tmp_path / "eval-cfg")
    assert sampled == ["dog2"]
