"""`boothkit study` options (light: pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from boothkit.config import CommandConfig

BUILTIN_RECIPES: dict[str, dict] = {
    "dreambooth": {},  # DreamBooth-LoRA with boothkit's defaults
    "pdmbooth": {"use_pdm": True, "mask_pdm": True, "mask_dm": True},  # PDMBooth's LoRA recipe (docs/pdmbooth.md)
    "full": {"train_mode": "full"},  # full fine-tuning
}


class StudyConfig(CommandConfig):
    pretrained_model_name_or_path: str = Field(description="Hub id or local folder of the base pipeline.")
    instance_data_dir: str = Field(description="The dataset: one folder of photos per subject (DreamBooth layout).")
    evaluation_prompts_path: str | None = Field(
        None, description="Subjects, classes and prompts (default: INSTANCE_DATA_DIR/prompts_and_classes.txt, else "
                          "the DreamBooth dataset's, shipped with boothkit).")
    output_dir: str = Field(description="The study folder: train/<recipe>/<subject>, eval/<recipe>/<subject>, "
                                        "jobs/, study.csv, study.md.")
    plan: str | None = Field(None, description="TOML plan: subjects, methods, [train] and [evaluate] options for "
                                               "every run, [recipes.NAME] options of each recipe.")
    subjects: list[str] | None = Field(None, description="Only these subject folders.")
    recipes: list[str] = Field(default_factory=lambda: ["dreambooth"],
                               description=f"Built-in recipes to compare ({', '.join(BUILTIN_RECIPES)}); a plan's "
                                           "[recipes] replace them.")
    methods: list[Literal["cfg", "ag", "wig"]] = Field(default_factory=lambda: ["cfg", "ag", "wig"],
                                                       description="Guidance methods evaluated for every run.")
    max_train_steps: int = Field(500, ge=1, description="Training steps of every run (a plan's [train] overrides).")
    identifier: str = Field("sks", description="The identifier token: instance prompt 'a photo of sks <class>'.")
    estimate_steps: int = Field(3, ge=0, description="Before starting, time trainings of N and 2N steps on the "
                                                     "first subject (in OUTPUT_DIR/probe) to estimate the training "
                                                     "time; 0: no estimate.")
    optimize: bool = Field(True, description="Tune λ by golden-section search (and sweep ω for wig); "
                                             "--no_optimize evaluates each method's default.")
