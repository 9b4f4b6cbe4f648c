"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel, one CLIP text encoder, epsilon or v-prediction."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from boothkit.families.base import Conditioning, FamilyOptions, ModelFamily, first_sight, warn_if_truncated
from boothkit.train.losses import snr

_FLOW_MATCHING_OPTIONS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")


class StableDiffusionFamily(ModelFamily):
    name = "sd"
    pipeline_class_names = ("StableDiffusionPipeline",)
    denoiser_name = "unet"
    # The attention projections, as the diffusers DreamBooth-LoRA example targets them.
    denoiser_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    text_encoder_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    default_scheduler = "ddim"
    default_inference_steps = 50
    default_guidance_scale = 7.5

    def __init__(self, pipeline, source: str, options: FamilyOptions = FamilyOptions()):
        super().__init__(pipeline, source, options)
        # The forward (noising) process of training: DDPM with the model's own beta schedule.
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    @classmethod
    def load_kwargs(cls) -> dict:
        # The safety checker is a 1.2 GB model that training and guided sampling never use.
        return {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None}

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def timestep_snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR(t) = ᾱ_t/(1 − ᾱ_t) of the training timesteps, for min-SNR-γ weighting (`--snr_gamma`)."""
        return snr(self.noise_scheduler.alphas_cumprod, timesteps)

    def unused_options(self) -> dict[str, str]:
        name = self.name.upper()
        unused = {option: f"applies to flow-matching models (SANA); {name} trains with DDPM timesteps"
                  for option in _FLOW_MATCHING_OPTIONS}
        unused["max_sequence_length"] = (f"applies to SANA; {name}'s CLIP text encoders read "
                                         f"{self.pipeline.tokenizer.model_max_length} tokens")
        unused["complex_human_instruction"] = f"applies to SANA; {name} prompts have no complex human instruction"
        return unused

    def encode_prompts(self, prompts: list[str | None], device: torch.device, negative: bool = False
                       ) -> Conditioning:
        # SD encodes positive and negative prompts alike (padded to 77 tokens, no attention mask); no negative
        # prompt (None) is the empty one, as `StableDiffusionPipeline` encodes `negative_prompt=None`.
        texts = ["" if prompt is None else prompt for prompt in prompts]
        self.warn_long_prompts(texts, negative)
        embeds, _ = self.pipeline.encode_prompt(
            texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning({"encoder_hidden_states": embeds})

    def warn_long_prompts(self, prompts: list[str], negative: bool = False) -> None:
        """Counted as `StableDiffusionPipeline.encode_prompt` counts before it truncates: BOS + the prompt's
        tokens + EOS, against the tokenizer's `model_max_length` (77, BOS and EOS included)."""
        tokenizer = self.pipeline.tokenizer
        limit = tokenizer.model_max_length
        for prompt in prompts:
            if first_sight((self.name, limit, prompt)):
                warn_if_truncated(prompt, len(tokenizer(prompt).input_ids), limit)

    def predict(self, latents, timesteps, conditioning, denoiser=None):
        denoiser = denoiser if denoiser is not None else self.denoiser
        return denoiser(
            latents, timesteps, encoder_hidden_states=conditioning.tensors["encoder_hidden_states"], return_dict=False
        )[0]

    def training_sample(self, latents, noise, generators):
        """DDPM training (Ho et al. 2020): t ~ U{0..T-1}, x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε; target ε or v."""
        batch = latents.shape[0]
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=generator) for generator in generators])
        timesteps = timesteps.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")
        return noisy, timesteps, target, torch.ones(batch, device=latents.device)
