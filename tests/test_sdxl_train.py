"""SDXL DreamBooth-LoRA training: each sample's own micro-conditioning, LoRA on both text encoders with their own
learning rate, prior preservation, another VAE, exact resume after kill -9, and LoRAs diffusers loads."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from boothkit.data.images import resized_size, sample_subject_dir, to_tensor
from boothkit.evaluate.score import ScoreConfig, run_score
from boothkit.families import load_family
from boothkit.families.sdxl import StableDiffusionXLFamily
from boothkit.train import data as train_data
from boothkit.train.config import TrainConfig
from boothkit.train.data import ImageOptions, LatentBank
from boothkit.train.trainer import train
from test_evaluate import PROMPTS, evaluate_args, read_summary, scorers  # noqa: F401 (scorers: a fixture)
from test_sdxl import sdxl  # noqa: F401 (the tiny SDXL: a fixture)
from test_train import PROMPT, assert_one_line_error, kill_9_and_resume, read_log, train_args

# Photos of several shapes, so that crops have room to move and time ids differ from photo to photo.
SIZES = [(128, 96), (96, 128), (128, 80), (112, 128), (128, 128)]
RESOLUTION = 32


@pytest.fixture
def odd_photos(tmp_path) -> Path:
    """The sample subject's photos resized to `SIZES` (width, height)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path, size in zip(sorted(sample_subject_dir().iterdir()), SIZES):
        Image.open(path).convert("RGB").resize(size).save(folder / f"{path.stem}.png")
    return folder


@pytest.fixture
def class_photos(tmp_path) -> Path:
    """Two class images of a size no instance photo has (72 × 120)."""
    folder = tmp_path / "class"
    folder.mkdir()
    for index in range(2):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (120, 72, 3), dtype=np.uint8)).save(
            folder / f"class_{index:05d}.png")
    return folder


# Micro-conditioning ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("center_crop", [False, True])
def test_geometry_is_where_the_pixels_came_from(center_crop):
    """The recorded (original size, crop top-left) reproduces the training pixels from the photo: resize, mirror
    when flipped (the diffusers example flips before it crops), crop at the recorded corner."""
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8))
              for i, (w, h) in enumerate(SIZES)]
    bank = LatentBank(None, images, ImageOptions(RESOLUTION, center_crop, True, cache_latents=False), "instance", 0)
    generator = torch.Generator().manual_seed(0)
    lefts = set()
    for index, image in enumerate(images):
        for flip in (False, True):
            for _ in range(3):
                offset = tuple(torch.rand(2, generator=generator).tolist())
                geometry = bank.geometry(index, flip, offset)
                assert geometry.original_size == (image.height, image.width)
                resized = image.resize(resized_size(image.size, RESOLUTION), Image.Resampling.BILINEAR, reducing_gap=None)
                if flip:
                    resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                top, left = geometry.crop_top_left
                expected = to_tensor(resized.crop((left, top, left + RESOLUTION, top + RESOLUTION)))
                assert torch.equal(bank._pixels(index, flip, offset), expected)
                lefts.add((index, left))
    assert len(lefts) > len(images) + 2 or center_crop  # random crops move (the test would pass on a fixed crop)


def test_each_training_sample_gets_its_own_time_ids(sdxl, odd_photos, class_photos, tmp_path, monkeypatch):
    """Every row of every micro-batch — instance and class rows alike — is conditioned on the time ids of the
    very sample it holds (the diffusers example gives class rows their batch's instance time ids)."""
    drawn, seen = [], []
    original_draw, original_predict = LatentBank.draw, StableDiffusionXLFamily.predict

    def recording_draw(self, index, seed, position):
        latents, geometry = original_draw(self, index, seed, position)
        drawn.append([*geometry.original_size, *geometry.crop_top_left, RESOLUTION, RESOLUTION])
        return latents, geometry

    def recording_predict(self, latents, timesteps, conditioning, denoiser=None):
        seen.append(conditioning.tensors["time_ids"].tolist())
        return original_predict(self, latents, timesteps, conditioning, denoiser)

    monkeypatch.setattr(train_data.LatentBank, "draw", recording_draw)
    monkeypatch.setattr(StableDiffusionXLFamily, "predict", recording_predict)
    train(TrainConfig(pretrained_model_name_or_path=str(sdxl), instance_data_dir=str(odd_photos),
                      instance_prompt=PROMPT, output_dir=str(tmp_path / "out"), max_train_steps=6,
                      train_batch_size=2, resolution=RESOLUTION, random_flip=True, with_prior_preservation=True,
                      class_prompt="a photo of dog", class_data_dir=str(class_photos), num_class_images=2))
    assert len(seen) == 6 and all(len(rows) == 4 for rows in seen)
    assert [row for rows in seen for row in rows] == drawn
    instance_rows = [row for rows in seen for row in rows[:2]]
    class_rows = [row for rows in seen for row in rows[2:]]
    assert {tuple(row[:2]) for row in instance_rows} <= {(h, w) for w, h in SIZES}
    assert {tuple(row[:2]) for row in class_rows} == {(120, 72)}
    assert len({tuple(row[2:4]) for row in instance_rows}) > 2  # crops are drawn per sample, not once per photo


