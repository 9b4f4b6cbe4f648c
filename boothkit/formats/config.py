"""Options of `boothkit export`, `boothkit info` and `boothkit merge` (light: no torch import)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from boothkit.config import CommandConfig
from boothkit.guidance.config import LoraSpec, parse_lora

DTYPES = ("fp32", "fp16", "bf16")
_POSITIONAL = {"positional": True}


class BaseModelOption(CommandConfig):
    pretrained_model_name_or_path: str | None = Field(
        None, description="The LoRA's base model (default: the one its metadata records). Needed to name SDXL "
                          "layers in the kohya layout and to read kohya files, when the recorded one is not at hand.")
    revision: str | None = Field(None, description="Hub revision of the base model.")


class ExportConfig(BaseModelOption):
    source: str = Field(description="A LoRA file, or a training output folder (its final LoRA).",
                        json_schema_extra=_POSITIONAL)
    format: Literal["kohya", "diffusers", "single_file"] = Field(
        "kohya", description="kohya: what A1111, Forge, ComfyUI and kohya read; diffusers: PEFT keys, what "
                             "diffusers' load_lora_weights reads; single_file: a whole SD 1.x/2.x/SDXL model (SOURCE "
                             "a pipeline folder, or a LoRA with --fuse_lora) as one checkpoint in the original "
                             "layout (A1111, ComfyUI, InvokeAI, diffusers' from_single_file).")
    output: str = Field(description="The .safetensors file to write (--format single_file: or a .ckpt).")
    dtype: Literal[DTYPES] = Field("fp16", description="Tensor type of the file: fp16, bf16 or fp32 (exact).")
    overwrite: bool = Field(False, description="Replace --output if boothkit wrote it (never a file it did not).")
    fuse_lora: bool = Field(False, description="--format single_file: fuse the LoRA SOURCE into its base model "
                                               "(--pretrained_model_name_or_path, else the one it records).")
    lora_scale: float = Field(1.0, allow_inf_nan=False, description="The LoRA's scale for --fuse_lora.")

    @model_validator(mode="after")
    def _check(self) -> "ExportConfig":
        if (self.fuse_lora or self.lora_scale != 1.0) and self.format != "single_file":
            raise ValueError("--fuse_lora and --lora_scale go with --format single_file")
        return self


class InfoConfig(CommandConfig):
    file: str = Field(description="A LoRA file or folder.", json_schema_extra=_POSITIONAL)


class MergeConfig(BaseModelOption):
    loras: list[LoraSpec] = Field(description="LoRA files or folders, each PATH[:WEIGHT] (weight 1.0 when omitted).",
                             json_schema_extra=_POSITIONAL)
    output: str = Field(description="The .safetensors file to write (with --into_base: the pipeline folder).")
    method: Literal["concat", "svd"] = Field(
        "concat", description="concat: exact (ranks add up); svd: a rank --rank approximation.")
    rank: int | None = Field(None, ge=1, description="Rank of the merged LoRA for --method svd.")
    into_base: bool = Field(False, description="Fuse the LoRAs into the base model and save a pipeline folder.")
    dtype: Literal[DTYPES] = Field("fp32", description="Tensor type of the file: fp16, bf16 or fp32.")
    overwrite: bool = Field(False, description="Replace --output if boothkit wrote it (never a file it did not).")

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        if self.method == "svd" and self.rank is None and not self.into_base:
            raise ValueError("--method svd needs --rank")
        return self

    def weighted(self) -> list[tuple[str, float]]:
        return [parse_lora(spec) for spec in self.loras]
