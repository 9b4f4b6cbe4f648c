"""`--snr_gamma`: min-SNR-γ weighting (Hang et al. 2023) of the instance loss of DDPM families."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from boothkit.data.images import sample_subject_dir
from boothkit.families.sd import StableDiffusionFamily
from boothkit.train.losses import min_snr_weights, snr

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def diffusers_example_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """The weighting of diffusers' training examples (text-to-image, DreamBooth-LoRA SDXL), copied as written."""
    snr_values = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr_values, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr_values
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr_values + 1)
    return mse_loss_weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [5.0, 1.0, 20.0])
def test_weights_equal_diffusers(prediction_type, gamma):
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    timesteps = torch.arange(1000)
    torch.testing.assert_close(snr(scheduler.alphas_cumprod, timesteps), compute_snr(scheduler, timesteps),
                               rtol=1e-5, atol=0)
    snr_values = snr(scheduler.alphas_cumprod, timesteps)
    assert (snr_values > gamma).any() and (snr_values < gamma).any()  # timesteps on both sides of γ
    ours = min_snr_weights(snr_values, gamma, prediction_type)
    torch.testing.assert_close(ours, diffusers_example_weights(scheduler, timesteps, gamma), rtol=1e-5, atol=0)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(torch.ones(2), 5.0, "sample")


def train_args(model: Path, out: Path, *extra) -> list:
    return ["train", "--pretrained_model_name_or_path", model, "--instance_data_dir", sample_subject_dir(),
            "--instance_prompt", "a photo of sks dog", "--output_dir", out, "--max_train_steps", 2,
            "--resolution", 32, *extra]


def logged_losses(out: Path) -> list[float]:
    with open(out / "train_log.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


@pytest.fixture
def snr_calls(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(timesteps, SNR) of each call of the SD family's `timestep_snr` during a training."""
    calls = []
    original = StableDiffusionFamily.timestep_snr

    def recording(self, timesteps):
        values = original(self, timesteps)
        calls.append((timesteps.clone(), values.clone()))
        return values

    monkeypatch.setattr(StableDiffusionFamily, "timestep_snr", recording)
    return calls


@pytest.mark.parametrize("kind, seed", [("sd15", 9), ("sd21", 9)])
def test_snr_gamma_weights_the_first_step_loss(kind, seed, tiny_models, tmp_path, run_cli, snr_calls):
    """Step 1 starts from the same weights and draws as the unweighted run, so its logged loss is the
    unweighted one times min(SNR, γ)/SNR (ε) or min(SNR, γ)/(SNR + 1) (v) of the drawn timestep."""
    model = tiny_models[kind]
    plain, weighted = tmp_path / "plain", tmp_path / "weighted"
    assert run_cli(*train_args(model, plain, "--seed", seed)).code == 0
    assert not snr_calls
    result = run_cli(*train_args(model, weighted, "--seed", seed, "--snr_gamma", 5))
    assert result.code == 0, result.err
    timesteps, snr_values = snr_calls[0]
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    expected_weight = diffusers_example_weights(scheduler, timesteps, 5.0).item()
    assert expected_weight < 0.99  # the seed draws a timestep whose weight is not 1
    plain_losses, weighted_losses = logged_losses(plain), logged_losses(weighted)
    assert weighted_losses != plain_losses
    assert weighted_losses[0] == pytest.approx(plain_losses[0] * expected_weight, rel=1e-5)


def test_prior_preservation_loss_is_not_weighted(sd15, tmp_path, run_cli, snr_calls):
    """With prior preservation, only the instance rows' timesteps are weighted (the class rows keep 1)."""
    class_dir = tmp_path / "class"
    args = ("--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir", class_dir,
            "--num_class_images", 2, "--train_batch_size", 2, "--snr_gamma", 5)
    assert run_cli(*train_args(sd15, tmp_path / "out", *args)).code == 0
    assert [len(timesteps) for timesteps, _ in snr_calls] == [2, 2]  # 2 instance rows of 4 per step


def test_snr_gamma_must_be_positive(sd15, tmp_path, run_cli):
    result = run_cli(*train_args(sd15, tmp_path / "out", "--snr_gamma", 0))
    assert result.code == 2 and "snr_gamma" in result.err


def test_flow_matching_refuses_snr_gamma(sana, tmp_path, run_cli):
    out = tmp_path / "out"
    result = run_cli(*train_args(sana, out, "--snr_gamma", 5))
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        "error: --snr_gamma applies to DDPM models (SD); sana trains with flow matching: use --weighting_scheme"]
    assert not out.exists()
