"""report.html: one page comparing every method evaluated into an evaluation folder (issue 9, section 7).

The page holds (1) a table of each subject's best evaluation per method (DINO, CLIP-I, CLIP-T, the diversities
DINO-D and CLIP-D, PRES, λ, ω) and
each method's mean ± standard error over subjects, and per subject (2) its λ → DINO curves, sorted by λ with
one line per ω, (3) the DINO vs CLIP-T trade-off of every evaluation with the Pareto front marked, and (4) its
reference photos beside each method's best samples.

The report is self-contained except for the best samples: plots are embedded as base64 PNG and the reference
photos as base64 JPEG thumbnails (so nothing is written into the user's photo folder and the report survives
its removal); only `report.html` itself is claimed in the output folder. The best samples are linked
relatively, at `<subject folder>/<method>/<file>` inside the evaluation folder (`best_image_path`).
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from boothkit.evaluate.results import METRICS, MethodResults, Setting, SubjectResult
from boothkit.layout import OutputFolder

REPORT_NAME = "report.html"
METRIC_LEGEND = ("DINO, CLIP-I: similarity of the samples to the reference photos; CLIP-T: to the prompt; DINO-D, "
                 "CLIP-D: diversity, mean pairwise distance 1 − cos between the samples of one prompt (higher: more "
                 "diverse; — with one image per prompt); PRES: DINO similarity of the class-prompt samples "
                 "(--class_prompt_samples) to the reference photos (lower: less collapse of the class onto the "
                 "subject). The best evaluation is chosen by DINO alone.")
THUMBNAIL_PX = 160  # longest side of an embedded reference thumbnail
DASH = "—"  # a missing value
_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:"
          "left}tr.mean{font-weight:bold;background:#f4f4f4}.row{display:flex;flex-wrap:wrap;gap:6px;"
          "align-items:flex-start}figure{margin:0;width:128px;font-size:11px}figure img{width:128px}"
          ".plot{max-width:100%}h3{margin:.8em 0 .3em}")


# Pure functions (tested against brute force) ---------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, maximizing both coordinates.

    q dominates p when q ≥ p in both coordinates and q > p in at least one; equal points (duplicates) do not
    dominate each other, so all copies of a front point are on the front. O(n log n): sweep by x descending.
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y_right, start = [], -math.inf, 0  # best_y_right: max y among points with a strictly larger x
    while start < len(order):
        end = start
        while end < len(order) and points[order[end]][0] == points[order[start]][0]:
            end += 1
        group = order[start:end]  # equal x, y descending
        top_y = points[group[0]][1]
        if top_y > best_y_right:
            front += [i for i in group if points[i][1] == top_y]
        best_y_right, start = max(best_y_right, top_y), end
    return sorted(front)


def lambda_curves(subject: SubjectResult) -> dict[float | None, list[tuple[float, float]]]:
    """Per ω (None when the method has none), the evaluated (λ, DINO) points sorted by λ (duplicates once).

    Evaluations without a DINO are left out. The keys are ordered by ω, None first.
    """
    curves: dict[float | None, set[tuple[float, float]]] = {}
    for evaluation in subject.history:
        dino = evaluation.scores.get("DINO")
        if dino is not None:
            curves.setdefault(evaluation.setting.omega, set()).add((float(evaluation.setting.guidance_scale), dino))
    omegas = sorted(curves, key=lambda omega: (omega is not None, omega or 0.0))
    return {omega: sorted(curves[omega]) for omega in omegas}


def mean_and_standard_error(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, standard error, n) over the values present; SE = sample std (ddof=1) / √n, None when n < 2."""
    present = [value for value in values if value is not None]
    if not present:
        return None, None, 0
    se = statistics.stdev(present) / math.sqrt(len(present)) if len(present) > 1 else None
    return statistics.fmean(present), se, len(present)


def best_image_path(subject: SubjectResult, file: str) -> str:
    """Where a best image lives, relative to the evaluation folder: `<subject folder>/<method>/<file>`."""
    return f"{subject.folder}/{subject.method}/{file}"


def subjects_by_folder(runs: list[MethodResults]) -> dict[str, dict[str, SubjectResult]]:
    """Subject folder → method → its result, in the order subjects first appear."""
    table: dict[str, dict[str, SubjectResult]] = {}
    for run in runs:
        for subject in run.subjects:
            table.setdefault(subject.folder, {})[run.method] = subject
    return table


def tradeoff_points(by_method: dict[str, SubjectResult]
                    ) -> tuple[list[tuple[float, float]], list[tuple[str, Setting]]]:
    """(CLIP-T, DINO) of every evaluation of one subject that has both, and (method, setting) of each."""
    points, owners = [], []
    for method, subject in by_method.items():
        for evaluation in subject.history:
            dino, clip_t = evaluation.scores.get("DINO"), evaluation.scores.get("CLIP-T")
            if dino is not None and clip_t is not None:
                points.append((clip_t, dino))
                owners.append((method, evaluation.setting))
    return points, owners


