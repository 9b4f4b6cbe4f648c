"""Full DreamBooth fine-tuning (`--train_mode full`, issue 12): a pipeline folder diffusers loads, exact resume
after kill -9, EMA by its equation, the weak checkpoint holding only the trained modules, and optimizer state
kept in the latest checkpoint only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from test_train import assert_one_line_error, kill_9_and_resume, train_args

UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"
FULL = ("--train_mode", "full", "--learning_rate", 1e-3)


def test_a_full_run_is_a_pipeline_diffusers_loads(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "full"
    result = run_cli(*train_args(sd15, instance_dir, out, *FULL, "--train_text_encoder", "--max_train_steps", 4,
                                 "--weak_checkpoint_step", 2, "--checkpointing_steps", 100))
    assert result.code == 0, result.err
    assert f"model (diffusers pipeline folder): {out}" in result.out
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    base = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "text_encoder"):  # trained: every weight can move
        trained, original = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        moved = [key for key in original if not torch.equal(trained[key], original[key])]
        assert len(moved) > len(original) // 2, name
        assert all(value.dtype == torch.float32 for value in trained.values())
    for key, value in base.vae.state_dict().items():  # the VAE as the base stores it
        assert torch.equal(pipe.vae.state_dict()[key], value)
    assert not getattr(pipe.unet, "peft_config", None)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    # weak/: only what training changed, as the module folders diffusers and transformers load
    assert sorted(p.name for p in (out / "weak").iterdir()) == ["text_encoder", "unet"]
    assert (out / "weak" / UNET).is_file() and not (out / "weak" / "vae").exists()
    weak, final = load_file(out / "weak" / UNET), load_file(out / UNET)
    assert any(not torch.equal(weak[key], final[key]) for key in final)
    assert json.loads((out / "train_config.json").read_text())["config"]["learning_rate"] == 1e-3


def test_full_run_resumes_bit_identically_after_kill_9(sd15, instance_dir, tmp_path, run_cli):
    flags = (*FULL, "--max_train_steps", 40, "--checkpointing_steps", 10, "--weak_checkpoint_step", 15,
             "--use_ema", "--ema_decay", 0.9)
    kill_9_and_resume(sd15, instance_dir, tmp_path, run_cli, flags, first_checkpoint=10, last_step=40,
                      files=(UNET, "weak/" + UNET))


def ema_decay(update: int, decay: float) -> float:
    """diffusers' `EMAModel` decay at its n-th update (n from 1): 0 at the first (the average starts at the
    trained weights), then min(decay, (1 + t)/(10 + t)) with t = n − 1."""
    t = update - 1
    return 0.0 if t <= 0 else min(decay, (1 + t) / (10 + t))


def test_ema_follows_its_equation_and_is_what_is_saved(sd15, instance_dir, tmp_path, run_cli):
    out, raw = tmp_path / "ema", tmp_path / "raw"
    steps = 4
    common = (*FULL, "--max_train_steps", steps, "--checkpointing_steps", 1, "--weak_checkpoint_step", 0)
    assert run_cli(*train_args(sd15, instance_dir, out, *common, "--use_ema", "--ema_decay", 0.7)).code == 0
    assert run_cli(*train_args(sd15, instance_dir, raw, *common)).code == 0
    # θ_ema,t = d_t·θ_ema,t−1 + (1 − d_t)·θ_t, checked on the checkpoints of every step
    base = load_file(Path(sd15) / UNET)
    names = [key for key in load_file(out / "checkpoint-1" / "trainable.safetensors")]
    average = [base[name.removeprefix("unet.")] for name in names]
    for step in range(1, steps):
        trained = load_file(out / f"checkpoint-{step}" / "trainable.safetensors")
        d = ema_decay(step, 0.7)
        average = [d * a + (1 - d) * trained[name] for a, name in zip(average, names)]
        shadows = load_file(out / f"checkpoint-{step}" / "ema.safetensors")
        assert all(torch.allclose(shadows[name], a, atol=1e-6) for name, a in zip(names, average))
    assert any(not torch.allclose(shadows[name], trained[name]) for name in names)  # the average lags behind
    saved, raw_saved = load_file(out / UNET), load_file(raw / UNET)
    raw_last = {name.removeprefix("unet."): value for name, value in
                load_file(raw / f"checkpoint-{steps - 1}" / "trainable.safetensors").items()}
    trained_last = load_file(out / f"checkpoint-{steps - 1}" / "trainable.safetensors")
    assert all(torch.equal(trained_last[f"unet.{k}"], v) for k, v in raw_last.items())  # EMA changes no training step
    assert any(not torch.equal(saved[key], raw_saved[key]) for key in saved)  # the average is saved, not the raw


def test_only_the_latest_checkpoint_keeps_the_optimizer_state(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    flags = (*FULL, "--max_train_steps", 7, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2)
    assert run_cli(*train_args(sd15, instance_dir, out, *flags)).code == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not (out / "checkpoint-4" / "optimizer.pt").exists() and (out / "checkpoint-6" / "optimizer.pt").is_file()
    assert (out / "checkpoint-4" / "trainable.safetensors").is_file()
    result = run_cli(*train_args(sd15, instance_dir, out, *flags, "--resume_from_checkpoint", "checkpoint-4"))
    assert_one_line_error(result, "keeps the weights only", "latest")
    assert run_cli(*train_args(sd15, instance_dir, out, *flags, "--resume_from_checkpoint", "latest")).code == 0


def test_full_mode_options_are_checked(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "o"
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, out, "--train_mode", "full", "--rank", 8)),
                          "--rank applies to --train_mode lora")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, out, "--use_ema")), "--use_ema applies to")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, out, "--train_mode", "full", "--use_8bit_adam")),
                          "--use_8bit_adam needs a GPU")
    user = tmp_path / "mine"
    (user / "unet").mkdir(parents=True)
    (user / "unet" / "notes.txt").write_text("mine")
    result = run_cli(*train_args(sd15, instance_dir, user, *FULL, "--max_train_steps", 1, "--overwrite"))
    assert_one_line_error(result, "unet/notes.txt", "boothkit did not write it")
    assert (user / "unet" / "notes.txt").read_text() == "mine"


def test_a_bf16_run_saves_the_frozen_components_as_the_base_stores_them(sd15, instance_dir, tmp_path, run_cli):
    """Frozen modules held in bf16 for the run are saved from their source (not rounded); the trained UNet in its
    float32 master weights."""
    out = tmp_path / "bf16"
    assert run_cli(*train_args(sd15, instance_dir, out, *FULL, "--max_train_steps", 2,
                               "--mixed_precision", "bf16")).code == 0
    for component, file in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        saved, base = load_file(out / component / file), load_file(Path(sd15) / component / file)
        assert saved.keys() == base.keys() and all(torch.equal(saved[key], base[key]) for key in base), component
    assert {value.dtype for value in load_file(out / UNET).values()} == {torch.float32}
