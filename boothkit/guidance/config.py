"""Options of the guided sampler (`sample` and `evaluate` share `SamplerOptions`) and of `boothkit sample`.

Light on purpose: the CLI builds its parsers from these schemas without importing torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

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


def parse_lora(spec: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` of `--lora` as (path, weight); the weight is 1.0 when omitted. Paths may hold ':' themselves:
    the text after the last ':' is a weight only when it reads as a number and the whole text is no existing
    path. A weight may be negative (a LoRA subtracted), never NaN or infinite."""
    head, colon, tail = spec.rpartition(":")
    if not colon or Path(spec).expanduser().exists():
        return spec, 1.0
    try:
        weight = float(tail)
    except ValueError:
        if head and Path(head).expanduser().exists():
            raise ValueError(f"'{spec}': weight '{tail}' is not a number (PATH[:WEIGHT], e.g. {head}:0.8)") from None
        return spec, 1.0  # a path with ':' in it; if it does not exist, loading says so
    if not math.isfinite(weight):
        raise ValueError(f"'{spec}': the weight must be a finite number")
    return head, weight


def _valid_lora_spec(spec: str) -> str:
    parse_lora(spec)
    return spec


LoraSpec = Annotated[str, AfterValidator(_valid_lora_spec)]  # `PATH[:WEIGHT]`, checked by `parse_lora`


class SampleConfig(ModelSourceOptions, SamplerOptions):
    pretrained_model_name_or_path: str = Field(description="Hub id or local folder of the base pipeline.")
    lora_dir: str | None = Field(None, description="Fine LoRA folder: the subject LoRA guidance acts on (its weak/ "
                                                   "serves --method ag).")
    lora: list[LoraSpec] = Field(default_factory=list, description="PATH[:WEIGHT]: a LoRA folder or file at WEIGHT "
                                                              "(default 1.0; may be negative). The subject LoRA is "
                                                              "LORA_DIR, else the first --lora; the others (a style) "
                                                              "stay at their weight in every branch.",
                            json_schema_extra={"repeatable": True})
    lora_scale: float = Field(1.0, description="Weight of the subject LoRA (LORA_DIR, else the first --lora).")
    weak_checkpoint_path: str | None = Field(None, description="Weak LoRA folder or file (overrides LORA_DIR/weak); "
                                                                "for a fully fine-tuned model its weak/ folder.")
    base_model: str | None = Field(None, description="--method wig on a fully fine-tuned model (no LoRA; the "
                                                     "model is its folder): the model it was fine-tuned from.")
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
        if "lora_scale" in self.model_fields_set:
            if self.lora_dir is None and not self.lora:
                raise ValueError("--lora_scale weights the subject LoRA: pass --lora_dir or --lora")
            if self.lora_dir is None and parse_lora(self.lora[0]) != (self.lora[0], 1.0):
                raise ValueError(f"--lora_scale and the weight of --lora '{self.lora[0]}' both weight the subject "
                                 "LoRA: give one of them")
        return self

    def lora_stack(self) -> list[tuple[str, float]]:
        """(path, weight) of every LoRA, the subject first (LORA_DIR at --lora_scale, else the first --lora, whose
        weight is its own or --lora_scale), then the other --lora's. Empty without LoRA."""
        stack = [parse_lora(spec) for spec in self.lora]
        if self.lora_dir is not None:
            stack.insert(0, (self.lora_dir, self.lora_scale))
        elif stack and "lora_scale" in self.model_fields_set:
            stack[0] = (stack[0][0], self.lora_scale)
        return stack
