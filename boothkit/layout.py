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
import fcntl
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
BEST_DIR = "best"  # --keep_best: the model of the best validation scoring
CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_CONFIG_NAME = "train_config.json"
TRAIN_LOG_NAME = "train_log.csv"
VALIDATION_DIR = "validation"
VALIDATION_PROMPTS_NAME = "validation/prompts.json"  # which prompt each validation folder shows (several prompts)
LOGS_DIR = "logs"  # `--report_to`: TensorBoard event files / W&B's folder
SAMPLES_NAME = "samples.json"
MANIFEST_NAME = ".boothkit-manifest.json"
RANK_MANIFEST_GLOB = ".boothkit-manifest.rank*.json"  # what other ranks of a distributed run claimed
LOCK_NAME = ".boothkit.lock"
TMP_PREFIX = ".boothkit-tmp-"  # staging files and folders; unmistakably boothkit's, removed by --overwrite
_OWN_FILES = (MANIFEST_NAME, LOCK_NAME)


def lora_file(path: str | os.PathLike) -> Path:
    """The LoRA file of a LoRA folder (a training output folder, or its `weak/`), or `path` itself when it is a
    file: the one rule for "a LoRA folder or file" everywhere."""
    path = Path(path).expanduser()
    return path if path.is_file() else path / LORA_WEIGHT_NAME


