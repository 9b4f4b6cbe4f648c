"""`boothkit evaluate` options (the seed's flags, plus the sampler's). Light: no torch import."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from boothkit.config import ModelSourceOptions
from boothkit.guidance.config import SamplerOptions

DEFAULT_OMEGA_GRID = [round(0.1 * step, 1) for step in range(11)]
MAX_ABS_LAMBDA = 1e6  # |λ| beyond this is no guidance scale; it also keeps HIGH - LOW finite for the search


class EvaluateConfig(ModelSourceOptions, SamplerOptions):
    """λ defaults to the method's when not optimized; the seeds are the same at every λ and ω."""

    pretrained_model_name_or_path: str = Field(
        description="Hub id or local folder of the base pipeline.",
        # The seed's name, kept as a hidden alias (flag and config-file key).
        validation_alias=AliasChoices("pretrained_model_name_or_path", "pretrained_model_path"))
    lora_base_dir: str | None = Field(None, description="One LoRA folder per subject (with weak/ for --method ag).")
    lora_dir: str | None = Field(None, description="Instead of --lora_base_dir: one LoRA folder or fully fine-tuned "
                                                   "model for every subject folder (a model trained on several "
                                                   "concepts).")
    concepts_list: str | None = Field(None, description="The training run's concepts (JSON, or a kohya TOML dataset "
                                                        "config): each subject folder that is a concept's "
                                                        "instance_data_dir takes that concept's identifier.")
    weak_checkpoint_path: str | None = Field(
        None, description="--method ag: the weak LoRA (a folder or file) when one subject is evaluated, or a "
                          "folder holding one weak LoRA folder per subject folder (default: "
                          "LORA_BASE_DIR/<folder>/weak).")
    instance_data_dir: str = Field(description="One folder of reference photos per subject.")
    evaluation_prompts_path: str = Field(description="Prompts: the seed's JSON, a per-subject JSON, or "
                                                     "prompts_and_classes.txt.")
    output_dir: str = Field(description="Images, caches, evaluation_summary.csv, results.json, report.html; reused by "
                                        "later runs (several methods may be evaluated into one folder).")
    overwrite: bool = Field(False, description="Remove what boothkit wrote in output_dir first (its cache too), or "
                                               "write into a non-empty folder boothkit did not create (none of its "
                                               "files is removed or replaced).")
    method: Literal["cfg", "ag", "wig"] = Field("cfg", description="Guidance method.")
    omega: float = Field(0.5, ge=0.0, le=1.0, description="ω of WIG when not optimized.")
    lambda_range: tuple[float, float] = Field((-10.0, 10.0), description="Search interval of λ.")
    optimize: Literal["none", "lambda", "omega", "both"] = Field(
        "none", description="What to optimize for DINO (bare --optimize: lambda; omega/both: wig only).",
        json_schema_extra={"bare": "lambda"})
    tolerance: float = Field(0.05, gt=0, description="Golden-section search stops at this bracket width.")
    max_evaluations: int | None = Field(None, ge=2, description="At most this many evaluations per search.")
    omega_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_OMEGA_GRID),
                                    description="ω values swept by --optimize omega|both.")
    subjects: list[str] | None = Field(None, description="Only these subject folders (or subject names).")
    max_prompts: int | None = Field(None, ge=1, description="Only the first N prompts of each subject.")
    identifier: str = Field("sks", description="The identifier token the LoRAs were trained with.")
    keep_identifier: bool = Field(False, description="Keep the identifier in the CLIP-T text.")
    class_prompt_samples: int = Field(
        0, ge=0, description="PRES (prior preservation): sample N images of each prompt without the identifier "
                             "('a dog in the snow') with the personalized model at each evaluation's guidance "
                             "setting, and score their DINO similarity to the reference photos (0: no PRES).")
    dino_model: str = Field("facebook/dino-vits16", description="DINO ViT (hub id or path).")
    clip_model: str = Field("openai/clip-vit-base-patch32", description="CLIP model (hub id or path).")

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        low, high = self.lambda_range
        if not low < high:
            raise ValueError(f"--lambda_range needs LOW < HIGH, got {low} {high}")
        if not (math.isfinite(high - low) and max(abs(low), abs(high)) <= MAX_ABS_LAMBDA):
            raise ValueError(f"--lambda_range needs finite bounds within ±{MAX_ABS_LAMBDA:g}, got {low} {high}")
        if self.optimize in ("omega", "both") and self.method != "wig":
            raise ValueError(f"--optimize {self.optimize} sweeps ω, which only --method wig has")
        if any(not 0.0 <= omega <= 1.0 for omega in self.omega_grid):
            raise ValueError("--omega_grid values must lie in [0, 1]")
        if (self.lora_base_dir is None) == (self.lora_dir is None):
            raise ValueError("give --lora_base_dir (one LoRA folder per subject) or --lora_dir (one model for all)")
        return self