# Figures (matplotlib's Agg canvas; no pyplot, no global state) ------------------------------------------------

def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """Each method's colour in every plot: matplotlib's default cycle, in the order the methods are given."""
    from matplotlib import rcParams

    palette = rcParams["axes.prop_cycle"].by_key()["color"]
    return {method: palette[i % len(palette)] for i, method in enumerate(methods)}


def lambda_curve_figure(by_method: dict[str, SubjectResult], colours: dict[str, str]):
    """One panel per method: λ → DINO, one line per ω sorted by λ, the best evaluation starred."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.6 * len(by_method) + 0.6, 3.0), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(by_method), sharey=True, squeeze=False)[0]
    for axis, (method, subject) in zip(axes, by_method.items()):
        curves = lambda_curves(subject)
        shades = _shades(colours[method], len(curves))
        for (omega, points), shade in zip(curves.items(), shades):
            label = method if omega is None else f"ω = {omega:g}"
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, color=shade,
                      label=label)
        best = subject.best
        if best.scores.get("DINO") is not None:
            axis.plot([best.setting.guidance_scale], [best.scores["DINO"]], marker="*", markersize=12,
                      color="black", linestyle="none", label="best")
        axis.set_title(method)
        axis.set_xlabel("λ (guidance scale)")
        if axis.get_lines():
            axis.legend(fontsize=7)
    axes[0].set_ylabel("DINO")
    return figure


def tradeoff_figure(points: list[tuple[float, float]], methods: list[str], front: list[int],
                    colours: dict[str, str]):
    """DINO against CLIP-T of every evaluation, coloured by method, the Pareto front ringed and joined."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6, 3.4), dpi=100, layout="constrained")
    axis = figure.subplots()
    for method in dict.fromkeys(methods):
        mine = [point for point, owner in zip(points, methods) if owner == method]
        axis.scatter([p[0] for p in mine], [p[1] for p in mine], s=14, color=colours[method], label=method)
    edge = sorted(points[i] for i in front)
    axis.plot([p[0] for p in edge], [p[1] for p in edge], color="black", linewidth=0.8, drawstyle="steps-pre")
    axis.scatter([p[0] for p in edge], [p[1] for p in edge], s=60, facecolors="none", edgecolors="black",
                 label="Pareto front")
    axis.set_xlabel("CLIP-T (prompt fidelity)")
    axis.set_ylabel("DINO (subject fidelity)")
    axis.legend(fontsize=7)
    return figure


