"""The output folder of every command: its file names, the manifest of what boothkit wrote there, the
writer lock, and the only code that deletes files.

Rules (README "Safety"):

* A command writes into an output folder only through `OutputFolder`. Before a file is written its path
  (relative to the folder) is recorded in the folder's manifest, `.boothkit-manifest.json`, together with the
  command that owns the folder.
* A file that exists but is not in the manifest is the user's: boothkit never replaces or deletes it, with or
  without `--overwrite` (writing onto it is an error).
* `--overwrite` removes only the files in the manifest (and folders that this leaves empty), never a user's
  file that sits beside them (`validation/notes.txt`, `checkpoint-10/mine.png`, a photo ...).
* An existing, non-empty folder without a manifest was not written by boothkit: refused unless
  `--overwrite` (and then boothkit writes beside the user's files, replacing none of them).
* One writer per folder: `.boothkit.lock` holds the writer's pid, host and command. A second run exits with one
  line naming the holder; a lock whose process is dead (same host) is taken over with a notice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from boothkit.errors import BoothkitError

log = logging.getLogger(__name__)

# File names of the outputs -------------------------------------------------------------------------------
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
WEAK_DIR = "weak"
CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_CONFIG_NAME = "train_config.json"
TRAIN_LOG_NAME = "train_log.csv"
VALIDATION_DIR = "validation"
SAMPLES_NAME = "samples.json"
MANIFEST_NAME = ".boothkit-manifest.json"
LOCK_NAME = ".boothkit.lock"
TMP_PREFIX = ".boothkit-tmp-"  # staging files and folders; unmistakably boothkit's, removed by --overwrite
_OWN_FILES = (MANIFEST_NAME, LOCK_NAME)


def lora_file(folder: str | os.PathLike) -> Path:
    """The LoRA file of a LoRA folder (a training output folder, or its `weak/`)."""
    return Path(folder) / LORA_WEIGHT_NAME


def weak_dir(lora_dir: str | os.PathLike) -> Path:
    """The weak (under-trained) LoRA of a training run, for autoguidance: `LORA_DIR/weak/`."""
    return Path(lora_dir) / WEAK_DIR


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


# Checking a folder before writing --------------------------------------------------------------------------

def read_manifest(root: Path) -> dict | None:
    """The manifest of `root`, or None when boothkit never wrote there."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"command": str(data["command"]), "files": [str(name) for name in data["files"]]}
    except (OSError, ValueError, KeyError, TypeError):
        raise BoothkitError(f"'{path}' is damaged; boothkit cannot tell its files from yours there") from None


