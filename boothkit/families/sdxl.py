"""Stable Diffusion XL (Podell et al. 2023): UNet with "text_time" micro-conditioning, two CLIP text encoders.

Prompt embedding (as `StableDiffusionXLPipeline.encode_prompt`): the penultimate hidden states of both text
encoders, concatenated along the feature axis; the pooled embedding is `text_encoder_2`'s projection output.
The UNet also takes the micro-conditioning `time_ids` = (original height, width, crop top, crop left, target
height, width) (Podell et al. 2023, Sec. 2.2); for sampling they are the pipeline's defaults for the image size,
for training each sample's own (`image_conditioning`: the photo's size and where it was cropped).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from boothkit.families.base import Conditioning, LatentDistribution, first_sight, warn_if_truncated
from boothkit.families.sd import StableDiffusionFamily

log = logging.getLogger(__name__)


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SD's DDPM training target, LoRA targets and options; SDXL's prompts, micro-conditioning and decoding."""

    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    # The scheduler class of stabilityai/stable-diffusion-xl-base-1.0 (EulerDiscreteScheduler), configured from
    # the model's own scheduler config by `make_scheduler`; the pipeline's defaults for steps and guidance.
    default_scheduler = "model"  # the model's own scheduler class, as the pipeline (Euler for the base model)
    default_inference_steps = 50
    default_guidance_scale = 5.0
    # The diffusers SDXL DreamBooth-LoRA example's default: the text encoders learn far slower than the UNet.
    default_text_encoder_lr = 5e-6

    @classmethod
    def load_kwargs(cls) -> dict:
        return {}  # SDXL pipelines have no safety checker

    def warn_about_training_precision(self, precision: str) -> None:
        super().warn_about_training_precision(precision)
        if precision == "fp16" and self.vae.dtype == torch.float16 and self.vae.config.force_upcast:
            log.warning("the VAE of this model overflows in fp16 (NaN latents, black images): boothkit runs it in "
                        "float32, which costs memory and time; --pretrained_vae_model_name_or_path "
                        "madebyollin/sdxl-vae-fp16-fix runs in fp16")

    @property
    def named_text_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.pipeline.text_encoder, "text_encoder_2": self.pipeline.text_encoder_2}

    # Prompts ---------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str | None], device: torch.device, negative: bool = False
                       ) -> Conditioning:
        """As `StableDiffusionXLPipeline.encode_prompt`. Negative prompts are tokenized and encoded as positive
        ones there (padded to 77 tokens, the same encoders), the empty string "" too. `None` (no negative prompt:
        the pipeline's `negative_prompt=None`) gives zero embeddings and zero pooled embeddings when the model's
        `force_zeros_for_empty_prompt` is set, else the encoded "" (the pipeline zeroes only for None)."""
        texts = ["" if prompt is None else prompt for prompt in prompts]
        self.warn_long_prompts(texts, negative)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if self.pipeline.config.force_zeros_for_empty_prompt:
            absent = torch.tensor([prompt is None for prompt in prompts], device=embeds.device)
            embeds = torch.where(absent.view(-1, 1, 1), torch.zeros_like(embeds), embeds)
            pooled = torch.where(absent.view(-1, 1), torch.zeros_like(pooled), pooled)
        return Conditioning({"encoder_hidden_states": embeds, "text_embeds": pooled})

    def warn_long_prompts(self, prompts: list[str], negative: bool = False) -> None:
        """Counted as `StableDiffusionXLPipeline.encode_prompt` counts before it truncates, for each tokenizer:
        BOS + the prompt's tokens + EOS against its `model_max_length` (77 for both, BOS and EOS included)."""
        tokenizers = (self.pipeline.tokenizer, self.pipeline.tokenizer_2)
        limit = min(tokenizer.model_max_length for tokenizer in tokenizers)
        for prompt in prompts:
            if first_sight((self.name, limit, prompt)):
                warn_if_truncated(prompt, max(len(tokenizer(prompt).input_ids) for tokenizer in tokenizers), limit)

    # Denoising and training ------------------------------------------------------------------------------------
    def time_ids(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(orig h, orig w, crop top, crop left, target h, target w) per row: `_get_add_time_ids` with the
        pipeline's defaults for an image the size of `latents` (original = target = that size, no crop)."""
        height, width = (size * self.vae_scale_factor for size in latents.shape[-2:])
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=latents.device)
        return ids.repeat(latents.shape[0], 1)

    def image_conditioning(self, geometries, resolution, device):
        """Each training sample's `time_ids`: its photo's (height, width), its crop's (top, left) and the
        (resolution, resolution) target, as the diffusers SDXL DreamBooth example's `compute_time_ids` — but
        for every sample as drawn (that example crops each photo once for the whole run, and gives class images
        the time ids of the instance images they are batched with)."""
        ids = [[*g.original_size, *g.crop_top_left, resolution, resolution] for g in geometries]
        return {"time_ids": torch.tensor(ids, dtype=torch.float32, device=device)}

    def predict(self, latents, timesteps, conditioning, denoiser=None):
        denoiser = denoiser if denoiser is not None else self.denoiser
        embeds = conditioning.tensors["encoder_hidden_states"]
        time_ids = conditioning.tensors.get("time_ids")
        time_ids = self.time_ids(latents, embeds.dtype) if time_ids is None else time_ids.to(embeds.dtype)
        added = {"text_embeds": conditioning.tensors["text_embeds"], "time_ids": time_ids}
        return denoiser(latents, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added,
                        return_dict=False)[0]

    # Images ----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _vae_in_float32_if_needed(self) -> Iterator[torch.nn.Module]:
        """The VAE, in float32 while in use when it is fp16 with `force_upcast` (the SDXL base VAE overflows in
        fp16: NaN latents and black images), as the pipeline decodes and the diffusers example encodes."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        # torch's `Module.to`, not diffusers' `ModelMixin.to`: that one warns on every dtype cast of a VAE about
        # "modules that should be kept in float32: []" (an empty list, diffusers 0.42), twice per batch here.
        if upcast:
            torch.nn.Module.to(vae, dtype=torch.float32)
        try:
            yield vae
        finally:
            if upcast:
                torch.nn.Module.to(vae, dtype=torch.float16)

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE's per-channel `latents_mean`, `latents_std` (1, C, 1, 1) when its config has them."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in (mean, std))

    def encode_pixels(self, pixels: torch.Tensor) -> LatentDistribution:
        """The inverse of `decode`: z = (x − latents_mean)·scaling_factor/latents_std with the statistics, else
        z = x·scaling_factor (the SDXL base VAE has none; the diffusers example only scales)."""
        with self._vae_in_float32_if_needed() as vae:
            dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        scale = vae.config.scaling_factor
        statistics = self._latent_statistics(mean)
        if statistics is None:
            return LatentDistribution(mean * scale, std * scale)
        latents_mean, latents_std = statistics
        return LatentDistribution((mean - latents_mean) * scale / latents_std, std * scale / latents_std)

    def decode(self, latents: torch.Tensor):
        """As the pipeline decodes: de-normalised with the VAE's `latents_mean`/`latents_std` when it has them,
        and through a float32 VAE when the VAE is fp16 with `force_upcast`."""
        with self._vae_in_float32_if_needed() as vae:
            latents = latents.to(vae.dtype)
            statistics = self._latent_statistics(latents)
            if statistics is not None:
                latents_mean, latents_std = statistics
                latents = latents * latents_std / vae.config.scaling_factor + latents_mean
            else:
                latents = latents / vae.config.scaling_factor
            decoded = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(decoded, output_type="pil")
