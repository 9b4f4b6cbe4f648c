"""study.csv (one row per subject × recipe × method: the best evaluation's scores and λ/ω) and study.md (the
paper-style table: per recipe and method the mean ± standard error over subjects, overall and per class).

Rows come from each job's evaluation folder (`eval/<recipe>/<subject>`, read with `evaluate.outputs.read_runs`),
sorted by (subject, recipe, method), so the files do not depend on which process ran which job. Means and
standard errors are `evaluate.report.mean_and_standard_error` (sample std / √n), as in report.html.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from boothkit.errors import BoothkitError
from boothkit.evaluate.outputs import SUMMARY_METRICS, read_runs, summary_rows
from boothkit.evaluate.report import mean_and_standard_error
from boothkit.io import write_json_atomic, write_text_atomic
from boothkit.study.plan import Plan

CSV_NAME, MD_NAME, HTML_NAME, WRITTEN_NAME = "study.csv", "study.md", "study.html", "jobs/tables.json"
COLUMNS = ("subject", "class", "recipe", "method", *SUMMARY_METRICS, "guidance_scale", "omega")


def study_rows(plan: Plan, out: Path) -> list[dict]:
    rows = []
    for job in plan.jobs:
        runs = read_runs(out / "eval" / job.recipe / job.subject)
        for method in plan.methods:
            if method not in runs:
                raise BoothkitError(f"{job.name} has no {method} results in '{out / 'eval' / job.name}'")
            for row in summary_rows([runs[method]]):
                rows.append({"subject": job.subject, "class": job.noun, "recipe": job.recipe, "method": method,
                             **{metric: row[metric] for metric in SUMMARY_METRICS},
                             "guidance_scale": row["guidance_scale"], "omega": row.get("omega", "")})
    order = {method: index for index, method in enumerate(plan.methods)}
    return sorted(rows, key=lambda row: (row["subject"], row["recipe"], order[row["method"]]))


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summary(rows: list[dict], group: str | None = None) -> list[dict]:
    """Per (recipe, method[, class]) the mean, standard error and n of each metric over its subjects."""
    keys = sorted({(row["recipe"], row["method"], row["class"] if group else "") for row in rows})
    table = []
    for recipe, method, noun in keys:
        members = [row for row in rows if row["recipe"] == recipe and row["method"] == method
                   and (not group or row["class"] == noun)]
        cells = {}
        for metric in SUMMARY_METRICS:
            values = [float(row[metric]) if row[metric] != "" else None for row in members]
            cells[metric] = mean_and_standard_error(values)
        table.append({"recipe": recipe, "method": method, "class": noun, "cells": cells, "n": len(members)})
    return table


def markdown(rows: list[dict]) -> str:
    lines = ["# boothkit study", "", "Best evaluation of each subject (highest DINO; λ tuned, ω swept for wig); mean "
             "± standard error over subjects (sample std / √n).", ""]
    for title, group in (("All subjects", None), ("Per class", "class")):
        lines += [f"## {title}", "", "| recipe | method | " + ("class | " if group else "") + "n | " +
                  " | ".join(SUMMARY_METRICS) + " |", "|" + "---|" * (len(SUMMARY_METRICS) + (4 if group else 3))]
        for entry in summary(rows, group):
            cells = [_cell(*entry["cells"][metric]) for metric in SUMMARY_METRICS]
            head = [entry["recipe"], entry["method"], *([entry["class"]] if group else []), str(entry["n"])]
            lines.append("| " + " | ".join(head + cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(mean, error, count) -> str:
    if mean is None:
        return "—"
    return f"{mean:.4f}" if error is None else f"{mean:.4f} ± {error:.4f}"


def write_tables(plan: Plan, out: Path) -> tuple[Path, Path]:
    """Write study.csv, study.md and study.html; a file of those names boothkit did not write is refused, never
    replaced."""
    from boothkit.study.html import render

    rows = study_rows(plan, out)
    texts = {CSV_NAME: csv_text(rows), MD_NAME: markdown(rows), HTML_NAME: render(plan, out, rows)}
    written_path = out / WRITTEN_NAME
    try:
        written = json.loads(written_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        written = {}
    for name in texts:
        path = out / name
        if path.exists() and _digest(path.read_bytes()) != written.get(name):
            raise BoothkitError(f"'{path}' was not written by boothkit study: move it away (it is never replaced)")
    for name, text in texts.items():
        write_text_atomic(out / name, text)
        written[name] = _digest(text.encode("utf-8"))
    write_json_atomic(written_path, written)
    return out / CSV_NAME, out / MD_NAME


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