def _shades(colour: str, count: int) -> list:
    """`count` shades of one colour, light to dark (one per ω)."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(colour)
    mixes = [0.55 * (1 - k / max(count - 1, 1)) for k in range(count)] if count > 1 else [0.0]
    return [(r + (1 - r) * m, g + (1 - g) * m, b + (1 - b) * m) for m in mixes]


def png_uri(figure) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def reference_thumbnails(reference_dir: str) -> list[tuple[str, str]]:
    """(file name, JPEG data URI) of each reference photo, at most THUMBNAIL_PX on its longest side."""
    from boothkit.data.images import load_image_folder

    thumbnails = []
    for path, image in load_image_folder(reference_dir, "reference folder"):
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        thumbnails.append((path.name, "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()))
    return thumbnails


# HTML ------------------------------------------------------------------------------------------------------

def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cell(value: float | None, digits: str = ".4f") -> str:
    if value is None:
        return f"<td>{DASH}</td>"
    return f'<td data-value="{value!r}">{value:{digits}}</td>'


def _summary_table(runs: list[MethodResults], with_omega: bool) -> str:
    columns = ("subject", "method", *METRICS, "λ", *(["ω"] if with_omega else []))
    head = "".join(f"<th>{name}</th>" for name in columns)
    rows = []
    for run in runs:
        for subject in run.subjects:
            best = subject.best
            cells = [_cell(best.scores.get(metric)) for metric in METRICS]
            cells.append(_cell(best.setting.guidance_scale, "g"))
            if with_omega:
                cells.append(_cell(best.setting.omega, "g"))
            rows.append(f'<tr class="best" data-subject="{_e(subject.folder)}" data-method="{_e(run.method)}">'
                        f"<td>{_e(subject.folder)}</td><td>{_e(run.method)}</td>{''.join(cells)}</tr>")
        means = []
        for metric in METRICS:
            mean, se, n = mean_and_standard_error([subject.best.scores.get(metric) for subject in run.subjects])
            text = DASH if mean is None else f"{mean:.4f} ± {DASH if se is None else f'{se:.4f}'}"
            means.append(f'<td data-mean="{mean!r}" data-se="{se!r}" data-n="{n}">{text}</td>')
        blanks = "<td></td>" * (2 if with_omega else 1)
        rows.append(f'<tr class="mean" data-method="{_e(run.method)}"><td>mean ± SE (n = {len(run.subjects)})'
                    f"</td><td>{_e(run.method)}</td>{''.join(means)}{blanks}</tr>")
    return f'<table id="summary"><tr>{head}</tr>{"".join(rows)}</table>'


def _samples(subject: SubjectResult) -> str:
    setting = subject.best.setting
    where = f"λ = {setting.guidance_scale:g}" + ("" if setting.omega is None else f", ω = {setting.omega:g}")
    figures = []
    for prompt in subject.best.per_prompt:
        dino = prompt.scores.get("DINO")
        caption = f"{_e(prompt.prompt)}<br>DINO {DASH if dino is None else f'{dino:.3f}'}"
        figures += [f'<figure><img src="{_e(quote(best_image_path(subject, file)))}" alt="{_e(file)}">'
                    f"<figcaption>{caption}</figcaption></figure>" for file in prompt.files]
    return (f'<div class="samples" data-method="{_e(subject.method)}"><h3>{_e(subject.method)}: best samples '
            f'({_e(where)})</h3><div class="row">{"".join(figures)}</div></div>')


def _references(reference_dir: str) -> str:
    from boothkit.errors import BoothkitError, first_line

    try:
        thumbnails = reference_thumbnails(reference_dir)
    except BoothkitError as error:
        return f'<p class="references missing">reference photos unavailable: {_e(first_line(error))}</p>'
    figures = "".join(f'<figure><img src="{uri}" alt="{_e(name)}"><figcaption>{_e(name)}</figcaption></figure>'
                      for name, uri in thumbnails)
    return f'<div class="references"><h3>reference photos</h3><div class="row">{figures}</div></div>'


def _pareto_table(points, owners, front) -> str:
    rows = "".join(f"<tr><td>{_e(owners[i][0])}</td>{_cell(owners[i][1].guidance_scale, 'g')}"
                   f"{_cell(owners[i][1].omega, 'g')}{_cell(points[i][1])}{_cell(points[i][0])}</tr>"
                   for i in sorted(front, key=lambda i: points[i]))
    return (f'<table class="pareto"><tr><th>method</th><th>λ</th><th>ω</th><th>DINO</th><th>CLIP-T</th></tr>'
            f"{rows}</table>")


def _subject_section(index: int, folder: str, by_method: dict[str, SubjectResult], colours: dict[str, str]) -> str:
    first = next(iter(by_method.values()))
    points, owners = tradeoff_points(by_method)
    front = pareto_front(points)
    plots = f'<h3>λ → DINO</h3><img class="plot lambda" src="{png_uri(lambda_curve_figure(by_method, colours))}">'
    if points:
        figure = tradeoff_figure(points, [owner[0] for owner in owners], front, colours)
        plots += (f'<h3>DINO vs CLIP-T, every evaluation (Pareto front ringed)</h3><div class="row">'
                  f'<img class="plot tradeoff" src="{png_uri(figure)}">{_pareto_table(points, owners, front)}</div>')
    samples = "".join(_samples(subject) for subject in by_method.values())
    return (f'<section class="subject" id="subject-{index}" data-subject="{_e(folder)}"><h2>{_e(folder)} '
            f"({_e(first.subject)})</h2>{_references(first.reference_dir)}{samples}{plots}</section>")


def _model_of(settings: dict) -> str:
    return settings.get("pretrained_model_name_or_path") or settings.get("pretrained_model_path") or DASH


def render_report(runs: list[MethodResults]) -> str:
    """The report's HTML (reads the reference photos; writes nothing)."""
    if not runs:
        raise ValueError("render_report needs the results of at least one method")
    colours = method_colours([run.method for run in runs])
    with_omega = any(s.best.setting.omega is not None for run in runs for s in run.subjects)
    described = "".join(f"<li>{_e(run.method)}: {len(run.subjects)} subject(s); optimize "
                        f"{_e(run.settings.get('optimize', DASH))}; model {_e(_model_of(run.settings))}</li>"
                        for run in runs)
    sections = "".join(_subject_section(i, folder, by_method, colours)
                       for i, (folder, by_method) in enumerate(subjects_by_folder(runs).items()))
    methods = ", ".join(_e(run.method) for run in runs)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>boothkit evaluation: {methods}</title>"
            f"<style>{_STYLE}</style></head><body><h1>boothkit evaluation: {methods}</h1><ul>{described}</ul>"
            f"<p>Best evaluation (highest DINO) of each subject and method; mean ± standard error (sample std / "
            f"√n) over subjects. {METRIC_LEGEND}</p>{_summary_table(runs, with_omega)}{sections}</body></html>")


def write_report(folder: OutputFolder, runs: list[MethodResults]) -> Path:
    """Write `folder.root/report.html` comparing every method in `runs` (one MethodResults per method)."""
    from boothkit.io import write_text_atomic

    page = render_report(runs)
    path = folder.path(REPORT_NAME)
    write_text_atomic(path, page)
    return path
