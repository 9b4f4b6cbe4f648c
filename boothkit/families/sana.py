"""SANA (Xie et al. 2024): linear-attention DiT on DC-AE latents, Gemma-2 text encoder, flow matching.

Training follows rectified flow (Esser et al. 2024, "SD3"): x_t = (1−σ)·x0 + σ·ε, target ε − x0, σ drawn by
`--weighting_scheme` (logit-normal, mode, cosmap, sigma_sqrt or uniform) with the SD3 loss weighting.

The complex human instruction (CHI): `SanaPipeline` prepends it to positive prompts by default, the
diffusers training script does not. boothkit turns it ON by default in training *and* sampling, so a LoRA
is trained on the very embeddings the standard pipeline feeds it; `--no_complex_human_instruction` turns
it off in both (use the same setting for a LoRA's training and its sampling).
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3

from boothkit.families.base import Conditioning, FamilyOptions, ModelFamily, first_sight, warn_if_truncated

DEFAULT_CHI: list[str] = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


class SanaFamily(ModelFamily):
    name = "sana"
    pipeline_class_names = ("SanaPipeline",)
    denoiser_name = "transformer"
    denoiser_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_scheduler = "flow_dpm"
    default_inference_steps = 20
    default_guidance_scale = 4.5
    resolution_multiple = 32  # SanaPipeline.check_inputs
    default_gpu_precision = "bf16"  # fp16 is known to give NaNs with SANA

    def __init__(self, pipeline, source: str, options: FamilyOptions = FamilyOptions()):
        super().__init__(pipeline, source, options)
        self.max_sequence_length = options.max_sequence_length
        self.complex_human_instruction: list[str] | None = (
            list(DEFAULT_CHI) if options.complex_human_instruction else None)
        # Training's forward process: rectified-flow sigmas of the model's schedule.
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)

    def unused_options(self) -> dict[str, str]:
        scheme = self.options.weighting_scheme
        needs = {"logit_mean": "logit_normal", "logit_std": "logit_normal", "mode_scale": "mode"}
        return {name: f"applies to --weighting_scheme {wanted}; this run uses {scheme}"
                for name, wanted in needs.items() if scheme != wanted}

    def pipeline_kwargs(self) -> dict:
        # Resolution binning snaps sizes to SANA's aspect-ratio table, which tiny test sizes are not in.
        return {"use_resolution_binning": False, "max_sequence_length": self.max_sequence_length,
                "complex_human_instruction": self.complex_human_instruction}

    def encode_prompts(self, prompts: list[str | None], device: torch.device, negative: bool = False
                       ) -> Conditioning:
        """As `SanaPipeline.encode_prompt`: CHI (when on) for positive prompts only, never for the negative; no
        negative prompt (None) is the pipeline's default negative prompt, ""."""
        texts = ["" if prompt is None else prompt for prompt in prompts]
        self.warn_long_prompts(texts, negative)
        instruction = None if negative else self.complex_human_instruction
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            texts, do_classifier_free_guidance=False, device=device,
            max_sequence_length=self.max_sequence_length, complex_human_instruction=instruction,
        )
        return Conditioning({"encoder_hidden_states": embeds, "encoder_attention_mask": mask})

    def warn_long_prompts(self, prompts: list[str], negative: bool = False) -> None:
        """`SanaPipeline._get_gemma_prompt_embeds` tokenizes `instruction + prompt.lower().strip()` and cuts it at
        `len(instruction tokens) + max_sequence_length - 2` tokens (the prompt alone: at `max_sequence_length`).
        What we count is the user's part: the tokens beyond those of the instruction (or of the bare BOS),
        against the length left to them (max_sequence_length - 2 with the instruction, - 1 without). Whether a
        prompt is cut is then exactly the pipeline's test; the count can differ by one from the prompt's own
        tokenization where its first token merges with the instruction's last."""
        instruction = None if negative else self.complex_human_instruction
        tokenizer = self.pipeline.tokenizer
        prefix = "\n".join(instruction) if instruction else ""
        for prompt, text in zip(prompts, self.pipeline._text_preprocessing(list(prompts))):
            if first_sight((self.name, self.max_sequence_length, instruction is not None, prompt)):
                overhead = len(tokenizer.encode(prefix))
                read = overhead + self.max_sequence_length - 2 if instruction else self.max_sequence_length
                warn_if_truncated(prompt, len(tokenizer.encode(prefix + text)) - overhead, read - overhead)

    def predict(self, latents, timesteps, conditioning, denoiser=None):
        denoiser = denoiser if denoiser is not None else self.denoiser
        config = self.denoiser.config
        timesteps = torch.as_tensor(timesteps, device=latents.device).expand(latents.shape[0])
        hidden, mask = without_padding(conditioning.tensors["encoder_hidden_states"],
                                       conditioning.tensors["encoder_attention_mask"])
        output = denoiser(
            latents.to(self.denoiser.dtype),
            encoder_hidden_states=hidden.to(self.denoiser.dtype),
            encoder_attention_mask=mask,
            timestep=timesteps * config.timestep_scale, return_dict=False,
        )[0].float()
        if config.out_channels // 2 == latents.shape[1]:  # learned sigma: keep the flow
            output = output.chunk(2, dim=1)[0]
        return output

    def _density_sample(self, generator: torch.Generator) -> float:
        """u ∈ [0, 1) from the scheme's timestep density (SD3, Esser et al. 2024, Sec. 3.1)."""
        options = self.options
        if options.weighting_scheme == "logit_normal":
            normal = torch.randn(1, generator=generator).item() * options.logit_std + options.logit_mean
            return 1.0 / (1.0 + math.exp(-normal))
        u = torch.rand(1, generator=generator).item()
        if options.weighting_scheme == "mode":
            return 1.0 - u - options.mode_scale * (math.cos(math.pi * u / 2) ** 2 - 1.0 + u)
        return u

    def training_sample(self, latents, noise, generators):
        scheduler = self.noise_scheduler
        steps = scheduler.config.num_train_timesteps
        indices = torch.tensor([min(int(self._density_sample(g) * steps), steps - 1) for g in generators])
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(device=latents.device, dtype=latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weights = compute_loss_weighting_for_sd3(self.options.weighting_scheme, sigmas).flatten()
        return noisy, timesteps, noise - latents, weights


def without_padding(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt tokens without the trailing ones that every row masks out.

    SANA's transformer turns the mask into an additive bias of -10000 on the cross-attention logits, so a masked
    token's softmax weight is exp(-10000 - max) = 0 in every float format, and the caption projection and norm
    act per token: dropping those tokens changes the output only by summation order (~1e-6), while a padded
    prompt (`max_sequence_length` 300, a short DreamBooth prompt ~10 tokens) spends most of the cross-attention
    and its key/value projections on them — ~1.2× the bench transformer's training step. One host sync per call
    for the length."""
    used = torch.nonzero(mask.any(dim=0))
    length = int(used.max()) + 1 if len(used) else 1
    return hidden[:, :length], mask[:, :length]
