"""Scoring validation samples during training (`--validation_every N`) and keeping the best LoRA (`--keep_best`).

At steps N, 2N, ... and at the final step, `--num_validation_images` images of each validation prompt (the
instance prompt of each concept when no `--validation_prompt` is given) are sampled with the fixed validation
seed into `validation/` (the ordinary validation images) and scored with `boothkit.evaluate.metrics.SubjectMetrics`
against the concept's instance photos: DINO, CLIP-I and CLIP-T (the prompt without `--identifier`), averaged over
the prompts. Each scoring appends a row (step, DINO, CLIP-I, CLIP-T) to `validation_scores.csv` and, with
`--report_to`, the scalars `validation_scores/DINO`, ... to the tracker.

`--keep_best`: after each scoring, when its DINO is the best so far among the scorings whose CLIP-T is at least
`--min_clip_t` (no floor by default), the LoRA of that step goes to `best/` with `best/score.json` (step and
scores). With `--train_mode full`, `best/` is a pipeline folder like the output folder (the trained modules of that
step, with `--use_ema` their average; the other components the base model's: `train.full.save_best`), so that
`boothkit sample --pretrained_model_name_or_path OUT/best`, `evaluate --lora_dir OUT/best` and diffusers take it as
they take the run's model (AG: `--weak_checkpoint_path OUT/weak`). `best/score.json` is removed while `best/` is
rewritten and written after it. When no scoring passes the floor, the run says so in one log line and writes
nothing to `best/`.

Memory: the DINO and CLIP models are loaded once, before training, and stay on the CPU between scorings; on a GPU
they move to the training device only while scoring (then back, and the cache is emptied).

Resume: the rows up to the checkpoint's step are kept (as `train_log.csv`) and the best so far is recomputed
from them with this run's `--min_clip_t`. If that is not the step `best/score.json` holds (the earlier run went
on past the checkpoint, or the floor changed), `best/` is removed and the best is chosen among this run's
scorings only (one log line says so). The metric models, identifier, prompts and image count are part of the
run's identity (`run_identity`): scores made with other ones would not compare.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from PIL import Image

from boothkit.io import write_json_atomic, write_text_atomic
from boothkit.layout import BEST_DIR, OutputFolder
from boothkit.train.concepts import ConceptImages, ValidationPrompt
from boothkit.train.validation import validation_image_names

if TYPE_CHECKING:
    from boothkit.evaluate.metrics import SubjectMetrics

log = logging.getLogger(__name__)

SCORES_NAME = "validation_scores.csv"
BEST_SCORE_NAME = f"{BEST_DIR}/score.json"
METRICS = ("DINO", "CLIP-I", "CLIP-T")


def scoring_steps(config, start_step: int = 0) -> list[int]:
    """The steps after `start_step` that are scored: every `--validation_every`, and the last one."""
    every = config.validation_every
    if not every:
        return []
    steps = [step for step in range(start_step + 1, config.max_train_steps) if step % every == 0]
    return steps + [config.max_train_steps]


def scoring_prompts(images: ConceptImages) -> list[ValidationPrompt]:
    """The validation prompts, or the instance prompt of each concept when the run has none."""
    validations = images.validations()
    if validations:
        return validations
    single = len(images.concepts) == 1
    return [ValidationPrompt(None if single else k, None, concept.instance_prompt)
            for k, concept in enumerate(images.concepts)]


def scoring_identity(config, images: ConceptImages) -> dict | None:
    """What makes two runs' scores comparable (None when the run scores nothing)."""
    if not config.validation_every:
        return None
    return {"dino_model": config.dino_model, "clip_model": config.clip_model, "identifier": config.identifier,
            "num_validation_images": config.num_validation_images,
            "prompts": [list(prompt) for prompt in scoring_prompts(images)]}


def load_metrics(config) -> SubjectMetrics | None:
    """The metric models (on the CPU), loaded once; None without --validation_every."""
    if not config.validation_every:
        return None
    from boothkit.evaluate.metrics import SubjectMetrics  # here: a run without --validation_every never needs it

    return SubjectMetrics(config.dino_model, config.clip_model, device="cpu")


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row.get("step", "").isdigit()]


def best_row(rows: list[dict], min_clip_t: float | None) -> dict | None:
    """The row of the highest DINO among those with CLIP-T >= min_clip_t (the earliest on a tie)."""
    passing = [row for row in rows if min_clip_t is None or float(row["CLIP-T"]) >= min_clip_t]
    return max(passing, key=lambda row: (float(row["DINO"]), -int(row["step"])), default=None)


