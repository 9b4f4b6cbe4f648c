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


def mask_weights(mask: torch.Tensor, background_weight: float) -> torch.Tensor:
    """Per-element loss weights of a subject mask m ∈ [0, 1]: m + b·(1 − m) — 1 on the subject, b on the
    background (PDMBooth's `--mask_dm` is b = 0: the loss over the subject's pixels only)."""
    return mask + background_weight * (1.0 - mask)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample Σ w·v / Σ w over all but the first dimension (weights broadcast to `values`). All-ones
    weights give exactly the plain mean; all-zero weights give 0 with zero gradient (no NaN)."""
    weights = weights.expand_as(values).to(values.dtype)
    total = weights.flatten(1).sum(1)
    return (values * weights).flatten(1).sum(1) / total.clamp_min(torch.finfo(values.dtype).tiny)


def pdm_distance(features: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """PDMBooth's PDM term per sample: the mean squared difference of self-attention queries (B, tokens, dim)
    and their frozen-model targets, over the tokens inside the mask when `token_weights` (B, tokens) is given
    (PDMBooth `train_pdmbooth*.py`: `mse_loss(pred_Q, target_Q)[mask].mean()`). The features are compared at
    the targets' precision (the cache keeps fp16): the cast is exact for a model that has not changed, so the
    term is 0 before the first step, and its gradient is the identity."""
    squared = (features.to(targets.dtype).float() - targets.float()) ** 2
    if token_weights is None:
        return squared.flatten(1).mean(1)
    return weighted_mean(squared, token_weights[..., None])