def check_output_folder(path: str | os.PathLike, command: str, *, overwrite: bool, reuse: bool = False,
                        hint: str = "pass --overwrite to replace its outputs") -> Path:
    """Refuse, with one line, an output folder this run must not write into. Reads only: safe on every rank.

    `reuse`: the command may add to its own earlier outputs (a resumed training, a cached evaluation).
    """
    root = Path(path).expanduser()
    for parent in [root, *root.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == root else f"is below '{parent}', which is a file"
                raise BoothkitError(f"output_dir '{root}' {where}")
            break
    if not root.is_dir() or not [entry for entry in root.iterdir() if not _is_own(entry.name)]:
        return root  # nothing there but, perhaps, a lock or staging files of a run that was killed
    manifest = read_manifest(root)
    if manifest is None:
        if not overwrite:
            raise BoothkitError(f"output_dir '{root}' is not empty and was not written by boothkit; choose another "
                                "folder, or pass --overwrite to write beside its files (none of them is removed)")
        return root
    if manifest["command"] != command:
        raise BoothkitError(f"output_dir '{root}' holds the output of `boothkit {manifest['command']}`; "
                            f"choose another folder for `boothkit {command}`")
    if not (overwrite or reuse):
        raise BoothkitError(f"output_dir '{root}' is not empty; {hint}")
    return root


# The folder a run writes ----------------------------------------------------------------------------------

class OutputFolder:
    """A locked output folder whose manifest lists every file boothkit wrote there (see the module doc).

    Use as a context manager on the process that writes (the main process): `with OutputFolder(path, "sample")`.
    """

    def __init__(self, path: str | os.PathLike, command: str):
        self.root = Path(path).expanduser()
        self.command = command
        self.files: set[str] = set()
        self._locked = False

    # Lock ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "OutputFolder":
        self.root.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        manifest = read_manifest(self.root)
        if manifest is not None and manifest["command"] != self.command:
            self._release_lock()
            raise BoothkitError(f"output_dir '{self.root}' holds the output of `boothkit {manifest['command']}`")
        self.files = set(manifest["files"]) if manifest else set()
        self._save_manifest()
        return self

    def __exit__(self, *exc_info) -> None:
        self._release_lock()

    def _take_lock(self) -> None:
        lock = self.root / LOCK_NAME
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                self._take_over_stale_lock(lock)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            self._locked = True
            return
        raise BoothkitError(f"output_dir '{self.root}' is being written by another run (lock {lock})")

    def _take_over_stale_lock(self, lock: Path) -> None:
        """Remove `lock` if its process is dead; otherwise refuse, naming the holder."""
        try:
            holder = json.loads(lock.read_text(encoding="utf-8"))
            pid, host, command = int(holder["pid"]), str(holder["host"]), str(holder.get("command", "?"))
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            raise BoothkitError(f"output_dir '{self.root}' has an unreadable lock file {lock}; delete it if no "
                                "boothkit run is writing there") from None
        if host != socket.gethostname():
            raise BoothkitError(f"output_dir '{self.root}' is locked by `boothkit {command}` (pid {pid} on host "
                                f"{host}); if that run is gone, delete {lock}")
        if _process_alive(pid):
            raise BoothkitError(f"output_dir '{self.root}' is in use by `boothkit {command}` (pid {pid} on host "
                                f"{host}); wait for it to finish or stop it")
        log.warning("taking over the lock of '%s' from `boothkit %s` (pid %d on %s), which is no longer running",
                    self.root, command, pid, host)
        stale = lock.with_name(f"{TMP_PREFIX}lock-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(lock, stale)  # atomic: of two runs taking over, only one removes the stale lock
            stale.unlink()

    def _release_lock(self) -> None:
        if self._locked:
            (self.root / LOCK_NAME).unlink(missing_ok=True)
            self._locked = False

    # Manifest --------------------------------------------------------------------------------------------
    def _save_manifest(self) -> None:
        from boothkit.io import write_json_atomic

        write_json_atomic(self.root / MANIFEST_NAME, {"command": self.command, "files": sorted(self.files)})

    def owns(self, relative: str | os.PathLike) -> bool:
        return Path(relative).as_posix() in self.files

    def claim(self, *relatives: str | os.PathLike) -> list[Path]:
        """Paths to write: each must be new or boothkit's own; recorded in the manifest before any write."""
        names = [Path(relative).as_posix() for relative in relatives]
        for name in names:
            target = self.root / name
            if (target.exists() or target.is_symlink()) and name not in self.files:
                raise BoothkitError(f"will not replace '{target}': boothkit did not write it (move it away, or "
                                    "choose another output_dir)")
        new = set(names) - self.files
        if new:
            self.files |= new
            self._save_manifest()
        return [self.root / name for name in names]

    def path(self, relative: str | os.PathLike) -> Path:
        """`claim` for one path."""
        return self.claim(relative)[0]

    def adopt(self, *relatives: str | os.PathLike) -> None:
        """Record files that this run's other processes wrote (they hold no lock and keep no manifest; before
        writing they checked `may_write` against the manifest on disk)."""
        new = {Path(relative).as_posix() for relative in relatives} - self.files
        if new:
            self.files |= new
            self._save_manifest()

    # Deleting (only what the manifest lists) -------------------------------------------------------------
    def remove(self, prefix: str | os.PathLike = "") -> int:
        """Remove boothkit's files at or below `prefix` ("" = all), then folders this left empty. Returns the
        count of files removed. A user's file is never touched, nor the folders that hold one."""
        prefix = Path(prefix).as_posix() if str(prefix) else ""
        doomed = sorted(name for name in self.files
                        if not prefix or name == prefix or name.startswith(prefix.rstrip("/") + "/"))
        folders = set()
        for name in doomed:
            (self.root / name).unlink(missing_ok=True)
            folders.update(parent for parent in Path(name).parents if str(parent) != ".")
        self.files -= set(doomed)
        self._save_manifest()
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty (a user's file is there) or already gone
                (self.root / folder).rmdir()
        return len(doomed)

    def remove_staging(self) -> None:
        """Remove staging files a killed run left (`.boothkit-tmp-*`, always boothkit's own)."""
        from boothkit.io import remove_staging

        for path in sorted(self.root.rglob(f"{TMP_PREFIX}*"), key=lambda p: len(p.parts), reverse=True):
            if path.name.startswith(TMP_PREFIX):
                remove_staging(path)

    def clear(self) -> int:
        """--overwrite: remove everything boothkit wrote here (and its staging leftovers), nothing else."""
        self.remove_staging()
        return self.remove("")

    def folder(self, relative: str | os.PathLike) -> "SubFolder":
        return SubFolder(self, Path(relative))


def may_write(root: str | os.PathLike, relative: str | os.PathLike) -> bool:
    """For processes that do not hold the folder's lock (other ranks of a distributed run): True when the path
    is new or boothkit's own according to the manifest on disk."""
    root = Path(root).expanduser()
    target = root / relative
    if not (target.exists() or target.is_symlink()):
        return True
    manifest = read_manifest(root)
    return manifest is not None and Path(relative).as_posix() in manifest["files"]


class SubFolder:
    """A folder inside an `OutputFolder` (e.g. `weak/`, `checkpoint-100/`): claims paths relative to itself."""

    def __init__(self, owner: OutputFolder, relative: Path):
        self.owner = owner
        self.relative = relative

    @property
    def root(self) -> Path:
        return self.owner.root / self.relative

    def path(self, name: str) -> Path:
        return self.owner.path(self.relative / name)

    def claim(self, *names: str) -> list[Path]:
        return self.owner.claim(*(self.relative / name for name in names))


def _is_own(name: str) -> bool:
    return name in _OWN_FILES or name.startswith(TMP_PREFIX)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
