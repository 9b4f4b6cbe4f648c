"""Atomic file output: every file is written under a temporary name and renamed into place.

A reader (or a resumed run after `kill -9`) therefore sees either the old file or the complete new one,
never a half-written file. Which files a command may write, and delete, is `boothkit.layout`'s business.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from boothkit.layout import TMP_PREFIX


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path beside `target`; on success publish it as `target` (a file or a folder).

    The staging name starts with `.boothkit-tmp-`, so a run killed midway leaves nothing that could be taken
    for a result, and `--overwrite` recognises the leftover as boothkit's. Permissions follow the user's umask
    (`tempfile` and safetensors would leave 0600).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}.{secrets.token_hex(4)}"
    try:
        yield tmp
        publish(tmp, target)
    finally:
        if tmp.exists():
            remove_staging(tmp)


def publish(staging: Path, target: Path) -> None:
    """Move a finished staging file or folder onto `target`, with umask permissions, durably.

    A folder replaces a missing target in one rename. Onto an existing folder (which may hold a user's file,
    never to be deleted) its files are moved one by one, `.json` files last: a checkpoint's `state.json` or an
    evaluation's `scores.json` marks it complete only once everything else is there.
    """
    apply_umask(staging)
    if staging.is_dir() and target.is_dir():
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".json", str(p)))
        for file in files:
            destination = target / file.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, destination)
        remove_staging(staging)
    else:
        os.replace(staging, target)
    _fsync_dir(target.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give a staged file (or every entry of a staged folder) the permissions a plain `open` would give."""
    mask = _umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


def remove_staging(path: Path) -> None:
    """Delete a staging file or folder (always boothkit's own: its name starts with `.boothkit-tmp-`)."""
    if not path.name.startswith(TMP_PREFIX):
        raise ValueError(f"not a staging path: {path}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def write_json_atomic(target: str | os.PathLike, data: object) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_image_atomic(image, target: str | os.PathLike, text: dict[str, str] | None = None) -> None:
    """Save a PIL image; the format follows the target's suffix. `text`: PNG text chunks (e.g. A1111's
    `parameters`)."""
    target = Path(target)
    options = {}
    if text and _pil_format(target.suffix) == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        options["pnginfo"] = info
    with atomic_path(target) as tmp:
        image.save(tmp, format=_pil_format(target.suffix), **options)


def _pil_format(suffix: str) -> str:
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(suffix.lower(), "PNG")
