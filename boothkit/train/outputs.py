"""The training output folder's own files (the resolved config, the loss log; names: `boothkit.layout`), and what a
run checks and tidies there before its first step."""

from __future__ import annotations

import csv
import io
import logging
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from boothkit.errors import BoothkitError
from boothkit.io import write_json_atomic, write_text_atomic
from boothkit.layout import (BEST_DIR, LORA_WEIGHT_NAME, TRAIN_CONFIG_NAME, TRAIN_LOG_NAME, VALIDATION_PROMPTS_NAME,
                             WEAK_DIR, OutputFolder, lora_file, weak_dir)
from boothkit.train import checkpoint as ckpt
from boothkit.train import full, scoring
from boothkit.train.config import TrainConfig
from boothkit.train.validation import validation_image_names

if TYPE_CHECKING:
    from boothkit.families.base import ModelFamily
    from boothkit.train.concepts import ValidationPrompt

log = logging.getLogger(__name__)
WEAK_LORA = lora_file(weak_dir(""))  # weak/pytorch_lora_weights.safetensors, relative to the output folder

_LIBRARIES = ("boothkit", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def planned_outputs(config: TrainConfig, start_step: int, validations: list) -> list[str]:
    """Every file (relative to the output folder) that a run from `start_step` to `max_train_steps` writes,
    checkpoints aside (claimed as they come): claimed before the first step, so that a user's file in the way
    stops the run before any training, not after it."""
    if config.train_mode == "full":  # a pipeline folder; its files are claimed as `save_pretrained` writes them
        names = ["model_index.json", TRAIN_CONFIG_NAME, TRAIN_LOG_NAME]
    else:
        names = [LORA_WEIGHT_NAME, TRAIN_CONFIG_NAME, TRAIN_LOG_NAME]
    if start_step < config.resolved_weak_step and config.train_mode == "lora":
        names.append(lora_file(weak_dir("")).as_posix())
    steps = [step for step in range(start_step + 1, config.max_train_steps)
             if step % config.validation_steps == 0] + [config.max_train_steps]
    names += [name for concept, index, _ in validations for step in steps
              for name in validation_image_names(step, config.num_validation_images, concept, index)]
    if len(validations) > 1:  # `boothkit.train.concepts.ValidationPrompt`s
        names.append(VALIDATION_PROMPTS_NAME)
    return names


def write_train_config(folder: OutputFolder, config: TrainConfig, resolved: dict) -> Path:
    path = folder.path(TRAIN_CONFIG_NAME)
    write_json_atomic(path, {"config": config.model_dump(), "resolved": resolved, "versions": library_versions()})
    return path


class TrainLog:
    """`train_log.csv` (step, loss, lr); a resumed run keeps the rows up to its checkpoint and goes on.
    `path` must already be claimed in the output folder's manifest."""

    FIELDS = ("step", "loss", "lr")

    def __init__(self, path: Path, keep_until_step: int):
        self.path = path
        kept = [row for row in self._read() if int(row["step"]) <= keep_until_step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(path, buffer.getvalue())
        self._handle = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._handle, lineterminator="\n")

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as handle:
            return [row for row in csv.DictReader(handle) if row.get("step", "").isdigit()]

    def append(self, step: int, loss: float, lr: float) -> None:
        self._writer.writerow([step, f"{loss:.8g}", f"{lr:.8g}"])
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def resolved_settings(config: TrainConfig, family, resolution: int, accelerator) -> dict:
    """What the run resolved from its defaults and the machine (train_config.json's "resolved")."""
    from boothkit.train.optim import text_encoder_lr

    return {
        "family": family.name, "resolution": resolution, "lora_alpha": config.resolved_lora_alpha,
        "mixed_precision": accelerator.mixed_precision,
        "text_encoder_lr": text_encoder_lr(config, family.default_text_encoder_lr) if config.train_text_encoder else None,
        "weak_checkpoint_step": config.resolved_weak_step,
        "prediction_type": getattr(family, "prediction_type", None),
        "device": str(accelerator.device), "num_processes": accelerator.num_processes,
    }


def claim_output_dir(config: TrainConfig, family: "ModelFamily", folder: OutputFolder, resumed: ckpt.Checkpoint | None,
                      resume_path: Path | None, validations: list["ValidationPrompt"]) -> None:
    """Main process, before the first step: tidy the folder, then claim every file the run will write, so that a
    user's file in the way ends the run now rather than after all its steps."""
    tidy_output_dir(config, folder, resumed, resume_path)
    folder.claim(*planned_outputs(config, resumed.step if resumed else 0, validations))
    if config.train_mode == "full":  # a pipeline folder (and weak/, best/): its files are named as they are saved
        in_the_way = full.pipeline_parts(config, family)
    else:  # best/ is written only if a scoring passes the floor: checked now, claimed when written
        in_the_way = [lora_file(BEST_DIR).as_posix(), scoring.BEST_SCORE_NAME] if config.keep_best else []
    users = folder.users_files(*in_the_way)
    if users:
        raise BoothkitError(f"'{folder.root / users[0]}' is in the way of the model this run saves there and "
                            "boothkit did not write it: move it, or choose another --output_dir")
    weak_file = WEAK_LORA if config.train_mode == "lora" else Path(WEAK_DIR) / family.denoiser_name / "config.json"
    if resumed is not None and 0 < config.resolved_weak_step <= resumed.step and not folder.owns(weak_file):
        log.warning("'%s' gets no weak LoRA: its step (%d) precedes the resumed step %d; copy the weak/ of the run "
                    "that wrote %s", folder.root, config.resolved_weak_step, resumed.step, resume_path)


def tidy_output_dir(config: TrainConfig, folder: OutputFolder, resumed: ckpt.Checkpoint | None,
                     resume_path: Path | None) -> None:
    """Main process only: what an earlier run left that this run must not mix with its own outputs. Only
    boothkit's files (the manifest's) are removed; a user's file beside them stays. A checkpoint of another
    folder's run starts this folder afresh (`train` let it in only when the folder is empty or --overwrite)."""
    if resumed is None or not ckpt.is_own_checkpoint(folder.root, resume_path):
        if resumed is None and config.resume_from_checkpoint:
            log.info("no checkpoint to resume in '%s': starting a new run", folder.root)
        if config.overwrite:
            removed = folder.clear()
            if removed:
                log.info("--overwrite: removed the %d files of the earlier run in '%s'", removed, folder.root)
        return
    folder.remove_staging()  # what a killed run was writing
    for name in ckpt.remove_checkpoints_after(folder, resumed.step):
        # the abandoned continuation of the run resumed from an older checkpoint
        log.info("removing %s: it is newer than the checkpoint this run resumes from", name)