# Both text encoders ---------------------------------------------------------------------------------------------

def test_lora_on_both_text_encoders_loads_in_diffusers(sdxl, odd_photos, tmp_path, run_cli):
    """Batch 2, prior preservation with generated class images, validation, both text encoders (gradient
    checkpointing in all three modules): the file holds the UNet's and both text encoders' LoRA, each trained at
    its own learning rate, and the SDXL pipeline loads all of it."""
    out = tmp_path / "out"
    result = run_cli(*train_args(sdxl, odd_photos, out, "--resolution", 32, "--max_train_steps", 4,
                                 "--train_batch_size", 2, "--train_text_encoder", "--learning_rate", "1e-2",
                                 "--gradient_checkpointing", "--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir",
                                 tmp_path / "class", "--num_class_images", 2, "--checkpointing_steps", 2,
                                 "--validation_prompt", "a sks dog", "--num_validation_images", 1))
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == ["class_00000.png", "class_00001.png"]
    assert (out / "validation" / "step-000004_0.png").is_file()
    tensors = load_file(out / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert [group["lr"] for group in optimizer["param_groups"]] == [1e-2, 5e-6, 5e-6]

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    before = pipe.encode_prompt("a sks dog", device="cpu", do_classifier_free_guidance=False)
    pipe.load_lora_weights(out, adapter_name="trained")
    loaded = sum(len(get_peft_model_state_dict(getattr(pipe, name), adapter_name="trained"))
                 for name in ("unet", "text_encoder", "text_encoder_2"))
    assert loaded == len(tensors)
    after = pipe.encode_prompt("a sks dog", device="cpu", do_classifier_free_guidance=False)
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[2], after[2])  # both encoders learnt


def test_text_encoder_lr_flag_and_sd_default(sd15, sdxl, instance_dir, tmp_path, run_cli):
    """--text_encoder_lr sets both SDXL text encoders' rate; SD's default is --learning_rate (one rate, as the
    diffusers SD example)."""
    runs = {"sdxl": (sdxl, ["--text_encoder_lr", "3e-3"], [1e-4, 3e-3, 3e-3]), "sd": (sd15, [], [1e-4, 1e-4])}
    for name, (model, flags, expected) in runs.items():
        out = tmp_path / name
        result = run_cli(*train_args(model, instance_dir, out, "--resolution", 32, "--max_train_steps", 3,
                                     "--checkpointing_steps", 2, "--train_text_encoder", *flags))
        assert result.code == 0, result.err
        optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
        assert [group["lr"] for group in optimizer["param_groups"]] == expected


# Resume ---------------------------------------------------------------------------------------------------------

RESUME = ("--resolution", RESOLUTION, "--max_train_steps", 20, "--checkpointing_steps", 5, "--train_batch_size", 2,
          "--random_flip", "--train_text_encoder", "--lr_scheduler", "cosine", "--no_cache_latents",
          "--snr_gamma", 5)


def test_resume_after_kill_9_is_bit_identical(sdxl, odd_photos, tmp_path, run_cli):
    lora = kill_9_and_resume(sdxl, odd_photos, tmp_path, run_cli, RESUME, first_checkpoint=5, last_step=20)
    assert any(key.startswith("text_encoder_2.") for key in lora)


# Another VAE ----------------------------------------------------------------------------------------------------

@pytest.fixture
def other_vae(sdxl, tmp_path) -> Path:
    """The tiny SDXL's VAE with other weights, saved as a VAE folder (config.json at the top, as
    madebyollin/sdxl-vae-fp16-fix)."""
    vae = AutoencoderKL.from_pretrained(sdxl, subfolder="vae")
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.mul_(1.5)
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_another_vae_replaces_the_models(sdxl, other_vae, instance_dir, tmp_path, run_cli):
    family = load_family(str(sdxl), vae=str(other_vae))
    expected = AutoencoderKL.from_pretrained(other_vae).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in family.vae.state_dict().items())
    flags = ("--resolution", 32, "--max_train_steps", 4, "--checkpointing_steps", 2)
    base, other = tmp_path / "base", tmp_path / "other"
    assert run_cli(*train_args(sdxl, instance_dir, base, *flags)).code == 0
    assert run_cli(*train_args(sdxl, instance_dir, other, *flags, "--pretrained_vae_model_name_or_path",
                               other_vae)).code == 0
    assert read_log(base)[0]["loss"] != read_log(other)[0]["loss"]  # other latents, another loss
    # A resume with another VAE is another run.
    assert_one_line_error(run_cli(*train_args(sdxl, instance_dir, other, *flags, "--max_train_steps", 6,
                                              "--resume_from_checkpoint", "latest")), "the VAE")
    assert_one_line_error(run_cli(*train_args(sdxl, instance_dir, tmp_path / "x", *flags,
                                              "--pretrained_vae_model_name_or_path", tmp_path / "nope")), "VAE")


