"""Stable Diffusion XL (Podell et al. 2023): UNet with "text_time" micro-conditioning, two CLIP text encoders.

Prompt embedding (as `StableDiffusionXLPipeline.encode_prompt`): the penultimate hidden states of both text
encoders, concatenated along the feature axis; the pooled embedding is `text_encoder_2`'s projection output.
The UNet also takes the micro-conditioning `time_ids` = (original height, width, crop top, crop left, target
height, width) (Podell et al. 2023, Sec. 2.2); for sampling they are the pipeline's defaults for the image size.
"""

from __future__ import annotations

import torch

from boothkit.families.base import Conditioning, first_sight, warn_if_truncated
from boothkit.families.sd import StableDiffusionFamily


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SD's DDPM training target, LoRA targets and options; SDXL's prompts, micro-conditioning and decoding."""

    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    # The scheduler class of stabilityai/stable-diffusion-xl-base-1.0 (EulerDiscreteScheduler), configured from
    # the model's own scheduler config by `make_scheduler`; the pipeline's defaults for steps and guidance.
    default_scheduler = "euler"
    default_inference_steps = 50
    default_guidance_scale = 5.0
    # Read by the trainer's input checks: sampling works, training (per-image crop time ids, both text-encoder
    # LoRAs, the fp16-fix VAE) is the next piece of issue 10.
    training_unsupported = "boothkit does not support training SDXL models yet (sampling them works)"

    @classmethod
    def load_kwargs(cls) -> dict:
        return {}  # SDXL pipelines have no safety checker

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipeline.text_encoder, self.pipeline.text_encoder_2]

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

    def predict(self, latents, timesteps, conditioning, denoiser=None):
        denoiser = denoiser if denoiser is not None else self.denoiser
        embeds = conditioning.tensors["encoder_hidden_states"]
        added = {"text_embeds": conditioning.tensors["text_embeds"], "time_ids": self.time_ids(latents, embeds.dtype)}
        return denoiser(latents, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added,
                        return_dict=False)[0]

    # Images ----------------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor):
        """As the pipeline decodes: de-normalised with the VAE's `latents_mean`/`latents_std` when it has them,
        and through a float32 VAE when the VAE is fp16 with `force_upcast` (the SDXL base VAE overflows in fp16)."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = latents.to(vae.dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            decoded = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        return self.pipeline.image_processor.postprocess(decoded, output_type="pil")
