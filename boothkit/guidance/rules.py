"""Guidance rules for personalized diffusion models: small pure functions over model outputs.

Notation (docs/guidance.md): ε(x, c; θ) is the model output — noise for SD, v or flow for other families;
every rule is linear in the outputs, so it applies unchanged. c is the prompt embedding, ∅ the empty
(or negative) prompt embedding, θ_pre the base model, θ_ft = base + LoRA at scale 1, θ_weak = base + weak
LoRA, θ_ω = (1−ω)·θ_pre + ω·θ_ft, which for a LoRA is exactly the LoRA at scale ω.

A `Guidance` names the branches (prompt × model) a rule needs; the sampler evaluates all of them in one
batched forward call and hands the outputs to `combine`, which ends with the guidance rescale φ
(`rescale_guidance`, Lin et al. 2024) of every rule's output against the fine model's conditional output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from boothkit.guidance.config import METHODS

Method = Literal["cfg", "ag", "wig", "none"]


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022; the seed's Eq. 5): ε(x,∅) + λ·[ε(x,c) − ε(x,∅)]."""
    return uncond + scale * (cond - uncond)


def autoguidance(weak: torch.Tensor, fine: torch.Tensor, scale: float) -> torch.Tensor:
    """Autoguidance (Karras et al. 2024, Eq. 1; the seed's Eq. 6): D_weak + λ·[D_fine − D_weak]."""
    return weak + scale * (fine - weak)


def cfg_autoguidance(fine_uncond: torch.Tensor, fine_cond: torch.Tensor, weak_uncond: torch.Tensor,
                     weak_cond: torch.Tensor, cfg_scale: float, scale: float) -> torch.Tensor:
    """CFG + AG (the seed's Eq. 6 applied to CFG outputs): CFG_weak + λ·[CFG_ft − CFG_weak], where
    CFG_θ = ε(x,∅;θ) + s·[ε(x,c;θ) − ε(x,∅;θ)]. λ = 1 is plain CFG(s) of the fine model."""
    return autoguidance(cfg(weak_uncond, weak_cond, cfg_scale), cfg(fine_uncond, fine_cond, cfg_scale), scale)


def weight_interpolation_guidance(interp_uncond: torch.Tensor, fine_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Weight-interpolation guidance (personalization guidance, Park et al. 2025; the seed's Eqs. 7 & 9):
    ε(x,∅;θ_ω) + λ·[ε(x,c;θ_ft) − ε(x,∅;θ_ω)]. ω = 1 is CFG; ω = 0 guides away from the base model."""
    return interp_uncond + scale * (fine_cond - interp_uncond)


def rescale_guidance(guided: torch.Tensor, reference: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Sec. 3.4, Eqs. 15–16): x_rescaled = x_guided · σ(x_ref) / σ(x_guided) (Eq. 15), then
    x_final = φ · x_rescaled + (1 − φ) · x_guided (Eq. 16), with σ the standard deviation of each sample over all
    its non-batch dimensions and x_ref the conditional output (CFG: ε(x,c); AG and WIG: ε(x,c;θ_ft)).

    It counters the over-exposure of a large guidance scale. φ = 0 is no rescale: `guided` is returned as it is
    (so is diffusers' `guidance_rescale=0.0`)."""
    if rescale == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1.0 - rescale) * guided


@dataclass(frozen=True)
class Branch:
    """One model output a rule needs: which prompt ("cond" or "uncond") through which weights."""

    prompt: Literal["cond", "uncond"]
    model: Literal["fine", "weak", "interp"]


FINE_COND, FINE_UNCOND = Branch("cond", "fine"), Branch("uncond", "fine")
WEAK_COND, WEAK_UNCOND = Branch("cond", "weak"), Branch("uncond", "weak")
INTERP_UNCOND = Branch("uncond", "interp")


@dataclass(frozen=True)
class Guidance:
    """A rule with its settings: the branches it needs and how their outputs combine."""

    method: Method
    branches: tuple[Branch, ...]
    combine: Callable[[dict[Branch, torch.Tensor]], torch.Tensor]
    guidance_scale: float
    cfg_scale: float | None = None
    omega: float | None = None
    guidance_rescale: float = 0.0  # φ of `rescale_guidance`, already applied by `combine`

    @property
    def needs_weak(self) -> bool:
        return any(branch.model == "weak" for branch in self.branches)


AG_DEFAULT_SCALE = 2.0
"""λ of CFG + AutoGuidance when none is given: λ scales the difference between two CFG outputs, so its useful
range is about 1–3 (Karras et al. 2024 report 2–3 for their models; the seed and our demo use 2.0)."""


def default_guidance_scale(method: Method, family_default: float) -> float:
    """λ when `--guidance_scale` is not given: the family's CFG scale for cfg and wig (WIG with ω = 1 *is* CFG,
    so the same λ is its natural starting point), `AG_DEFAULT_SCALE` for ag; `none` does not use λ."""
    return AG_DEFAULT_SCALE if method == "ag" else family_default


def make_guidance(method: Method, guidance_scale: float, cfg_scale: float = 7.5, omega: float = 1.0,
                  guidance_rescale: float = 0.0) -> Guidance:
    """The `Guidance` for `--method`, with λ = guidance_scale, s = cfg_scale (ag), ω = omega (wig) and the
    rescale φ = guidance_rescale applied to its output (`rescale_guidance`, reference: the fine model's
    conditional branch)."""
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    settings: dict[str, float] = {}
    if method == "cfg":
        branches = (FINE_UNCOND, FINE_COND)

        def rule(out):
            return cfg(out[FINE_UNCOND], out[FINE_COND], guidance_scale)
    elif method == "ag":
        branches, settings = (FINE_UNCOND, FINE_COND, WEAK_UNCOND, WEAK_COND), {"cfg_scale": cfg_scale}

        def rule(out):
            return cfg_autoguidance(out[FINE_UNCOND], out[FINE_COND], out[WEAK_UNCOND], out[WEAK_COND],
                                    cfg_scale, guidance_scale)
    elif method == "wig":
        if not 0.0 <= omega <= 1.0:
            raise ValueError(f"omega must lie in [0, 1], got {omega}")
        branches, settings = (INTERP_UNCOND, FINE_COND), {"omega": omega}

        def rule(out):
            return weight_interpolation_guidance(out[INTERP_UNCOND], out[FINE_COND], guidance_scale)
    elif method == "none":
        branches = (FINE_COND,)

        def rule(out):
            return out[FINE_COND]
    else:
        raise ValueError(f"unknown guidance method {method!r}; choose from {', '.join(METHODS)}")

    def combine(out: dict[Branch, torch.Tensor]) -> torch.Tensor:
        return rescale_guidance(rule(out), out[FINE_COND], guidance_rescale)

    return Guidance(method, branches, combine, guidance_scale, guidance_rescale=guidance_rescale, **settings)
