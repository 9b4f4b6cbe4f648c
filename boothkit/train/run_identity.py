"""The identity of a training run, recorded in each checkpoint's `state.json` and checked on resume.

A checkpoint only continues the run that wrote it: the same photos (by content), prompts, class images,
base model (by content, or the hub commit), seed, resolution and LoRA shape, the same samples per step,
and the step of its weak LoRA (written once). Options that may change on resume (max_train_steps,
checkpointing, validation, learning-rate schedule, --validation_every N, --keep_best, --min_clip_t...) are not part
of it; the validation scoring's models, identifier, prompts and image count are, once both runs score. Digests come from `boothkit.identity`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from boothkit import identity
from boothkit.errors import BoothkitError
from boothkit.train.config import TrainConfig
from boothkit.train.scoring import scoring_identity

# What each recorded entry is, for the one-line refusal ("the instance photos differ ...").
DESCRIPTIONS = {
    "instance_photos": "the instance photos",
    "instance_prompt": "the instance prompt (--instance_prompt)",
    "class_prompt": "the class prompt (--class_prompt)",
    "class_images": "the class images",
    "prompt_encoding": "the prompt encoding (--max_sequence_length, --complex_human_instruction)",
    "model": "the model (--pretrained_model_name_or_path)",
    "vae": "the VAE (--pretrained_vae_model_name_or_path)",
    "concepts": "the concepts (--concepts_list / --dataset_config: prompts, classes, repeats)",
    "train_mode": "the training mode (--train_mode)",
    "ema_decay": "the EMA (--use_ema, --ema_decay)",
    "seed": "the seed (--seed)",
    "resolution": "the resolution (--resolution)",
    "rank": "the LoRA rank (--rank)",
    "lora_alpha": "the LoRA alpha (--lora_alpha)",
    "train_text_encoder": "--train_text_encoder",
    "lora_targets": "the LoRA layers (--lora_layers)",
    "train_batch_size": "--train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "weak_checkpoint_step": "the weak checkpoint step (--weak_checkpoint_step)",
    "loss": "the loss (--snr_gamma, --prior_loss_weight, --weighting_scheme and its parameters)",
    "validation_scoring": "the validation scoring (--dino_model, --clip_model, --identifier, --num_validation_images "
                          "or the validation prompts, with --validation_every)",
    "pdmbooth": "the PDMBooth terms (--use_inst_loss, --mask_dm, --mask_dir/--mask_model, --use_pdm and their options)",
}
_PLURAL = {"instance_photos", "class_images"}
# Entries compared only when both runs have them: turning --validation_every on or off on resume is safe (the
# scores CSV keeps its rows up to the checkpoint), scoring on with other models or prompts is not.
_WHEN_BOTH = {"validation_scoring"}


def run_identity(config: TrainConfig, images, instance_files: Sequence[Path], class_files: Sequence[Path],
                 resolution: int, lora_targets: dict[str, Sequence[str]], prompt_encoding: dict) -> dict:
    """What a checkpoint of this run must have been written by (JSON-serialisable). `lora_targets`: the
    target layers of each trained module; `prompt_encoding`: `boothkit.train.lora.prompt_encoding_settings`;
    `images`: the run's `boothkit.train.concepts.ConceptImages` (several concepts: their prompts and repeats)."""
    prior = config.with_prior_preservation
    return {
        "instance_photos": identity.files_digest(instance_files),
        "instance_prompt": config.instance_prompt,
        "class_prompt": config.class_prompt if prior else None,
        "prompt_encoding": prompt_encoding,
        "class_images": identity.files_digest(class_files) if prior else None,
        "model": identity.model_identity(config.pretrained_model_name_or_path, config.revision, config.variant),
        "vae": (identity.model_identity(config.pretrained_vae_model_name_or_path, config_name="config.json")
                if config.pretrained_vae_model_name_or_path else None),
        "concepts": [[c.instance_prompt, c.class_prompt if prior else None, c.repeats] for c in images.concepts]
        if len(images.concepts) > 1 or images.concepts[0].repeats != 1 else None,
        "seed": config.seed,
        "resolution": resolution,
        "train_mode": config.train_mode,
        "ema_decay": config.ema_decay if config.use_ema else None,
        "rank": config.rank,
        "lora_alpha": config.lora_alpha,  # as set: its default follows --rank
        "train_text_encoder": config.train_text_encoder,
        "lora_targets": {name: sorted(layers) for name, layers in lora_targets.items()},
        "train_batch_size": config.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "weak_checkpoint_step": config.resolved_weak_step,  # weak/ is written once: a resume cannot move it
        "loss": {"snr_gamma": config.snr_gamma, "prior_loss_weight": config.prior_loss_weight if prior else None,
                 "weighting_scheme": config.weighting_scheme, "logit_mean": config.logit_mean,
                 "logit_std": config.logit_std, "mode_scale": config.mode_scale},
        "pdmbooth": _pdmbooth(config),
        "validation_scoring": scoring_identity(config, images),
    }


def _pdmbooth(config: TrainConfig) -> dict | None:
    """The PDMBooth options that change what a step computes (None for a plain DreamBooth run)."""
    if config.use_inst_loss and not (config.needs_masks or config.use_pdm):
        return None
    masks = None
    if config.needs_masks:
        masks = ({"dir": identity.folder_digest(config.mask_dir)} if config.mask_dir else
                 {"model": config.mask_model, "prompt": config.mask_prompt})
    pdm = ({"weight": config.pdm_loss_weight, "layer": config.pdm_layer, "timesteps": config.pdm_timesteps,
            "inversion_steps": config.pdm_inversion_steps, "masked": config.mask_pdm, "class_prompt": config.class_prompt}
           if config.use_pdm else None)
    return {"instance_loss": config.use_inst_loss, "mask_dm": config.mask_dm,
            "background_loss_weight": config.background_loss_weight if config.mask_dm else None, "masks": masks,
            "pdm": pdm}


def differences(recorded: dict, current: dict) -> list[str]:
    """Names of the entries that differ (an entry the checkpoint did not record is not compared)."""
    return [name for name in DESCRIPTIONS if name in recorded and recorded[name] != current.get(name)
            and not (name in _WHEN_BOTH and (recorded[name] is None or current.get(name) is None))]


def check_same_run(recorded: dict | None, current: dict, checkpoint: str) -> None:
    """Refuse, in one line naming what differs, to continue another run's checkpoint."""
    if recorded is None:
        return
    changed = differences(recorded, current)
    if not changed:
        return
    described = [DESCRIPTIONS[name] for name in changed]
    listed = described[0] if len(described) == 1 else ", ".join(described[:-1]) + " and " + described[-1]
    verb = "differ" if len(changed) > 1 or changed[0] in _PLURAL else "differs"
    raise BoothkitError(f"cannot resume: {listed} {verb} from the checkpoint's "
                        f"run (--resume_from_checkpoint {checkpoint}); start a new run with --overwrite or "
                        "another --output_dir")
