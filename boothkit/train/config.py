"""`boothkit train` options. Names and defaults follow the diffusers DreamBooth-LoRA example and the seed."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from boothkit.config import ModelSourceOptions
from boothkit.train.pdm_config import PdmOptions

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class TrainConfig(PdmOptions, ModelSourceOptions):
    # Model and data.
    pretrained_model_name_or_path: str = Field(description="Hub id or local folder of a diffusers pipeline.")
    pretrained_vae_model_name_or_path: str | None = Field(
        None, description="A VAE to use instead of the model's (hub id or local folder), e.g. "
                          "madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.")
    instance_data_dir: str | None = Field(None, description="Folder with the 3-6 photos of the subject (required "
                                                           "unless --concepts_list or --dataset_config).")
    instance_prompt: str | None = Field(None, description="Prompt with the identifier, e.g. 'a photo of sks dog'.")
    concepts_list: str | None = Field(None, description="JSON list of concepts (instance_prompt, instance_data_dir, "
                                                        "class_prompt, class_data_dir, num_class_images, repeats, "
                                                        "validation_prompt) to train in one run.")
    dataset_config: str | None = Field(None, description="The concepts as a kohya dataset config (TOML: datasets → "
                                                         "subsets with image_dir, class_tokens, num_repeats, is_reg).")
    class_data_dir: str | None = Field(None, description="Folder of class images for prior preservation.")
    class_prompt: str | None = Field(None, description="Class prompt for prior preservation, e.g. 'a photo of dog'.")
    with_prior_preservation: bool = Field(False, description="Add the prior-preservation loss on class images.",
                                          validation_alias=AliasChoices("with_prior_preservation", "use_prior_loss"))
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the prior-preservation loss.")
    num_class_images: int = Field(100, ge=1, description="Class images wanted; missing ones are generated.")
    sample_batch_size: int = Field(4, ge=1, description="Batch size when generating class images.")
    output_dir: str = Field(description="Where the LoRA, weak/, checkpoints and logs are written.")
    overwrite: bool = Field(False, description="Allow a non-empty output_dir (replaces earlier boothkit outputs).")
    train_mode: Literal["lora", "full"] = Field(
        "lora", description="lora: train a LoRA; full: fine-tune the whole denoiser (and with --train_text_encoder "
                            "the text encoder(s)) and save a diffusers pipeline folder (default lr 5e-6).")
    use_ema: bool = Field(False, description="Full mode: keep an exponential moving average of the trained "
                                             "weights; the saved model is the average.")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="Decay of --use_ema's average.")
    # Optimisation.
    max_train_steps: int = Field(500, ge=1, description="Optimizer steps.")
    train_batch_size: int = Field(1, ge=1, description="Instance images per step (per device).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    rank: int = Field(4, ge=1, description="LoRA rank.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: the rank, i.e. scale 1).")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (default 1e-4; 5e-6 with --train_mode "
                                                         "full, as the diffusers DreamBooth example).")
    lr_scheduler: Literal[LR_SCHEDULERS] = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    snr_gamma: float | None = Field(
        None, gt=0, description="DDPM models (SD): min-SNR-γ weighting of the instance loss (Hang et al. 2023; "
                                "γ = 5 recommended).")
    use_8bit_adam: bool = Field(False, description="bitsandbytes 8-bit AdamW (pip install 'boothkit[bnb]').")
    seed: int = Field(0, ge=0, lt=2**63 - 2**20, description="Seed: the same seed gives the same weights.")
    # Images.
    resolution: int | None = Field(None, ge=8, description="Training resolution (default: the model's, 512 for SD 1.5).")
    center_crop: bool = Field(False, description="Center-crop instead of random-crop after resizing.")
    random_flip: bool = Field(False, description="Flip images horizontally at random.")
    cache_latents: bool = Field(True, description="Encode images once (both flips) instead of every step.")
    # Speed and memory.
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the denoiser.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="Mixed precision (fp16 needs a GPU); default: accelerate's setting, else no.")
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the text encoder(s) (SDXL: both).")
    text_encoder_lr: float | None = Field(
        None, gt=0, description="Learning rate of the text-encoder LoRA (default: 5e-6 for SDXL, as the diffusers "
                                "SDXL example; --learning_rate for SD).")
    # Flow-matching families (SANA).
    weighting_scheme: Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"] = Field(
        "none", description="SANA: timestep density / loss weighting (SD3).")
    logit_mean: float = Field(0.0, description="SANA: mean of the logit-normal density.")
    logit_std: float = Field(1.0, gt=0, description="SANA: std of the logit-normal density.")
    # The mode density f(u) = 1 − u − s·(cos²(πu/2) − 1 + u) maps [0, 1] monotonically onto [0, 1] only for
    # −1 ≤ s ≤ 2/(π − 2) (Esser et al. 2024, Eq. 20); outside, timesteps fall outside the schedule.
    mode_scale: float = Field(1.29, ge=-1, le=2 / (math.pi - 2), description="SANA: scale of the mode density.")
    lora_layers: str | None = Field(None, description="Comma-separated LoRA target modules (default: the family's).")
    max_sequence_length: int = Field(300, ge=1, description="SANA: prompt tokens.")
    complex_human_instruction: bool = Field(True, description="SANA: prepend the pipeline's complex human "
                                                              "instruction to prompts (as SanaPipeline does).")
    # Validation, checkpoints, weak checkpoint.
    validation_prompt: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("validation_prompt", "test_prompts"),
        description="Prompt for validation images; several: each prompt's images in validation/prompt-K/ and "
                    "validation/prompts.json says which is which (--test_prompts is an alias).",
        json_schema_extra={"repeatable": True})
    num_validation_images: int = Field(4, ge=1, description="Validation images per validation.")
    validation_steps: int = Field(100, ge=1, description="Validate every N steps (and at the end).")
    validation_every: int | None = Field(
        None, ge=0, description="Score validation samples every N steps (and at the end) with DINO, CLIP-I and CLIP-T "
                                "against the instance photos into validation_scores.csv (0: off).")
    keep_best: bool = Field(False, description="With --validation_every: keep the model of the scoring with the "
                                               "best DINO (CLIP-T at least --min_clip_t) in best/ (a LoRA, or "
                                               "with --train_mode full a pipeline folder).")
    min_clip_t: float | None = Field(None, ge=-1, le=1, description="--keep_best: the CLIP-T a scoring needs to "
                                                                   "count (default: no floor).")
    dino_model: str = Field("facebook/dino-vits16", description="--validation_every: DINO ViT (hub id or path).")
    clip_model: str = Field("openai/clip-vit-base-patch32", description="--validation_every: CLIP model (hub id or "
                                                                        "path).")
    identifier: str = Field("sks", description="--validation_every: the identifier token, left out of the CLIP-T text.")
    checkpointing_steps: int = Field(100, ge=1, description="Save resumable state every N steps.")
    save_interval: int | None = Field(None, ge=1, description="Checkpoint and validate every N steps (sets "
                                                                "--checkpointing_steps and --validation_steps).")
    checkpoints_total_limit: int | None = Field(None, ge=1, description="Keep at most N checkpoints.")
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint folder.")
    weak_checkpoint_step: int | None = Field(
        None, ge=0, description="Step of the weak LoRA for autoguidance (default 20% of max_train_steps; 0 disables)."
    )
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="Also log loss, lr and validation images to TensorBoard (event files in OUTPUT_DIR/logs; "
                            "pip install 'boothkit[tensorboard]') or Weights & Biases (pip install 'boothkit[wandb]').")

    @field_validator("validation_prompt", mode="before")
    @classmethod
    def _one_or_more_prompts(cls, value):
        """One prompt (a config file's string, the UI's field) or none (null) is accepted as well as a list."""
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_consistency(self) -> "TrainConfig":
        self._resolve_mode_defaults()
        sources = [name for name in ("concepts_list", "dataset_config") if getattr(self, name)]
        if len(sources) > 1:
            raise ValueError("give --concepts_list or --dataset_config, not both")
        if sources:
            flags = [name for name in ("instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir")
                     if getattr(self, name)]
            if flags:
                raise ValueError(f"--{flags[0]} is set by each concept of --{sources[0]}: leave the flag out")
        elif not self.instance_data_dir or not self.instance_prompt:
            missing = "instance_data_dir" if not self.instance_data_dir else "instance_prompt"
            raise ValueError(f"--{missing} is required (or --concepts_list / --dataset_config)")
        if self.with_prior_preservation and not sources:
            if not self.class_prompt:
                raise ValueError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog')")
            if not self.class_data_dir:
                raise ValueError("--with_prior_preservation needs --class_data_dir (generated images go there)")
        if self.lr_scheduler == "polynomial" and self.learning_rate <= 1e-7:
            raise ValueError("the polynomial schedule decays to 1e-7: use a larger --learning_rate")
        if self.validation_every == 0:
            self.__dict__["validation_every"] = None  # 0 means off
        if self.keep_best and not self.validation_every:
            raise ValueError("--keep_best needs --validation_every N (the steps whose samples are scored)")
        if self.min_clip_t is not None and not self.keep_best:
            raise ValueError("--min_clip_t applies to --keep_best")
        if self.weak_checkpoint_step is not None and self.weak_checkpoint_step >= self.max_train_steps:
            raise ValueError(
                f"--weak_checkpoint_step ({self.weak_checkpoint_step}) must be below --max_train_steps "
                f"({self.max_train_steps})"
            )
        return self

    def _resolve_mode_defaults(self) -> None:
        """Full fine-tuning's own learning rate and the LoRA-only options; `--save_interval` (the seed's name)."""
        explicit = self.model_fields_set
        if self.train_mode == "full":
            lora_only = [name for name in ("rank", "lora_alpha", "lora_layers") if name in explicit]
            if lora_only:
                raise ValueError(f"--{lora_only[0]} applies to --train_mode lora, not full")
            if "learning_rate" not in explicit:
                self.__dict__["learning_rate"] = 5e-6  # no re-validation: this validator set it
        elif self.use_ema:
            raise ValueError("--use_ema applies to --train_mode full")
        if self.save_interval is not None:
            for name in ("checkpointing_steps", "validation_steps"):
                if name not in explicit:
                    self.__dict__[name] = self.save_interval

    @property
    def resolved_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.rank)

    @property
    def resolved_weak_step(self) -> int:
        """0 means no weak checkpoint; by default 20% of the run (at least step 1)."""
        if self.weak_checkpoint_step is not None:
            return self.weak_checkpoint_step
        return max(1, round(0.2 * self.max_train_steps)) if self.max_train_steps > 1 else 0
