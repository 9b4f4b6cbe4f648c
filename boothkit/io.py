"""Atomic file output: every file is written under a temporary name and renamed into place.

A reader (or a resumed run after `kill -9`) therefore sees either the old file or the complete new one,
never a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target` (file or folder)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates a file or a folder of that name
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def guard_output_dir(path: str | os.PathLike, may_write_into: bool, hint: str) -> Path:
    """`path` as a folder to write into: refuse a file, and a non-empty folder unless `may_write_into`."""
    from boothkit.errors import BoothkitError

    output_dir = Path(path)
    if output_dir.exists() and not output_dir.is_dir():
        raise BoothkitError(f"output_dir '{output_dir}' exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not may_write_into:
        raise BoothkitError(f"output_dir '{output_dir}' {hint}")
    return output_dir


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


def save_image_atomic(image, target: str | os.PathLike) -> None:
    """Save a PIL image; the format follows the target's suffix."""
    target = Path(target)
    with atomic_path(target) as tmp:
        image.save(tmp, format=_pil_format(target.suffix))


def _pil_format(suffix: str) -> str:
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(suffix.lower(), "PNG")
