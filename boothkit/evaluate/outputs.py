"""What an evaluation folder holds for the user: the best images of each subject and method, `results.json`
with every method evaluated there, `evaluation_summary.csv` and the report comparing the methods.

Evaluating another method into the same folder adds it; evaluating a method again replaces that method's
results and best images (file by file, among boothkit's own files only).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from pathlib import Path, PurePosixPath

from boothkit.evaluate.report import REPORT_NAME, write_report
from boothkit.evaluate.results import MethodResults
from boothkit.evaluate.store import CACHE_DIR, SUBJECTS_DIR, CacheStore
from boothkit.io import atomic_path, write_json_atomic, write_text_atomic
from boothkit.layout import OutputFolder

log = logging.getLogger(__name__)
SUMMARY_NAME, RESULTS_NAME = "evaluation_summary.csv", "results.json"
IDENTITY_KEY = "identity"  # in results.json, with each method's results: what they were computed from


def best_image(folder: str, method: str, name: str) -> PurePosixPath:
    """Where a best image lives in the evaluation folder: `<subject folder>/<method>/NNNN_<prompt-slug>.png`."""
    return PurePosixPath(folder, method, name)


def _read_methods(root: Path) -> dict[str, dict]:
    """results.json's methods as JSON, by method ({} when there is none)."""
    path = root / RESULTS_NAME
    if not path.is_file():
        return {}
    try:
        methods = json.loads(path.read_text(encoding="utf-8"))["methods"]
        if not isinstance(methods, dict):
            raise TypeError("methods is not a mapping")
        return methods
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("'%s' is unreadable or from an older boothkit; it is replaced, and methods evaluated there "
                    "earlier must be evaluated again (their cached evaluations answer at once)", path)
        return {}


def read_runs(root: Path) -> dict[str, MethodResults]:
    """The methods already evaluated into `root` (its results.json), by method."""
    return {method: MethodResults.from_json(data) for method, data in _read_methods(root).items()}


def write_outputs(folder: OutputFolder, run: MethodResults, cache: CacheStore, identity: dict) -> list[MethodResults]:
    """Add `run` to the folder's results (replacing an earlier run of its method); returns every method's.

    `identity` (`EvaluationKeys.results_identity`: the base model, each subject's photos and LoRA) is stored
    with the run's results. Other methods whose results were computed from another identity (a retrained LoRA,
    another model at the same path ...) are stale: they are dropped, with their best images, and named in one
    warning line, so the summary and the report never compare results of different models.

    When the folder already holds exactly these results, with their images and reports, nothing is rewritten
    (a fully cached re-run then takes a fraction of a second: drawing the report's plots takes longer)."""
    methods = _read_methods(folder.root)
    identity = json.loads(json.dumps(identity))
    entry = json.loads(json.dumps({**run.to_json(), IDENTITY_KEY: identity}))
    dropped = [method for method, data in methods.items()
               if method != run.method and not _same_sources(data.get(IDENTITY_KEY), identity)]
    if not dropped and methods.get(run.method) == entry and _outputs_present(folder, run):
        return [MethodResults.from_json(data) for data in methods.values()]
    if dropped:
        log.warning("dropping the results of %s from '%s': they were computed from another base model, other "
                    "reference photos or other LoRAs (evaluate them again)", ", ".join(dropped), folder.root)
    entries = {method: data for method, data in methods.items() if method not in dropped}
    entries[run.method] = entry
    everything = [run if method == run.method else MethodResults.from_json(data) for method, data in entries.items()]
    obsolete = _copy_best_images(folder, run, cache)
    obsolete += [name for name in sorted(folder.files) if any(_is_best_image(name, method) for method in dropped)]
    write_json_atomic(folder.path(RESULTS_NAME), {"methods": entries})
    write_text_atomic(folder.path(SUMMARY_NAME), summary_csv(everything))
    write_report(folder, everything)
    for name in obsolete:  # last: until the new results are written, the old ones keep their images
        folder.remove(name)
    return everything


def _same_sources(earlier: dict | None, identity: dict) -> bool:
    """Whether results stored with identity `earlier` may be compared with the current run's: the same base model,
    and the same photos and LoRA for each subject both evaluated (a subject only one of them evaluated cannot
    disagree). Results stored without an identity (an older boothkit) cannot be checked: they count as stale."""
    if not isinstance(earlier, dict) or earlier.get("model") != identity["model"]:
        return False
    subjects, current = earlier.get("subjects"), identity["subjects"]
    return isinstance(subjects, dict) and all(subjects[name] == current[name] for name in subjects.keys() & current.keys())


def _outputs_present(folder: OutputFolder, run: MethodResults) -> bool:
    names = [RESULTS_NAME, SUMMARY_NAME, REPORT_NAME] + [
        best_image(subject.folder, run.method, name).as_posix() for subject in run.subjects
        for name in subject.best.images]
    return all(folder.owns(name) and (folder.root / name).is_file() for name in names)


def _copy_best_images(folder: OutputFolder, run: MethodResults, cache: CacheStore) -> list[str]:
    """Copy each subject's best images out of the cache; return boothkit's earlier images of this method that
    the new results do not list."""
    written = set()
    for subject in run.subjects:
        source = cache.path(subject.folder, subject.best.key)
        for name in subject.best.images:
            target = best_image(subject.folder, run.method, name)
            with atomic_path(folder.path(target)) as staging:
                shutil.copyfile(source / name, staging)
            written.add(target.as_posix())
    return sorted(name for name in folder.files if _is_best_image(name, run.method) and name not in written)


def _is_best_image(name: str, method: str) -> bool:
    """`<subject folder>/<method>/<file>`, outside boothkit's own folders (cache/, subjects/)."""
    parts = PurePosixPath(name).parts
    return len(parts) == 3 and parts[1] == method and parts[0] not in (CACHE_DIR, SUBJECTS_DIR)


SUMMARY_METRICS: tuple[str, ...] = ("CLIP-I", "CLIP-T", "DINO", "DINO-D", "CLIP-D", "PRES")
"""The CSV's metric columns: the seed's three first, in its order, then the diversities and PRES (every metric of
`results.METRICS`; a metric an evaluation lacks is an empty cell)."""


def summary_rows(runs: list[MethodResults]) -> list[dict]:
    """One row per (subject, method), subjects in folder order: the best evaluation's scores and setting."""
    with_omega = any(run.method == "wig" for run in runs)
    rows = []
    for run in runs:
        for subject in run.subjects:
            scores, setting = subject.best.scores, subject.best.setting
            row = {"subject": subject.folder, "method": run.method, "num_prompts": len(subject.prompts),
                   **{metric: "" if scores.get(metric) is None else f"{scores[metric]:.6f}"
                      for metric in SUMMARY_METRICS},
                   "guidance_scale": f"{setting.guidance_scale:.6g}"}
            if with_omega:
                row["omega"] = "" if setting.omega is None else f"{setting.omega:.6g}"
            rows.append(row)
    order = {run.method: index for index, run in enumerate(runs)}
    return sorted(rows, key=lambda row: (row["subject"], order[row["method"]]))


def summary_csv(runs: list[MethodResults]) -> str:
    rows = summary_rows(runs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
