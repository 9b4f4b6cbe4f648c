"""Evaluation outputs: final images per subject, evaluation_summary.csv, results.json and report.html."""

from __future__ import annotations

import csv
import html
import io
import shutil
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from boothkit.evaluate.config import EvaluateConfig  # noqa: E402
from boothkit.io import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402

SUMMARY_NAME, RESULTS_NAME, REPORT_NAME = "evaluation_summary.csv", "results.json", "report.html"


def write_outputs(config: EvaluateConfig, results: list, evaluator) -> None:
    output_dir = Path(config.output_dir)
    for result in results:
        _copy_final_images(evaluator.cache_dir(result.folder) / result.best["key"], result, output_dir)
    write_text_atomic(output_dir / SUMMARY_NAME, summary_csv(config, results))
    write_json_atomic(output_dir / RESULTS_NAME, {
        "settings": config.model_dump(), "subjects": [asdict(result) for result in results],
    })
    write_report(output_dir, config, results)


def _copy_final_images(cache: Path, result, output_dir: Path) -> None:
    """The best evaluation's images as `output_dir/<folder>/NNNN_<prompt-slug>.png` (replaced atomically)."""
    with atomic_path(output_dir / result.folder) as staging:
        staging.mkdir()
        for name in result.best["images"]:
            shutil.copyfile(cache / name, staging / name)


def summary_rows(config: EvaluateConfig, results: list) -> list[dict]:
    rows = []
    for result in results:
        scores, setting = result.best["scores"], result.best["setting"]
        row = {"subject": result.folder, "num_prompts": len(result.prompts),
               **{metric: f"{scores[metric]:.6f}" if scores.get(metric) is not None else "" for metric in
                  ("CLIP-I", "CLIP-T", "DINO")},
               "guidance_scale": f"{setting['guidance_scale']:.6g}"}
        if config.method == "wig":
            row["omega"] = f"{setting['omega']:.6g}"
        rows.append(row)
    return rows


def summary_csv(config: EvaluateConfig, results: list) -> str:
    rows = summary_rows(config, results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _plot(path: Path, title: str, x_label: str, series: dict[str, tuple[list, list]]) -> None:
    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=100)
    for label, (xs, ys) in series.items():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        axis.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", markersize=3, label=label)
    axis.set_title(title)
    axis.set_xlabel(x_label)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as staging:
        figure.savefig(staging, format="png")
    plt.close(figure)


def _subject_plots(output_dir: Path, result) -> list[str]:
    plots = []
    history = [row for row in result.history if row["DINO"] is not None]
    if len({row["guidance_scale"] for row in history}) > 1:
        name = f"plots/{result.folder}_lambda.png"
        _plot(output_dir / name, f"{result.folder}: λ → DINO", "λ (guidance_scale)",
              {"DINO": ([r["guidance_scale"] for r in history], [r["DINO"] for r in history])})
        plots.append(name)
    if result.omega_table:
        name = f"plots/{result.folder}_omega.png"
        table = result.omega_table
        _plot(output_dir / name, f"{result.folder}: ω → scores (best λ at each ω)", "ω",
              {metric: ([r["omega"] for r in table], [r[metric] for r in table]) for metric in ("DINO", "CLIP-T")
               if all(r[metric] is not None for r in table)})
        plots.append(name)
    return plots


def write_report(output_dir: Path, config: EvaluateConfig, results: list) -> None:
    """report.html: the summary table, then per subject its plots and its image grid."""
    rows = summary_rows(config, results)
    head = "".join(f"<th>{html.escape(column)}</th>" for column in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
    sections = []
    for result in results:
        plots = "".join(f'<img class="plot" src="{html.escape(p)}">' for p in _subject_plots(output_dir, result))
        grid = "".join(
            f'<figure><img src="{html.escape(result.folder)}/{html.escape(name)}"><figcaption>'
            f'{html.escape(prompt["prompt"])}<br>DINO {prompt["DINO"]:.3f}</figcaption></figure>'
            for prompt in result.best["per_prompt"] for name in prompt["files"])
        sections.append(f"<h2>{html.escape(result.folder)} ({html.escape(result.subject)})</h2>{plots}"
                        f'<div class="grid">{grid}</div>')
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>boothkit evaluation</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px}.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:160px;font-size:11px}"
            "figure img{width:160px;image-rendering:pixelated}.plot{max-width:480px;margin:8px}</style></head><body>"
            f"<h1>boothkit evaluation — method {html.escape(config.method)}</h1>"
            f"<p>model {html.escape(config.pretrained_model_path)}; optimize {html.escape(config.optimize)}</p>"
            f"<table><tr>{head}</tr>{body}</table>{''.join(sections)}</body></html>")
    write_text_atomic(output_dir / REPORT_NAME, page)
