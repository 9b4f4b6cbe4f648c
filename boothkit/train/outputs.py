"""The training output folder: guarding earlier results, the resolved config, and the loss log."""

from __future__ import annotations

import csv
import io
import shutil
from importlib import metadata
from pathlib import Path

from boothkit.io import guard_output_dir, write_json_atomic, write_text_atomic
from boothkit.train.checkpoint import list_checkpoints
from boothkit.train.config import TrainConfig
from boothkit.train.lora import LORA_WEIGHT_NAME

LOG_NAME = "train_log.csv"
CONFIG_NAME = "train_config.json"
WEAK_DIR = "weak"
VALIDATION_DIR = "validation"
_LIBRARIES = ("boothkit", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


def check_output_dir(config: TrainConfig, resuming: bool) -> Path:
    """Refuse to write into a non-empty folder unless the user asked to overwrite or there is a run to resume."""
    if config.resume_from_checkpoint:
        hint = "has no checkpoint to resume and is not empty; pass --overwrite to start a new run there"
    else:
        hint = ("is not empty; pass --overwrite to replace its outputs or --resume_from_checkpoint latest "
                "to continue the run")
    return guard_output_dir(config.output_dir, config.overwrite or resuming, hint)


def clear_previous_outputs(output_dir: Path) -> None:
    """With --overwrite: remove what an earlier boothkit run wrote (and nothing else)."""
    for _, checkpoint in list_checkpoints(output_dir):
        shutil.rmtree(checkpoint)
    for name in (WEAK_DIR, VALIDATION_DIR):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in (LORA_WEIGHT_NAME, LOG_NAME, CONFIG_NAME):
        (output_dir / name).unlink(missing_ok=True)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_train_config(output_dir: Path, config: TrainConfig, resolved: dict) -> None:
    write_json_atomic(output_dir / CONFIG_NAME, {
        "config": config.model_dump(), "resolved": resolved, "versions": library_versions(),
    })


class TrainLog:
    """`train_log.csv` (step, loss, lr); a resumed run keeps the rows up to its checkpoint and goes on."""

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
