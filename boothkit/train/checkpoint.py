"""Resumable training state in `output_dir/checkpoint-N/`, written atomically.

A checkpoint holds the trainable (LoRA) tensors in safetensors, the optimizer, LR-schedule and
grad-scaler states (`torch.save`, read back with `weights_only=True`) and `state.json`. It is assembled in
a hidden folder and renamed into place, so `latest` never picks a half-written checkpoint. No RNG state
is needed: training draws are keyed by step (see `boothkit.seeding`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from boothkit.errors import BoothkitError
from boothkit.io import atomic_path

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    lr_scheduler: dict
    grad_scaler: dict | None
    info: dict


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(output_dir: str | Path, checkpoint: Checkpoint, total_limit: int | None) -> Path:
    target = Path(output_dir) / f"{PREFIX}{checkpoint.step}"
    with atomic_path(target) as staging:
        staging.mkdir()
        save_file(checkpoint.trainable, staging / "trainable.safetensors")
        torch.save(checkpoint.optimizer, staging / "optimizer.pt")
        torch.save(checkpoint.lr_scheduler, staging / "lr_scheduler.pt")
        if checkpoint.grad_scaler is not None:
            torch.save(checkpoint.grad_scaler, staging / "grad_scaler.pt")
        info = dict(checkpoint.info, step=checkpoint.step)
        (staging / "state.json").write_text(json.dumps(info, indent=2) + "\n")
        for file in staging.iterdir():  # durable before the rename makes the checkpoint visible
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if total_limit is not None:
        for _, old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        info = json.loads((path / "state.json").read_text())
        scaler_file = path / "grad_scaler.pt"
        return Checkpoint(
            step=int(info["step"]),
            trainable=load_file(path / "trainable.safetensors"),
            optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            lr_scheduler=torch.load(path / "lr_scheduler.pt", map_location="cpu", weights_only=True),
            grad_scaler=torch.load(scaler_file, weights_only=True) if scaler_file.exists() else None,
            info=info,
        )
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as error:
        raise BoothkitError(f"checkpoint '{path}' is unreadable: {str(error).splitlines()[0]}") from None


def resolve_resume(output_dir: str | Path, spec: str | None) -> Path | None:
    """`latest` → newest complete checkpoint (None if there is none); otherwise a folder (name or path)."""
    if not spec:
        return None
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    candidate = Path(spec)
    if not candidate.is_dir():
        candidate = Path(output_dir) / spec
    if not (candidate / "state.json").is_file():
        raise BoothkitError(f"--resume_from_checkpoint '{spec}' is not a boothkit checkpoint folder")
    return candidate
