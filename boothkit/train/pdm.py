"""PDMBooth's semantic regularization (the PDM term) for DDPM families (SD 1.x/2.x, SDXL).

PDMBooth (github.com/Orimalca/PDMBooth, 2025) adds to DreamBooth a term built on the PDM distance
of the diffusion-feature matching work it builds on: an image's features are the **self-attention queries** of
one UNet block (the paper's: `up_blocks.3.attentions.2.transformer_blocks.0.attn1` of SD 1.x) of the frozen
model along the **DDIM inversion** of the image (Song et al. 2021, DDIM, Sec. 4.3 run backwards), and the
fine-tuned model's queries at the same timestep are pulled toward them by their mean squared difference,
optionally inside the subject's mask.

What boothkit computes, per instance photo (center crop at the training resolution, its VAE posterior mean x0):
1. DDIM inversion under the class prompt with guidance 1 (as PDMBooth's `extract_pdm_fs`), `--pdm_inversion_steps`
   steps; at each step the denoiser sees (z_t, t) and the queries of the layer are recorded.
2. `--pdm_timesteps` K of those steps, evenly spaced, are kept: (t, z_t, queries) — the latents in float32, the
   queries in float16 — cached on disk keyed by content (photo bytes, model, prompt, layer, steps, resolution).
3. Each training row draws one of the K steps and feeds the trained model exactly that input (z_t, t, class
   prompt); the term is `losses.pdm_distance` of its queries to the cached ones.

Where this differs from PDMBooth's code, on purpose: the paper's training row is the photo freshly noised at a
random t with the *instance* prompt, compared with queries of the DDIM *reconstruction* under the class prompt —
inputs that differ even before training, so the term starts at a constant it cannot remove. boothkit gives the
trained model the very input the targets were computed from: the term is exactly 0 for the untrained model and
measures only what fine-tuning changed. The inversion uses 50 steps by default instead of 999 (the paper notes
50 are enough for the features); only K of them are kept to bound the cache.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from boothkit.errors import BoothkitError
from boothkit.families.base import Conditioning, ModelFamily

log = logging.getLogger(__name__)


def default_pdm_layer(denoiser: torch.nn.Module) -> str:
    """The first transformer block's self-attention in the last attention of the last up block that has
    attention: SD 1.x/2.x `up_blocks.3.attentions.2.transformer_blocks.0.attn1` (PDMBooth's layer)."""
    for index in reversed(range(len(getattr(denoiser, "up_blocks", [])))):
        attentions = getattr(denoiser.up_blocks[index], "attentions", None)
        if attentions:
            return f"up_blocks.{index}.attentions.{len(attentions) - 1}.transformer_blocks.0.attn1"
    raise BoothkitError("--use_pdm needs a UNet with attention in its up blocks (SD 1.x/2.x, SDXL)")


def query_module(denoiser: torch.nn.Module, layer: str) -> torch.nn.Module:
    try:
        return denoiser.get_submodule(f"{layer}.to_q")
    except AttributeError:
        raise BoothkitError(f"--pdm_layer '{layer}' is no attention module of this model (it needs a .to_q); "
                            f"e.g. {default_pdm_layer(denoiser)}") from None


@contextlib.contextmanager
def captured_queries(module: torch.nn.Module):
    """Collect the outputs of `module` (the layer's `to_q`, LoRA included) while the block runs."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


@dataclass
class PdmTargets:
    """The kept steps of one photo's inversion: timesteps (K,), inputs z_t (K, C, h, w) float32, the frozen
    model's queries (K, tokens, dim) float16."""

    timesteps: torch.Tensor
    latents: torch.Tensor
    queries: torch.Tensor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"timesteps": self.timesteps.contiguous(), "latents": self.latents.contiguous(),
                "queries": self.queries.contiguous()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())


def kept_indices(steps: int, keep: int) -> list[int]:
    """`keep` of `steps` inversion steps, evenly spaced, the first and last included."""
    if keep == 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (keep - 1)) for i in range(keep)})


@torch.no_grad()
def invert(family: ModelFamily, x0: torch.Tensor, conditioning: Conditioning, layer: str, steps: int,
           keep: int) -> PdmTargets:
    """DDIM inversion of `x0` (1, C, h, w) with guidance 1, recording the queries of `layer` at the kept steps."""
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler.from_config(family.noise_scheduler.config)
    scheduler.set_timesteps(steps, device=x0.device)
    module = query_module(family.denoiser, layer)
    kept = set(kept_indices(len(scheduler.timesteps), keep))
    # Contiguous (NCHW) inputs, as the training rows are: CPU convolution kernels differ by memory format (a
    # channels-last VAE output gave queries one fp16 step apart), and the term must be 0 for the frozen model.
    latents, records = x0.float().contiguous(), []
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = latents.to(family.denoiser.dtype)
        with captured_queries(module) as queries:
            prediction = family.predict(model_input.contiguous(), timestep.reshape(1), conditioning)
        if index in kept:
            records.append((int(timestep), latents.clone(), queries[0][0].to(torch.float16)))
        latents = scheduler.step(prediction.float(), timestep, latents, return_dict=False)[0].contiguous()
    return PdmTargets(torch.tensor([r[0] for r in records]), torch.cat([r[1] for r in records]).cpu(),
                      torch.stack([r[2] for r in records]).cpu())


def cache_dir() -> Path:
    from boothkit.identity import cache_root

    return cache_root() / "pdm"


def load_or_invert(family: ModelFamily, key: str, compute) -> tuple[PdmTargets, bool]:
    """The targets cached under `key`, or `compute()`d and saved there (safetensors, atomically); (targets,
    whether they came from the cache). An unreadable cache file is computed again."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(path)
            return PdmTargets(tensors["timesteps"], tensors["latents"], tensors["queries"]), True
        except (OSError, SafetensorError, KeyError) as error:
            log.warning("PDM feature cache '%s' is unreadable (%s): computing it again", path, error)
    targets = compute()
    from boothkit.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as staging:
        save_file(targets.to_tensors(), str(staging))
    return targets, False


def report(targets: list[PdmTargets], computed: int, seconds: float) -> None:
    size = sum(t.nbytes for t in targets) / 2**20
    log.info("PDM features: %d photo(s), %d computed in %.1f s, %d from the cache; %.1f MiB in %s",
             len(targets), computed, seconds, len(targets) - computed, size, cache_dir())


def token_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (h, w) of a layer's token grid inside a latent of `latent_hw` (the UNet halves both sides per level)."""
    height, width = latent_hw
    for factor in (1, 2, 4, 8, 16):
        if (height // factor) * (width // factor) == tokens:
            return height // factor, width // factor
    raise BoothkitError(f"cannot place {tokens} tokens on a {height}x{width} latent grid")
