"""The one interface every model family implements.

A family is a thin adapter over a diffusers pipeline (which owns the modules): how to load it, how to
encode prompts and images, how to call the denoiser, what the training target is, which modules take
LoRA, and the family's sampling defaults. Trainer and sampler only talk to this interface.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilyOptions:
    """What a family is told at construction. Each family reads the options it has a use for and ignores
    the rest; about an ignored option the user set (`explicit`), `from_pretrained` warns once.

    Evaluation swaps LoRAs on one loaded pipeline, and each LoRA may have been trained with other
    prompt-encoding options: `ModelFamily.with_options` gives a family with other options on the same
    pipeline (no reload), so a family object's options never change after construction.
    """

    # Prompt encoding (SANA): Gemma tokens per prompt, and the pipeline's complex human instruction.
    max_sequence_length: int = 300
    complex_human_instruction: bool = True
    # Training timestep density and loss weighting of flow-matching families (SANA; SD3, Esser et al. 2024).
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    explicit: frozenset[str] = frozenset()  # the options above that the user set (flag or config file)

    @classmethod
    def from_config(cls, config) -> "FamilyOptions":
        """The options a command's pydantic config has (others keep their defaults); `explicit` are those in
        its `model_fields_set`."""
        names = {field.name for field in fields(cls)} - {"explicit"}
        values = {name: getattr(config, name) for name in names if hasattr(config, name)}
        return cls(**values, explicit=frozenset(config.model_fields_set) & names)

    def with_text(self, max_sequence_length: int, complex_human_instruction: bool) -> "FamilyOptions":
        """These options with other prompt-encoding options (e.g. those a LoRA was trained with)."""
        return replace(self, max_sequence_length=max_sequence_length,
                       complex_human_instruction=complex_human_instruction)


def option_flag(name: str, value: object) -> str:
    """The command-line spelling of an option as set: `--weighting_scheme`, `--no_complex_human_instruction`."""
    return f"--no_{name}" if value is False else f"--{name}"


_seen_prompts: set[tuple] = set()  # the prompts (with what their length is measured against) seen in this process


def first_sight(key: tuple) -> bool:
    """True the first time this process sees `key`: a prompt is measured, and warned about, once."""
    if key in _seen_prompts:
        return False
    _seen_prompts.add(key)
    return True


def warn_if_truncated(prompt: str, count: int, limit: int) -> None:
    """Warn that the text encoder reads only the first `limit` of a prompt's `count` tokens, if it does."""
    if count > limit:
        shown = prompt if len(prompt) <= 40 else prompt[:39].rstrip() + " …"
        log.warning("prompt '%s' has %d tokens; the text encoder reads the first %d (the rest is ignored)",
                    shown, count, limit)


@dataclass
class Conditioning:
    """Prompt conditioning for a batch: named tensors that share batch dimension 0."""

    tensors: dict[str, torch.Tensor]

    def index(self, rows: torch.Tensor | list[int] | slice) -> "Conditioning":
        return Conditioning({name: value[rows] for name, value in self.tensors.items()})

    def repeat(self, times: int) -> "Conditioning":
        """Each row repeated `times` times in place (row 0, row 0, ..., row 1, ...)."""
        return Conditioning({name: value.repeat_interleave(times, dim=0) for name, value in self.tensors.items()})

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        names = parts[0].tensors.keys()
        return Conditioning({name: torch.cat([part.tensors[name] for part in parts]) for name in names})

    def detach(self) -> "Conditioning":
        return Conditioning({name: value.detach() for name, value in self.tensors.items()})


