"""study.html: the study's table (as study.md), the DINO vs CLIP-T trade-off of every subject's best evaluation
per recipe and method with the Pareto front (the plotting of `evaluate.report`), and per subject a grid of
each recipe and method's best samples (linked relatively inside the study folder, as report.html links its own).
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from boothkit.evaluate.outputs import SUMMARY_METRICS, read_runs
from boothkit.evaluate.report import best_image_path, method_colours, pareto_front, png_uri, tradeoff_figure
from boothkit.study.plan import Plan
from boothkit.study.table import summary

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:3px 8px}figure{margin:0;width:128px;font-size:11px;display:inline-block;"
          "vertical-align:top}figure img{width:128px}.row{margin:.3em 0}")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(rows: list[dict], group: str | None) -> str:
    head = "".join(f"<th>{_e(name)}</th>" for name in ("recipe", "method", *(["class"] if group else []), "n",
                                                          *SUMMARY_METRICS))
    body = []
    for entry in summary(rows, group):
        cells = []
        for metric in SUMMARY_METRICS:
            mean, error, _ = entry["cells"][metric]
            cells.append("—" if mean is None else f"{mean:.4f}" + ("" if error is None else f" ± {error:.4f}"))
        first = [entry["recipe"], entry["method"], *([entry["class"]] if group else []), entry["n"]]
        body.append("<tr>" + "".join(f"<td>{_e(value)}</td>" for value in first + cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _tradeoff(rows: list[dict]) -> str:
    """Every subject's best (CLIP-T, DINO) coloured by recipe/method; the Pareto front over all of them."""
    points, labels = [], []
    for row in rows:
        if row["DINO"] != "" and row["CLIP-T"] != "":
            points.append((float(row["CLIP-T"]), float(row["DINO"])))
            labels.append(f"{row['recipe']}/{row['method']}")
    if not points:
        return "<p>no evaluation has both DINO and CLIP-T</p>"
    figure = tradeoff_figure(points, labels, pareto_front(points), method_colours(list(dict.fromkeys(labels))))
    return f'<img class="plot tradeoff" src="{png_uri(figure)}">'


def _curves(plan: Plan, out: Path, subject: str) -> str:
    """The validation scores during training (`--validation_every`: validation_scores.csv) of each recipe."""
    import csv

    from matplotlib.figure import Figure

    curves = {}
    for job in [job for job in plan.jobs if job.subject == subject]:
        path = out / "train" / job.recipe / subject / "validation_scores.csv"
        if path.is_file():
            with open(path, newline="") as handle:
                curves[job.recipe] = [row for row in csv.DictReader(handle)]
    if not curves:
        return ""
    figure = Figure(figsize=(7.2, 2.6), dpi=100, layout="constrained")
    for axis, metric in zip(figure.subplots(1, 2), ("DINO", "CLIP-T")):
        for recipe, rows in curves.items():
            axis.plot([int(r["step"]) for r in rows], [float(r[metric]) for r in rows], marker="o", markersize=3,
                      label=recipe)
        axis.set_xlabel("training step")
        axis.set_ylabel(metric)
        axis.legend(fontsize=7)
    return f'<img class="plot training" src="{png_uri(figure)}">'


def _grids(plan: Plan, out: Path) -> str:
    sections = []
    for subject in sorted({job.subject for job in plan.jobs}):
        lines = []
        for job in [job for job in plan.jobs if job.subject == subject]:
            runs = read_runs(out / "eval" / job.recipe / job.subject)
            for method in plan.methods:
                result = next(s for s in runs[method].subjects if s.folder == subject)
                figures = "".join(
                    f'<figure><img src="{_e(quote(f"eval/{job.recipe}/{subject}/{best_image_path(result, file)}"))}"'
                    f' alt="{_e(file)}"><figcaption>{_e(prompt.prompt)}</figcaption></figure>'
                    for prompt in result.best.per_prompt for file in prompt.files)
                lines.append(f'<div class="row"><b>{_e(job.recipe)} / {_e(method)}</b> (λ = '
                             f"{result.best.setting.guidance_scale:g}){figures}</div>")
        sections.append(f'<section class="subject"><h3>{_e(subject)}</h3>{_curves(plan, out, subject)}'
                        f'{"".join(lines)}</section>')
    return "".join(sections)


def render(plan: Plan, out: Path, rows: list[dict]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>boothkit study</title><style>{_STYLE}</style>"
            f"</head><body><h1>boothkit study</h1><p>Best evaluation of each subject (highest DINO); mean ± standard"
            f" error over subjects.</p><h2>All subjects</h2>{_table(rows, None)}<h2>Per class</h2>"
            f"{_table(rows, 'class')}<h2>DINO vs CLIP-T (each subject's best; Pareto front ringed)</h2>"
            f"{_tradeoff(rows)}<h2>Best samples</h2>{_grids(plan, out)}</body></html>")
