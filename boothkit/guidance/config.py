"""Options of the guided sampler (`sample` and `evaluate` share `SamplerOptions`) and of `boothkit sample`.

Light on purpose: the CLI builds its parsers from these schemas without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from boothkit.config import CommandConfig, ModelSourceOptions
from boothkit.errors import BoothkitError

METHODS: tuple[str, ...] = ("cfg", "ag", "wig", "none")


class SamplerOptions(CommandConfig):
    """The guided sampler's flags, shared by `sample` and `evaluate`."""

    guidance_scale: float | None = Field(None, description="λ (default: the method's: for cfg and wig the family's CFG scale, "
                                                               "7.5 for SD, 4.5 for SANA; for ag 2.0).")
    cfg_scale: float = Field(7.5, description="s, the CFG scale inside CFG + AG.")
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0,
                                    description="φ: rescale the guided output to the conditional output's std "
                                                "(Lin et al. 2024; 0.7 there), every method; 0 = off.")
    negative_prompt: str | None = Field(None, description="Replaces the empty prompt in every rule.")
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps (default: 50 for SD).")
    num_images_per_prompt: int = Field(1, ge=1, description="Images per prompt; image i uses seed + i.")
    seed: int = Field(0, ge=0, lt=2**63 - 2**20, description="Seed of image 0 of every prompt.")
    height: int | None = Field(None, ge=8, description="Height (default: the model's resolution).")
    width: int | None = Field(None, ge=8, description="Width (default: the model's resolution).")
    scheduler: str | None = Field(None, description="ddim, dpm, euler, euler_a, unipc, ..., a diffusers class name, or "
                                                    "model: the model's own (default: SD ddim, SDXL model, SANA "
                                                    "flow_dpm).")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Weights dtype (fp16 needs a GPU).")
    batch_size: int = Field(4, ge=1, description="Images per denoising batch.")
    max_sequence_length: int = Field(300, ge=1, description="SANA: prompt tokens (as in training).")
    complex_human_instruction: bool = Field(True, description="SANA: prepend the pipeline's complex human "
                                                              "instruction to prompts (as in training).")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str | None) -> str | None:
        if name is not None:
            from boothkit.guidance.schedulers import MODEL_SCHEDULER, scheduler_class

            try:
                if name.lower() != MODEL_SCHEDULER:
                    scheduler_class(name)
            except BoothkitError as error:
                raise ValueError(str(error)) from None
        return name


class SampleConfig(ModelSourceOptions, SamplerOptions):
    pretrained_model_name_or_path: str = Field(description="Hub id or local folder of the base pipeline.")
    lora_dir: str | None = Field(None, description="Fine LoRA folder (its weak/ serves --method ag).")
    weak_checkpoint_path: str | None = Field(None, description="Weak LoRA folder or file (overrides LORA_DIR/weak).")
    method: Literal[METHODS] = Field("cfg", description="Guidance: cfg, ag (CFG + AutoGuidance), wig, none.")
    prompt: list[str] = Field(default_factory=list, description="Prompt (repeatable).",
                              json_schema_extra={"repeatable": True})
    prompts_file: str | None = Field(None, description="Text file with one prompt per line, or a JSON list.")
    omega: float = Field(0.5, ge=0.0, le=1.0, description="ω of WIG: LoRA scale of the weak (null-prompt) branch.")
    output_dir: str = Field(description="Where images and samples.json are written.")
    overwrite: bool = Field(False, description="Allow a non-empty output_dir.")

    @model_validator(mode="after")
    def _check(self) -> "SampleConfig":
        if not self.prompt and not self.prompts_file:
            raise ValueError("give at least one --prompt or a --prompts_file")
        return self