@dataclass
class LatentDistribution:
    """Scaled latent posterior of a batch of images: latents = mean + std · ε (std = 0 for deterministic VAEs)."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * noise


class ModelFamily(ABC):
    """Adapter for one kind of diffusers pipeline (see `boothkit.families.load_family`)."""

    name: ClassVar[str]
    pipeline_class_names: ClassVar[tuple[str, ...]]
    denoiser_name: ClassVar[str]  # the pipeline attribute and LoRA prefix: "unet" or "transformer"
    denoiser_lora_targets: ClassVar[tuple[str, ...]]
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ()
    default_scheduler: ClassVar[str]
    default_inference_steps: ClassVar[int]
    default_guidance_scale: ClassVar[float]
    resolution_multiple: ClassVar[int] = 8  # what the family's pipelines accept for height and width

    def __init__(self, pipeline: DiffusionPipeline, source: str, options: FamilyOptions = FamilyOptions()):
        self.pipeline = pipeline
        self.source = source
        self.options = options

    def with_options(self, options: FamilyOptions) -> "ModelFamily":
        """The same family with other options, sharing this one's pipeline (its modules and loaded LoRAs)."""
        return type(self)(self.pipeline, self.source, options)

    def unused_options(self) -> dict[str, str]:
        """Options this family ignores as configured, each with the reason (e.g. SD: `weighting_scheme`)."""
        return {}

    def warn_unused_options(self) -> None:
        """One warning per option the user set that this family ignores."""
        unused = self.unused_options()
        for name in sorted(self.options.explicit & unused.keys()):
            log.warning("%s %s", option_flag(name, getattr(self.options, name)), unused[name])

    # Loading ---------------------------------------------------------------------------------------
    @classmethod
    def load_kwargs(cls) -> dict:
        """Extra `from_pretrained` arguments (e.g. skip SD's safety checker)."""
        return {}

    @classmethod
    def from_pretrained(cls, source: str, revision: str | None = None, variant: str | None = None,
                        torch_dtype: torch.dtype = torch.float32, options: FamilyOptions = FamilyOptions(),
                        components: dict | None = None) -> "ModelFamily":
        """Load the pipeline; `components` replace some of its modules (e.g. another VAE) without loading them."""
        pipeline = DiffusionPipeline.from_pretrained(
            source, revision=revision, variant=variant, dtype=torch_dtype, **cls.load_kwargs(), **(components or {})
        )
        pipeline.set_progress_bar_config(disable=True)
        family = cls(pipeline, source, options)
        family.warn_unused_options()
        return family

    # Modules ---------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def base_model(self):
        """This model's `boothkit.formats.models.BaseModel` (version, source, denoiser config)."""
        from boothkit.formats.models import base_model_from_configs

        prediction = self.pipeline.scheduler.config.get("prediction_type")
        return base_model_from_configs(self.name, self.source, dict(self.denoiser.config), prediction)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.pipeline.text_encoder

    @property
    def named_text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by pipeline attribute (also the LoRA file's prefix): `--train_text_encoder` gives
        each a LoRA."""
        return {"text_encoder": self.pipeline.text_encoder}

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return list(self.named_text_encoders.values())

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    @property
    def default_resolution(self) -> int:
        """The pipeline's own default size: the denoiser's sample size in pixels (512 for SD 1.5)."""
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that never train (LoRA parameters inside them excepted)."""
        return [module for module in self.pipeline.components.values() if isinstance(module, torch.nn.Module)]

    # Prompts and images ------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str], device: torch.device, negative: bool = False) -> Conditioning:
        """Embed prompts exactly as the family's diffusers pipeline does for its positive prompt
        (`negative=True`: as it does for the negative / empty prompt, where the two differ), after
        `warn_long_prompts`."""

    @abstractmethod
    def warn_long_prompts(self, prompts: list[str], negative: bool = False) -> None:
        """Warn once per prompt (per process: `first_sight`) that the text encoder reads only part of it
        (`warn_if_truncated`); for prompts given to the pipeline itself (validation images)."""

    default_gpu_precision: ClassVar[str | None] = None  # mixed precision when none is asked for, on a GPU
    default_text_encoder_lr: ClassVar[float | None] = None  # --text_encoder_lr when not given (None: --learning_rate)

    def warn_about_training_precision(self, precision: str) -> None:
        """Warn about a mixed precision known to fail with this family's modules."""
        if precision == "fp16" and self.default_gpu_precision == "bf16":
            log.warning("fp16 is known to give NaNs with %s models; --mixed_precision bf16 is safer", self.name)

    def image_conditioning(self, geometries: list, resolution: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-sample conditioning the denoiser takes besides the prompt, from where each training sample came
        from (`boothkit.train.data.ImageGeometry`): none by default; SDXL's micro-conditioning time ids."""
        return {}

    def pipeline_kwargs(self) -> dict:
        """Extra arguments for calls of the family's diffusers pipeline (class images, validation)."""
        return {}

    def encode_pixels(self, pixels: torch.Tensor) -> LatentDistribution:
        """Pixels in [-1, 1] (B, 3, H, W) → scaled latent posterior, as the pipeline expects latents."""
        vae = self.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        encoded = vae.encode(pixels)
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        if hasattr(encoded, "latent_dist"):
            dist = encoded.latent_dist
            return LatentDistribution((dist.mean.float() - shift) * scale, dist.std.float() * scale)
        latents = (encoded.latent.float() - shift) * scale
        return LatentDistribution(latents, torch.zeros_like(latents))

    def initial_noise(self, generator: torch.Generator, height: int, width: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
        """Noise (1, C, h, w) for one image, drawn on the generator's device as diffusers pipelines draw it."""
        shape = (1, self.denoiser.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents → PIL images, with the pipeline's VAE and image processor."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        decoded = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(decoded, output_type="pil")

    # Denoising and training --------------------------------------------------------------------------
    @abstractmethod
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        """The model output (noise, v or flow) for latents at timesteps; `denoiser` overrides a wrapped one."""

    @abstractmethod
    def training_sample(self, latents: torch.Tensor, noise: torch.Tensor, generators: list[torch.Generator]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw each row's timestep from its own generator; return (noisy latents, timesteps for the
        denoiser, target, per-sample loss weight)."""

    # LoRA files ------------------------------------------------------------------------------------
    def save_lora_weights(self, directory: str, layers: dict[str, dict], metadata: dict[str, dict]) -> None:
        """Write `pytorch_lora_weights.safetensors` with the pipeline's own saver (keys diffusers loads)."""
        kwargs = {f"{name}_lora_layers": state for name, state in layers.items()}
        kwargs.update({f"{name}_lora_adapter_metadata": meta for name, meta in metadata.items()})
        type(self.pipeline).save_lora_weights(directory, safe_serialization=True, **kwargs)
