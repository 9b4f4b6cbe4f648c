"""Writing into the evaluation folder from every process, and the content-keyed cache of evaluations.

The main process holds the folder's lock (`layout.OutputFolder`) and claims every path in the manifest before
writing it. Other processes (subjects split across processes) hold no lock: they claim each path in their own
side manifest (`layout.RankClaims`) before writing it, so every file boothkit wrote is accounted for even when
the run is killed before the processes meet again (a rerun reuses those files, `--overwrite` removes them).

Cache entries live at `cache/<folder>/<key>/`: the images (with `--class_prompt_samples`, the class-prompt
samples too) and `scores.json` (an `Evaluation`), published atomically, `scores.json` last; an entry is complete
when `scores.json` holds every metric of `results.METRICS` and every image it lists exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from PIL import Image

from boothkit import layout
from boothkit.evaluate.results import METRICS, Evaluation
from boothkit.io import atomic_path

CACHE_DIR = "cache"
SCORES_NAME = "scores.json"
SUBJECTS_DIR = "subjects"  # subjects/<method>/<folder>.json: each process's results, merged by the main process


class Writer:
    """Paths this process may write in the evaluation folder `root` (relative paths, POSIX style): claimed in
    the manifest (the main process's locked `OutputFolder`) or in this process's side manifest (`RankClaims`)."""

    def __init__(self, root: Path, claims: layout.OutputFolder | layout.RankClaims):
        self.root = root
        self.claims = claims

    def claim(self, *relatives: str | PurePosixPath) -> list[Path]:
        return self.claims.claim(*relatives)


class CacheStore:
    """Evaluations by key, under `cache/<folder>/<key>/`."""

    def __init__(self, writer: Writer):
        self.writer = writer

    @staticmethod
    def entry(folder: str, key: str) -> PurePosixPath:
        """An entry's folder, relative to the evaluation folder."""
        return PurePosixPath(CACHE_DIR, folder, key)

    def path(self, folder: str, key: str) -> Path:
        return self.writer.root / self.entry(folder, key)

    def load(self, folder: str, key: str) -> Evaluation | None:
        """The cached evaluation, or None when the entry is missing or incomplete."""
        scores = self.path(folder, key) / SCORES_NAME
        if not scores.is_file():
            return None
        try:
            evaluation = Evaluation.from_json(json.loads(scores.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # damaged: evaluated again and replaced
        if evaluation.key != key or not set(METRICS) <= set(evaluation.scores):
            return None  # another entry's, or written by a boothkit without some metric: evaluated again
        if not all((scores.parent / name).is_file() for name in evaluation.images + evaluation.class_images):
            return None
        return evaluation

    def files(self, folder: str, evaluation: Evaluation) -> list[PurePosixPath]:
        """The entry's files, relative to the evaluation folder (`scores.json` last)."""
        entry = self.entry(folder, evaluation.key)
        return [entry / name for name in evaluation.images + evaluation.class_images] + [entry / SCORES_NAME]

    def store(self, folder: str, evaluation: Evaluation, images: dict[str, Image.Image]) -> None:
        """Write an entry: `images` by file name, then `scores.json`."""
        self.writer.claim(*self.files(folder, evaluation))
        with atomic_path(self.path(folder, evaluation.key)) as staging:
            staging.mkdir()
            for name in evaluation.images + evaluation.class_images:
                images[name].save(staging / name, format="PNG")
            with open(staging / SCORES_NAME, "w", encoding="utf-8") as handle:
                json.dump(evaluation.to_json(), handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