class Scorer:
    """The scorings of one run (main process): `validation_scores.csv`, and `best/` with --keep_best."""

    def __init__(self, config, metrics: SubjectMetrics, folder: OutputFolder, images: ConceptImages,
                 start_step: int, device: torch.device):
        self.config, self.metrics, self.folder, self.device = config, metrics, folder, device
        self.prompts = scoring_prompts(images)
        self.steps = set(scoring_steps(config, start_step))
        self.references = {}
        with self._on_device():
            for k, files in enumerate(images.instance_files):
                self.references[k] = metrics.references([image for _, image in files])
        # Claimed before the first step (a user's file in the way stops the run now): the CSV and the images.
        folder.claim(*[name for step in self.steps for concept, index, _ in self.prompts
                       for name in validation_image_names(step, config.num_validation_images, concept, index)])
        self.path = folder.path(SCORES_NAME)
        self.rows = [row for row in read_rows(self.path) if int(row["step"]) <= start_step]
        self._write_rows()
        self.best = self._resume_best() if config.keep_best else None

    def _write_rows(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=("step", *METRICS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buffer.getvalue())

    def _resume_best(self) -> dict | None:
        """The best of the kept rows, if `best/` holds it; otherwise `best/` is cleared and the race restarts."""
        best = best_row(self.rows, self.config.min_clip_t)
        saved = None
        score_file = self.folder.root / BEST_SCORE_NAME
        if self.folder.owns(BEST_SCORE_NAME) and score_file.is_file():
            try:
                saved = int(json.loads(score_file.read_text(encoding="utf-8"))["step"])
            except (OSError, ValueError, KeyError, TypeError):
                saved = None
        best_step = int(best["step"]) if best is not None else None
        leftovers = _owned(self.folder, BEST_DIR)
        if best_step == saved and (saved is not None or not leftovers):
            return best
        if leftovers or best is not None:
            log.info("best/ does not hold the best of the scorings kept up to the resumed step: it is cleared and "
                     "the best is chosen among this run's scorings")
        self.folder.remove(BEST_DIR)
        return None

    def due(self, step: int) -> bool:
        return step in self.steps

    def _on_device(self):
        return _MovedTo(self.metrics, self.device)

    def record(self, step: int, images: dict[ValidationPrompt, list[Path]], save_best: Callable[[], None],
               reporter=None) -> dict[str, float]:
        """Score the images of each prompt (files written by the validation), append the row, keep the best."""
        per_prompt = []
        with self._on_device():
            for prompt, paths in images.items():
                samples = [_load(path) for path in paths]
                per_prompt.append(self.metrics.score(samples, prompt.prompt, self.references[prompt.concept or 0],
                                                     identifier=self.config.identifier))
        scores = {name: sum(s[name] for s in per_prompt) / len(per_prompt) for name in METRICS}
        row = {"step": str(step), **{name: f"{value:.8g}" for name, value in scores.items()}}
        self.rows = [r for r in self.rows if int(r["step"]) != step] + [row]
        self._write_rows()
        if reporter is not None:
            reporter.accelerator.log({f"validation_scores/{name}": value for name, value in scores.items()}, step=step)
        log.info("step %d: DINO %.4f, CLIP-I %.4f, CLIP-T %.4f", step, scores["DINO"], scores["CLIP-I"],
                 scores["CLIP-T"])
        if self.config.keep_best:
            self._keep_if_best(step, row, save_best)
        return scores

    def _keep_if_best(self, step: int, row: dict, save_best: Callable[[], None]) -> None:
        floor = self.config.min_clip_t
        passes = floor is None or float(row["CLIP-T"]) >= floor
        if passes and (self.best is None or float(row["DINO"]) > float(self.best["DINO"])):
            # No score.json while best/ is rewritten: a run killed meanwhile leaves a best/ that its resume clears,
            # never one whose score.json names an earlier step than (some of) its weights
            self.folder.remove(BEST_SCORE_NAME)
            save_best()
            write_json_atomic(self.folder.path(BEST_SCORE_NAME),
                              {"step": step, **{name: float(row[name]) for name in METRICS},
                               "min_clip_t": floor})
            self.best = row

    def finish(self) -> None:
        """One log line when --keep_best found no scoring above the floor."""
        if self.config.keep_best and self.best is None and not _owned(self.folder, BEST_DIR):
            log.warning("--keep_best: no scoring reached --min_clip_t %s (best CLIP-T %s): nothing written to best/",
                        self.config.min_clip_t,
                        max((float(r["CLIP-T"]) for r in self.rows), default=float("nan")))


def _owned(folder: OutputFolder, prefix: str) -> list[str]:
    """boothkit's files under `prefix` in the output folder (a user's file there is not ours to judge)."""
    return sorted(name for name in folder.files if name.startswith(prefix + "/"))


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class _MovedTo:
    """Within the block the metric models sit on `device` (a GPU); the CPU otherwise."""

    def __init__(self, metrics: SubjectMetrics, device: torch.device):
        self.metrics, self.device = metrics, torch.device(device)

    def _move(self, device: torch.device) -> None:
        for embedder in (self.metrics.dino, self.metrics.clip):
            embedder.model.to(device)
            embedder.device = device

    def __enter__(self):
        if self.device.type != "cpu":
            self._move(self.device)
        return self

    def __exit__(self, *exc_info):
        if self.device.type != "cpu":
            self._move(torch.device("cpu"))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