def check_output_file(path: str | os.PathLike, *, overwrite: bool, suffixes: tuple[str, ...] = (".safetensors",)
                      ) -> Path:
    """A one-file output (`export`, `merge`): a path ending in one of `suffixes` (default `.safetensors`) whose
    folder exists or can be made. An existing file is replaced only when boothkit wrote it (its metadata says so)
    and `--overwrite` is given; a file boothkit did not write is never replaced."""
    from boothkit.formats.metadata import written_by_boothkit

    target = Path(path).expanduser()
    if target.suffix.lower() not in suffixes:
        raise BoothkitError(f"--output '{path}' must be a {' or '.join(suffixes)} file")
    if target.is_dir():
        raise BoothkitError(f"--output '{path}' is a folder; give a file name")
    if target.exists() or target.is_symlink():
        if not written_by_boothkit(target):
            raise BoothkitError(f"'{path}' exists and boothkit did not write it; it is left as it is: choose "
                                "another --output")
        if not overwrite:
            raise BoothkitError(f"'{path}' exists (boothkit wrote it); pass --overwrite to replace it")
    if target.parent.exists() and not target.parent.is_dir():
        raise BoothkitError(f"cannot write '{path}': '{target.parent}' is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def weak_dir(lora_dir: str | os.PathLike) -> Path:
    """The weak (under-trained) LoRA of a training run, for autoguidance: `LORA_DIR/weak/`."""
    return Path(lora_dir) / WEAK_DIR


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


# Checking a folder before writing --------------------------------------------------------------------------

def read_manifest(root: Path) -> dict | None:
    """The manifest of `root` (with what other ranks recorded in their side manifests, see `RankClaims`), or
    None when boothkit never wrote there."""
    manifests = [path for path in [root / MANIFEST_NAME, *sorted(root.glob(RANK_MANIFEST_GLOB))] if path.is_file()]
    if not manifests:
        return None
    command, files = None, set()
    for path in manifests:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            command = command or str(data["command"])
            files.update(str(name) for name in data["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise BoothkitError(f"'{path}' is damaged; boothkit cannot tell its files from yours there") from None
    return {"command": command, "files": sorted(files)}


def _refuse_users_file(root: Path, name: str, files: set[str]) -> None:
    target = root / name
    if (target.exists() or target.is_symlink()) and name not in files:
        raise BoothkitError(f"will not replace '{target}': boothkit did not write it (move it away, or choose "
                            "another output_dir)")


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
        self._lock_fd: int | None = None
        self._new_manifest = False

    # Lock ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "OutputFolder":
        self.root.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            manifest = read_manifest(self.root)
            if manifest is not None and manifest["command"] != self.command:
                raise BoothkitError(f"output_dir '{self.root}' holds the output of `boothkit {manifest['command']}`")
            self.files = set(manifest["files"]) if manifest else set()
            self._new_manifest = manifest is None
            self.absorb_ranks()
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._new_manifest and not self.files:  # this run wrote nothing here: leave no trace of boothkit
            (self.root / MANIFEST_NAME).unlink(missing_ok=True)
        self._release_lock()

    def _take_lock(self) -> None:
        """An exclusive `flock` on `.boothkit.lock`, which the kernel drops when the holder dies however it
        dies; the file records who holds it, for the message a second run prints."""
        lock = self.root / LOCK_NAME
        for _ in range(10):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise BoothkitError(f"output_dir '{self.root}' is in use by {_describe(holder)}; wait for it to "
                                    "finish or stop it") from None
            if _inode(lock) != os.fstat(fd).st_ino:  # the holder released (and removed) it meanwhile: again
                os.close(fd)
                continue
            try:
                self._check_recorded_holder(_holder(fd))
            except BaseException:
                os.close(fd)  # refused: the lock file and its record stay as they were
                raise
            self._lock_fd = fd
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            return
        raise BoothkitError(f"output_dir '{self.root}' is being locked and released by other runs; try again")

    def _check_recorded_holder(self, holder: dict | None) -> None:
        """The lock is ours; the record left in the file is a run that ended without releasing it (killed), or
        one that holds no flock: another host (network file systems need not share locks) or a live process."""
        if not holder:
            return
        pid, host = holder.get("pid"), holder.get("host")
        if host != socket.gethostname():
            raise BoothkitError(f"output_dir '{self.root}' is locked by {_describe(holder)}; if that run is gone, "
                                f"delete {self.root / LOCK_NAME}")
        if isinstance(pid, int) and pid != os.getpid() and _process_alive(pid):
            raise BoothkitError(f"output_dir '{self.root}' is in use by {_describe(holder)}; wait for it to "
                                f"finish or stop it (if no boothkit run is there, delete {self.root / LOCK_NAME})")
        log.warning("taking over the lock of '%s' from %s, which is no longer running", self.root, _describe(holder))

    def _release_lock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is None:
            return
        self._lock_fd = None
        lock = self.root / LOCK_NAME
        if _inode(lock) == os.fstat(fd).st_ino:
            lock.unlink(missing_ok=True)  # still locked by us: nobody else can have replaced it
        os.close(fd)  # releases the flock

    # Manifest --------------------------------------------------------------------------------------------
    def _save_manifest(self) -> None:
        from boothkit.io import write_json_atomic

        write_json_atomic(self.root / MANIFEST_NAME, {"command": self.command, "files": sorted(self.files)})

    def owns(self, relative: str | os.PathLike) -> bool:
        return Path(relative).as_posix() in self.files

    def claim(self, *relatives: str | os.PathLike) -> list[Path]:
        """Paths to write: each must be new or boothkit's own; recorded in the manifest before any write."""
        names = self.check_writable(*relatives)
        new = set(names) - self.files
        if new:
            self.files |= new
            self._save_manifest()
        return [self.root / name for name in names]

    def adopt(self, staging: Path, prefix: str | os.PathLike = "") -> list[Path]:
        """Move every file of `staging` (a folder boothkit just wrote, e.g. by `save_pretrained`) to `prefix/`
        here, each claimed first (a user's file in the way is refused before any is moved); boothkit's
        files of an earlier save under `prefix` that the new one lacks are removed."""
        files = sorted(path.relative_to(staging) for path in Path(staging).rglob("*") if path.is_file())
        targets = [Path(prefix) / relative for relative in files]
        self.claim(*targets)
        new = {target.as_posix() for target in targets}
        stale = [name for name in self.files if name.startswith(Path(prefix).as_posix().rstrip("/") + "/")
                 and name not in new] if str(prefix) not in ("", ".") else []
        for name in stale:
            self.remove(name)
        for relative, target in zip(files, targets):
            destination = self.root / target
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(staging) / relative, destination)
        return [self.root / target for target in targets]

    def record_created(self, relative_folder: str | os.PathLike, existing: set[str]) -> list[str]:
        """Record the files a library has just created under `relative_folder` with names it chose itself (TensorBoard's
        `events.out.tfevents.<time>.<host>.<pid>.<n>`), which cannot be claimed before they exist: every file there
        that was not in `existing` (`files_under` just before the library started) and is not yet recorded. A file
        that was there before, a user's, is never taken. Returns the names recorded."""
        new = sorted(set(self.files_under(relative_folder)) - set(existing) - self.files)
        if new:
            self.files |= set(new)
            self._save_manifest()
        return new

    def files_under(self, relative_folder: str | os.PathLike) -> list[str]:
        """Names (relative to the root) of the files under `relative_folder`, boothkit's own files aside."""
        folder = self.root / relative_folder
        return sorted(path.relative_to(self.root).as_posix() for path in folder.rglob("*")
                      if (path.is_file() or path.is_symlink()) and not _is_own(path.name)) if folder.is_dir() else []

    def users_files(self, *prefixes: str) -> list[str]:
        """Files under `prefixes` (relative paths of files or folders) that boothkit did not write here."""
        found = []
        for prefix in prefixes:
            path = self.root / prefix
            candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
            found += [p.relative_to(self.root).as_posix() for p in candidates
                      if p.relative_to(self.root).as_posix() not in self.files and not _is_own(p.name)]
        return found

    def check_writable(self, *relatives: str | os.PathLike) -> list[str]:
        """Refuse, before anything is written, paths that hold a user's file; returns the names."""
        names = [Path(relative).as_posix() for relative in relatives]
        for name in names:
            _refuse_users_file(self.root, name, self.files)
        return names

    def path(self, relative: str | os.PathLike) -> Path:
        """`claim` for one path."""
        return self.claim(relative)[0]

    def absorb_ranks(self) -> None:
        """Fold what other ranks claimed (their side manifests, `RankClaims`) into this manifest, and remove the
        side manifests (call after the barrier that ends their writing)."""
        sides = sorted(self.root.glob(RANK_MANIFEST_GLOB))
        for side in sides:
            try:
                self.files |= set(json.loads(side.read_text(encoding="utf-8"))["files"])
            except (OSError, ValueError, KeyError, TypeError):
                raise BoothkitError(f"'{side}' is damaged; boothkit cannot tell its files from yours there") from None
        self._save_manifest()
        for side in sides:
            side.unlink(missing_ok=True)

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
        """Remove staging files a killed run left (`.boothkit-tmp-*`, always boothkit's own) in this folder and
        the folders its manifest names — not in nested output folders of other runs (they have their own
        manifest or lock, and may be writing right now)."""
        from boothkit.io import remove_staging

        folders = {self.root} | {(self.root / name).parent for name in self.files}
        for folder in folders:
            if folder != self.root and ((folder / MANIFEST_NAME).exists() or (folder / LOCK_NAME).exists()):
                continue
            for path in folder.glob(f"{TMP_PREFIX}*") if folder.is_dir() else []:
                if not path.name.startswith(f"{TMP_PREFIX}lock"):
                    remove_staging(path)

    def clear(self) -> int:
        """--overwrite: remove everything boothkit wrote here (and its staging leftovers), nothing else."""
        self.remove_staging()
        return self.remove("")

    def folder(self, relative: str | os.PathLike) -> "SubFolder":
        return SubFolder(self, Path(relative))


class RankClaims:
    """What a process that does not hold the folder's lock (another rank of a distributed run) writes there.

    Each path is recorded in the rank's side manifest, `.boothkit-manifest.rank<N>.json`, before it is written
    (a user's file is refused as `OutputFolder.claim` refuses it). `read_manifest` counts side manifests, and the
    next `OutputFolder` of the folder folds them into the manifest: a run killed before its main process saw
    these files still leaves every one of them accounted for, so a rerun reuses them and `--overwrite` removes them.
    """

    def __init__(self, root: str | os.PathLike, rank: int, command: str | None = None):
        self.root = Path(root).expanduser()
        self.side = self.root / RANK_MANIFEST_GLOB.replace("*", str(int(rank)))
        manifest = read_manifest(self.root)
        self.command = command or (manifest["command"] if manifest else "evaluate")
        self.files: set[str] = set()
        if self.side.is_file():
            self.files = set(json.loads(self.side.read_text(encoding="utf-8")).get("files", []))

    def claim(self, *relatives: str | os.PathLike) -> list[Path]:
        from boothkit.io import write_json_atomic

        manifest = read_manifest(self.root)
        known = (set(manifest["files"]) if manifest else set()) | self.files
        names = [Path(relative).as_posix() for relative in relatives]
        for name in names:
            _refuse_users_file(self.root, name, known)
        if set(names) - self.files:
            self.files |= set(names)
            write_json_atomic(self.side, {"command": self.command, "files": sorted(self.files)})
        return [self.root / name for name in names]


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
    return name in _OWN_FILES or name.startswith(TMP_PREFIX) or Path(name).match(RANK_MANIFEST_GLOB)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _holder(fd: int) -> dict | None:
    """The run recorded in an open lock file (None when empty or unreadable)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another boothkit run"
    return f"`boothkit {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host {holder.get('host', '?')})"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
