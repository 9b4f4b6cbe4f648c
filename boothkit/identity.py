"""Content identity: what a cached result, or a resumed run, depends on — by content, never by name or size.

One helper for every cache (evaluation results today; latents, masks, PDM features later) and for the
run identity a checkpoint records. Digests are SHA-256 of the bytes.

A file is read once for each (path, size, mtime, inode, ctime) it has — the stat signature git's index uses
too: any write, rename or `touch` of a file changes its ctime, which no user tool can set back, so the memo
never answers for changed content. The memo lives in the process and in `BOOTHKIT_CACHE_DIR` (default
`~/.cache/boothkit`)/`digests.json`, so a cached evaluation of a 5 GB model does not hash 5 GB again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

_CHUNK = 1 << 20
_MEMO_LIMIT = 50_000  # entries kept on disk
_memo: dict[str, str] | None = None


def cache_root() -> Path:
    """Where boothkit keeps what it computes once (`BOOTHKIT_CACHE_DIR`, default `~/.cache/boothkit`)."""
    return Path(os.environ.get("BOOTHKIT_CACHE_DIR") or Path.home() / ".cache" / "boothkit")


def _memo_file() -> Path:
    return cache_root() / "digests.json"


def _load_memo() -> dict[str, str]:
    global _memo
    if _memo is None:
        try:
            _memo = dict(json.loads(_memo_file().read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            _memo = {}
    return _memo


def _save_memo() -> None:
    from boothkit.io import write_json_atomic

    memo = _load_memo()
    try:  # merge what other processes saved meanwhile; a lost entry only costs one more read of a file
        memo = {**json.loads(_memo_file().read_text(encoding="utf-8")), **memo}
    except (OSError, ValueError, TypeError):
        pass
    kept = dict(list(memo.items())[-_MEMO_LIMIT:])
    with contextlib.suppress(OSError):  # a read-only home: the memo stays in the process
        write_json_atomic(_memo_file(), kept)


def file_digest(path: str | os.PathLike, save: bool = True) -> str:
    """SHA-256 (hex) of a file's bytes (`save=False`: the caller saves the memo once for many files)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"
    memo = _load_memo()
    if key not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        memo[key] = digest.hexdigest()
        if save:
            _save_memo()
    return memo[key]


def files_digest(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """One digest of several files: their names (relative to `root`, else the base name) and contents,
    independent of the order given."""
    entries, known = [], len(_load_memo())
    for path in paths:
        path = Path(path)
        name = path.relative_to(root).as_posix() if root is not None else path.name
        entries.append((name, file_digest(path, save=False)))
    if len(_load_memo()) != known:
        _save_memo()
    return value_digest(sorted(entries))


def folder_digest(folder: str | os.PathLike, skip_hidden: bool = True) -> str:
    """Digest of every regular file below `folder` (hidden files and folders skipped by default)."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()
             and not (skip_hidden and any(part.startswith(".") for part in p.relative_to(folder).parts))]
    return files_digest(files, root=folder)


def value_digest(value: Any) -> str:
    """Digest of a JSON-serialisable value (dict keys sorted; floats by repr, so 0.1 ≠ 0.1000001)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(source: str, revision: str | None = None, variant: str | None = None,
                   config_name: str = "model_index.json") -> dict:
    """What a model *is*, for cache keys and run records.

    A local folder: the digest of its files (configs, tokenizer files and weights), so a model rebuilt at the
    same path is a different model. A hub id: the commit the revision resolves to (from the local cache when
    offline), which pins every file of that snapshot.
    """
    path = Path(source).expanduser()
    if path.exists():
        return {"local": folder_digest(path) if path.is_dir() else file_digest(path), "variant": variant}
    return {"hub": source, "commit": _hub_commit(source, revision, config_name), "variant": variant}


def _hub_commit(repo_id: str, revision: str | None, config_name: str) -> str:
    """The commit hash a hub revision resolves to: the snapshot folder `hf_hub_download` returns is named so."""
    from huggingface_hub import hf_hub_download

    from boothkit.errors import BoothkitError, first_line

    try:
        config = Path(hf_hub_download(repo_id, config_name, revision=revision))
    except Exception as error:  # offline with nothing cached, unknown repo, no network ...
        raise BoothkitError(f"cannot resolve model '{repo_id}': {first_line(error)}") from None
    return config.parent.name if config.parent.parent.name == "snapshots" else file_digest(config)
