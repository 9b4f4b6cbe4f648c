"""Resumable training state in `output_dir/checkpoint-N/`, written atomically.

A checkpoint holds the trainable (LoRA) tensors in safetensors, the optimizer, LR-schedule and
grad-scaler states (`torch.save`, read back with `weights_only=True`) and `state.json`. It is assembled in
a `.boothkit-tmp-` folder and renamed into place (`state.json` last), so `latest` never picks a half-written
checkpoint. Its files are claimed in the output folder's manifest first, and pruning removes only those
(`boothkit.layout`). No RNG state is needed: training draws are keyed by step (see `boothkit.seeding`).
`state.json` also records the run's identity (`boothkit.train.run_identity`), which a resume must match.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from boothkit.errors import BoothkitError
from boothkit.io import atomic_path
from boothkit.layout import CHECKPOINT_PREFIX, OutputFolder, checkpoint_name, read_manifest
from boothkit.formats.lora import check_finite

_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
STATE_NAME = "state.json"
OPTIMIZER_NAME = "optimizer.pt"
EMA_NAME = "ema.safetensors"


@dataclass
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    lr_scheduler: dict
    grad_scaler: dict | None
    info: dict
    ema: dict[str, torch.Tensor] | None = None  # `--use_ema`'s state (boothkit.train.full.ema_state)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _file_names(checkpoint: Checkpoint) -> list[str]:
    names = ["trainable.safetensors", OPTIMIZER_NAME, "lr_scheduler.pt"]
    if checkpoint.grad_scaler is not None:
        names.append("grad_scaler.pt")
    if checkpoint.ema is not None:
        names.append(EMA_NAME)
    return names + [STATE_NAME]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def save_checkpoint(folder: OutputFolder, checkpoint: Checkpoint, total_limit: int | None,
                    optimizer_in_latest_only: bool = False) -> Path:
    """Write `checkpoint-N/` (its files claimed in `folder`'s manifest first), then keep the newest
    `total_limit` checkpoints. Non-finite weights or optimizer moments are refused (one line). With
    `optimizer_in_latest_only` (full fine-tuning: the optimizer state is twice the model) older checkpoints
    lose their optimizer state: they keep their weights, and only the latest resumes."""
    name = checkpoint_name(checkpoint.step)
    check_finite(checkpoint.trainable, f"checkpoint {name}")
    optimizer_tensors = {str(i): t for i, t in enumerate(_tensors(checkpoint.optimizer.get("state", {})))}
    check_finite(optimizer_tensors, f"the optimizer state of checkpoint {name}")
    folder.claim(*(f"{name}/{file}" for file in _file_names(checkpoint)))
    target = folder.root / name
    with atomic_path(target) as staging:
        staging.mkdir()
        save_file(checkpoint.trainable, staging / "trainable.safetensors")
        torch.save(checkpoint.optimizer, staging / OPTIMIZER_NAME)
        if checkpoint.ema is not None:
            save_file(checkpoint.ema, staging / EMA_NAME)
        torch.save(checkpoint.lr_scheduler, staging / "lr_scheduler.pt")
        if checkpoint.grad_scaler is not None:
            torch.save(checkpoint.grad_scaler, staging / "grad_scaler.pt")
        info = dict(checkpoint.info, step=checkpoint.step)
        (staging / STATE_NAME).write_text(json.dumps(info, indent=2) + "\n")
        for file in staging.iterdir():  # durable before the rename makes the checkpoint visible
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if total_limit is not None:
        for _, old in list_checkpoints(folder.root)[:-total_limit]:
            folder.remove(old.name)
    if optimizer_in_latest_only:
        for _, old in list_checkpoints(folder.root)[:-1]:
            folder.remove(f"{old.name}/{OPTIMIZER_NAME}")
    return target


def remove_checkpoints_after(folder: OutputFolder, step: int) -> list[str]:
    """Remove (boothkit's files of) the checkpoints newer than `step`: the abandoned continuation of a run
    resumed from an older checkpoint. Returns their names."""
    removed = [path.name for later, path in list_checkpoints(folder.root) if later > step]
    for name in removed:
        folder.remove(name)
    return removed


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if (path / STATE_NAME).is_file() and not (path / OPTIMIZER_NAME).is_file():
        raise BoothkitError(f"checkpoint '{path}' keeps the weights only (a full run keeps the optimizer state in "
                            "its latest checkpoint): resume from the latest one")
    try:
        info = json.loads((path / STATE_NAME).read_text())
        scaler_file, ema_file = path / "grad_scaler.pt", path / EMA_NAME
        return Checkpoint(
            step=int(info["step"]),
            trainable=load_file(path / "trainable.safetensors"),
            optimizer=torch.load(path / OPTIMIZER_NAME, map_location="cpu", weights_only=True),
            lr_scheduler=torch.load(path / "lr_scheduler.pt", map_location="cpu", weights_only=True),
            grad_scaler=torch.load(scaler_file, weights_only=True) if scaler_file.exists() else None,
            info=info,
            ema=load_file(ema_file) if ema_file.exists() else None,
        )
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as error:
        raise BoothkitError(f"checkpoint '{path}' is unreadable: {str(error).splitlines()[0]}") from None


def is_own_checkpoint(output_dir: str | Path, checkpoint: Path) -> bool:
    """True when `checkpoint` was written by the run in `output_dir` (it lies there and the folder's manifest lists
    it). A checkpoint from another folder, or one copied in, belongs to another run: resuming it must not add to
    this folder's outputs (`weak/`, older checkpoints and log rows of the earlier run would stay)."""
    root = Path(output_dir).expanduser()
    if checkpoint.resolve().parent != root.resolve():
        return False
    manifest = read_manifest(root)
    return manifest is not None and f"{checkpoint.name}/{STATE_NAME}" in manifest["files"]


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
    if not (candidate / STATE_NAME).is_file():
        raise BoothkitError(f"--resume_from_checkpoint '{spec}' is not a boothkit checkpoint folder")
    return candidate
