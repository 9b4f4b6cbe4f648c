"""Loss weighting of DDPM training: min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy", arXiv:2303.09556).

The paper weights the x0-loss of timestep t by w_t = min(SNR(t), γ) (Eq. 8), SNR(t) = α_t²/σ_t² = ᾱ_t/(1 − ᾱ_t).
The same objective written for the prediction the model makes (Sec. 3.4) divides that weight by what the
target's loss already carries: SNR(t) for ε-prediction, SNR(t) + 1 for v-prediction. γ = 5 is the paper's
recommendation. These are what diffusers' `training_utils.compute_snr` and its training examples compute
(older copies of the DreamBooth example used `min(SNR, γ)/SNR + 1` for v; the text-to-image and SDXL examples
use `/(SNR + 1)`, as the paper does).
"""

from __future__ import annotations

import torch


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) of each timestep (Hang et al. Sec. 3.4; α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)), float32,
    on the timesteps' device."""
    alphas_cumprod = alphas_cumprod.to(device=timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-γ: min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for
    v-prediction (Hang et al. Eq. 8 with Sec. 3.4's change of target)."""
    clamped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return clamped / snr_values
    if prediction_type == "v_prediction":
        return clamped / (snr_values + 1)
    raise ValueError(f"min-SNR weighting supports epsilon and v_prediction, not {prediction_type!r}")