def test_fp16_with_the_base_vae_is_warned_about(sdxl, caplog):
    family = load_family(str(sdxl))
    torch.nn.Module.to(family.vae, torch.float16)
    with caplog.at_level(logging.WARNING):
        family.warn_about_training_precision("fp16")
    assert "sdxl-vae-fp16-fix" in caplog.text
    caplog.clear()
    family.vae.register_to_config(force_upcast=False)  # what the fp16-fix VAE's config says
    family.warn_about_training_precision("fp16")
    torch.nn.Module.to(family.vae, torch.float32)
    family.warn_about_training_precision("no")
    assert caplog.text == ""


def test_encoding_inverts_decoding_with_latent_statistics(sdxl):
    """With `latents_mean`/`latents_std` in the VAE's config the pipeline decodes z·std/scale + mean; training
    latents must be the inverse, or the LoRA learns in another latent space than the one it samples in."""
    family = load_family(str(sdxl))
    family.vae.register_to_config(latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[2.0, 0.5, 1.5, 3.0])
    pixels = to_tensor(Image.open(sorted(sample_subject_dir().iterdir())[0]).convert("RGB").resize((32, 32)))[None]
    latents = family.encode_pixels(pixels).mean
    with torch.no_grad():
        raw = family.vae.encode(pixels).latent_dist.mean
        expected = family.vae.decode(raw).sample
        decoded = family.decode(latents)[0]
    reference = family.pipeline.image_processor.postprocess(expected, output_type="pil")[0]
    assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1


def test_an_fp16_vae_with_force_upcast_encodes_in_float32(sdxl):
    """The SDXL base VAE overflows in fp16: encoding runs it in float32 (as the diffusers example keeps it), then
    leaves it as it was."""
    family = load_family(str(sdxl))
    pixels = to_tensor(Image.open(sorted(sample_subject_dir().iterdir())[0]).convert("RGB").resize((32, 32)))[None]
    torch.nn.Module.to(family.vae, torch.float16)
    seen = []
    hook = family.vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    family.encode_pixels(pixels)
    hook.remove()
    assert seen == [torch.float32] and family.vae.dtype == torch.float16


# Evaluation -----------------------------------------------------------------------------------------------------

def test_evaluate_runs_on_a_trained_sdxl_lora(sdxl, scorers, tmp_path, run_cli):
    """The seed's evaluation layout with a LoRA boothkit trained on SDXL (both text encoders, a weak/): CFG with a
    λ search and CFG + AG, each scored, and the scores are those `score` gives the saved images."""
    lora = tmp_path / "loras" / "dog2"
    assert run_cli(*train_args(sdxl, sample_subject_dir(), lora, "--resolution", 32, "--max_train_steps", 4,
                               "--train_text_encoder", "--learning_rate", "1e-2")).code == 0
    instance = tmp_path / "instance" / "dog2"
    shutil.copytree(sample_subject_dir(), instance)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    layout = {"instance": instance.parent, "loras": lora.parent, "prompts": prompts, "out": tmp_path / "eval"}
    for method in ("cfg", "ag"):
        result = run_cli(*evaluate_args(sdxl, layout, scorers, "--method", method, "--optimize",
                                        "--max_evaluations", 2, "--height", 32, "--width", 32))
        assert result.code == 0, result.err
    rows = {row["method"]: row for row in read_summary(layout["out"])}
    assert set(rows) == {"cfg", "ag"} and all(row["subject"] == "dog2" for row in rows.values())
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(sorted((layout["out"] / "dog2" / "cfg").iterdir())[0], single)
    scores = run_score(ScoreConfig(images=str(single), references=str(instance), prompt="a sks dog in the jungle",
                                   dino_model=str(scorers["dino"]), clip_model=str(scorers["clip"])))
    assert scores["DINO"] == pytest.approx(float(rows["cfg"]["DINO"]), abs=1e-5)
