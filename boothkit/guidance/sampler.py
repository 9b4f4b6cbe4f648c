"""One guided sampler for every rule and every family.

Per step, the branches a rule needs (prompt/empty × fine/weak/interpolated weights) are stacked into one
batch and the denoiser runs once: each row gets its own LoRA scales (`adapters.per_sample_scales`). As in
edm2 and diffusers' list-of-generators convention, image i of a prompt starts from
`Generator("cpu").manual_seed(seed + i)`, so an image never depends on the batch it was drawn in.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from boothkit import layout
from boothkit.errors import BoothkitError
from boothkit.families.base import Conditioning, ModelFamily
from boothkit.guidance.adapters import FINE, WEAK, existing_lora_file, load_adapter, model_scales, per_sample_scales
from boothkit.guidance.full_model import WeightVariants
from boothkit.guidance.rules import Branch, Guidance
from boothkit.guidance.schedulers import make_scheduler


EXTRA = "extra_"
"""Adapter names of the LoRAs beside the subject's: `extra_0`, `extra_1`, ... (never FINE or WEAK)."""

SAMPLING_VERSION = 3
"""Version of the sampling code: bump it when a change alters the images of the same settings (evaluation
caches are keyed on it). 2: `flow_euler` takes the model's flow shift. 3: SDXL encodes an explicit empty negative
prompt (only no negative prompt gives the zeros of `force_zeros_for_empty_prompt`)."""


@dataclass(frozen=True)
class SamplerSettings:
    num_inference_steps: int
    height: int
    width: int
    scheduler: str
    batch_size: int = 4  # images per denoising batch (each image brings one row per branch)
    batched_branches: bool = True  # False: evaluate the branches one by one (reference and benchmark)
    progress: bool = True


@dataclass
class GeneratedImage:
    prompt: str
    prompt_index: int
    image_index: int
    seed: int
    image: Image.Image


def load_guidance_adapters(family: ModelFamily, lora_dir: str | None, weak_dir: str | None, guidance: Guidance,
                           lora_weight: float = 1.0, extras: Sequence[tuple[str, float]] = (),
                           full_model: bool = False) -> list[str]:
    """Load the fine (subject) LoRA, the weak one when the rule needs it, and the `extras` (path, weight) as
    resident, active adapters. Guidance acts on the subject only: fine and weak are active at `lora_weight`, and
    the sampler's per-row factors (fine at 1, ω or 0; weak at 1 or 0) multiply that weight, as peft keeps
    weight·α/r in each layer's scaling. The extras (`EXTRA` + index) keep their weight in every branch.
    `full_model`: the rule acts on a fully fine-tuned model's weights (`full_model.WeightVariants`), no LoRA."""
    if lora_dir is None and guidance.method in ("ag", "wig") and not full_model:
        # Without a LoRA, θ_ω = θ_ft = θ_pre: WIG would silently be CFG, and AG would have no fine model.
        raise BoothkitError(f"--method {guidance.method} guides a personalized model: pass --lora_dir (or --lora)")
    names = []
    if lora_dir is not None:
        load_adapter(family, lora_dir, FINE, "LoRA folder")
        names.append(FINE)
    if guidance.needs_weak and not full_model:
        weak_dir = weak_dir or str(layout.weak_dir(lora_dir))
        try:
            existing_lora_file(weak_dir, "weak checkpoint")
        except BoothkitError as error:
            raise BoothkitError(f"--method ag needs a weak checkpoint: {error} (train with --weak_checkpoint_step, "
                                "or pass --weak_checkpoint_path)") from None
        load_adapter(family, weak_dir, WEAK, "weak checkpoint")
        names.append(WEAK)
    weights = [lora_weight] * len(names)  # the weak LoRA stands in for the subject, at the subject's weight
    for index, (path, weight) in enumerate(extras):
        load_adapter(family, path, f"{EXTRA}{index}", "LoRA")
        names.append(f"{EXTRA}{index}")
        weights.append(weight)
    if names:
        family.pipeline.set_adapters(names, adapter_weights=weights)  # `activate`, at these weights
    return names


class SamplingStopped(Exception):
    """The caller asked the sampler to stop (`GuidedSampler.iterate`'s `stop` event)."""


class GuidedSampler:
    def __init__(self, family: ModelFamily, guidance: Guidance, settings: SamplerSettings, adapters: list[str],
                 variants: WeightVariants | None = None):
        """`variants`: a fully fine-tuned model's weak and interpolated weights (`full_model`), instead of LoRAs."""
        self.family = family
        self.guidance = guidance
        self.settings = settings
        self.adapters = adapters
        self.variants = variants
        self.device = family.denoiser.device
        self.dtype = family.denoiser.dtype

    def generate(self, prompts: list[str], negative_prompt: str | None, num_images_per_prompt: int,
                 seed: int) -> list[GeneratedImage]:
        """`num_images_per_prompt` images of each prompt; image i of a prompt uses seed + i."""
        return list(self.iterate(prompts, negative_prompt, num_images_per_prompt, seed))

    @torch.no_grad()
    def iterate(self, prompts: list[str], negative_prompt: str | None, num_images_per_prompt: int,
                seed: int, stop: threading.Event | None = None) -> Iterator[GeneratedImage]:
        """As `generate`, yielding each image as soon as its batch is decoded (callers save it at once). When
        `stop` is set (from another thread: the page's Stop button) the batch in progress is dropped at its next
        step and no image follows; the images yielded before stay valid."""
        conditioning = self.conditioning(prompts, negative_prompt)
        items = [(p, i) for p in range(len(prompts)) for i in range(num_images_per_prompt)]
        chunks = [items[start:start + self.settings.batch_size] for start in range(0, len(items), self.settings.batch_size)]
        done = 0
        with tqdm(total=len(chunks) * self.settings.num_inference_steps, desc="sampling", unit="step",
                  disable=not self.settings.progress) as bar:
            for chunk in chunks:
                rows = [p for p, _ in chunk]
                generators = [torch.Generator("cpu").manual_seed(seed + i) for _, i in chunk]
                try:
                    images = self.sample({b: c.index(rows) for b, c in conditioning.items()}, generators, bar, stop)
                except SamplingStopped:
                    return
                done += len(images)
                bar.set_postfix(images=done)
                for (p, i), image in zip(chunk, images):
                    yield GeneratedImage(prompts[p], p, i, seed + i, image)

    def conditioning(self, prompts: list[str], negative_prompt: str | None) -> dict[Branch, Conditioning]:
        """Each branch's prompt embeddings (one row per prompt), through that branch's text-encoder LoRA. Without a
        negative prompt the unconditional rows get None, which each family encodes as its pipeline encodes
        `negative_prompt=None` (SD, SANA: the empty prompt; SDXL: zeros with `force_zeros_for_empty_prompt`);
        an explicit "" is encoded."""
        result = {}
        for branch in self.guidance.branches:
            texts = list(prompts) if branch.prompt == "cond" else [negative_prompt] * len(prompts)
            with per_sample_scales(self.family.text_encoders, self.row_scales((branch,), len(texts))), \
                    self.weights_of(branch.model):
                result[branch] = self.family.encode_prompts(texts, self.device, negative=branch.prompt == "uncond")
        return result

    def weights_of(self, model: str):
        """For a fully fine-tuned model, the block computes with `model`'s weights (fine, weak or interp)."""
        if self.variants is None:
            return contextlib.nullcontext()
        scales = model_scales(model, self.guidance.omega or 0.0)
        return self.variants.apply(scales.get(FINE, 0.0), scales.get(WEAK, 0.0))

    def row_scales(self, branches: tuple[Branch, ...], rows: int) -> dict[str, torch.Tensor]:
        """Per adapter, the LoRA scale of every row of a branch-major batch."""
        scales = {}
        for adapter in (name for name in self.adapters if name in (FINE, WEAK)):  # extras: their weight everywhere
            values = [model_scales(branch.model, self.guidance.omega or 0.0).get(adapter, 0.0) for branch in branches]
            scales[adapter] = torch.tensor(values, device=self.device, dtype=self.dtype).repeat_interleave(rows)
        return scales

    def sample(self, conditioning: dict[Branch, Conditioning], generators: list[torch.Generator],
               bar: tqdm | None = None, stop: threading.Event | None = None) -> list[Image.Image]:
        """Run the scheduler from each generator's noise to images (`SamplingStopped` once `stop` is set)."""
        settings, family = self.settings, self.family
        scheduler = make_scheduler(settings.scheduler, family.pipeline.scheduler.config)
        scheduler.set_timesteps(settings.num_inference_steps, device=self.device)
        noise = [family.initial_noise(g, settings.height, settings.width, self.dtype, self.device) for g in generators]
        latents = torch.cat(noise) * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generators)
        for timestep in scheduler.timesteps:
            if stop is not None and stop.is_set():
                raise SamplingStopped
            model_input = scheduler.scale_model_input(latents, timestep)
            guided = self.denoise(model_input, timestep, conditioning)
            latents = scheduler.step(guided, timestep, latents, **step_kwargs, return_dict=False)[0]
            if bar is not None:
                bar.update(1)
        return family.decode(latents)

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor,
                conditioning: dict[Branch, Conditioning]) -> torch.Tensor:
        """The guided model output: every branch in one forward call (or, for reference, one call each)."""
        branches, rows = self.guidance.branches, latents.shape[0]
        denoiser = [self.family.denoiser]
        if self.variants is not None:  # one weight per call: each model's branches batched together
            outputs = {}
            for model in dict.fromkeys(branch.model for branch in branches):
                group = [branch for branch in branches if branch.model == model]
                for part in [group] if self.settings.batched_branches else [[branch] for branch in group]:
                    with self.weights_of(model):
                        stacked = self.family.predict(torch.cat([latents] * len(part)), timestep,
                                                      Conditioning.cat([conditioning[b] for b in part]))
                    outputs.update(zip(part, stacked.chunk(len(part))))
        elif self.settings.batched_branches:
            with per_sample_scales(denoiser, self.row_scales(branches, rows)):
                stacked = self.family.predict(torch.cat([latents] * len(branches)), timestep,
                                              Conditioning.cat([conditioning[b] for b in branches]))
            outputs = dict(zip(branches, stacked.chunk(len(branches))))
        else:
            outputs = {}
            for branch in branches:
                with per_sample_scales(denoiser, self.row_scales((branch,), rows)):
                    outputs[branch] = self.family.predict(latents, timestep, conditioning[branch])
        return self.guidance.combine(outputs)


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    """What diffusers pipelines pass to `scheduler.step`: eta = 0 (DDIM) and the per-image generators."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs
