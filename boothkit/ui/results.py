"""The Results tab of `boothkit ui` (issue 13): open an evaluation folder (what `boothkit evaluate` wrote) and
browse what its report.html shows, interactively: the comparison table, and for the chosen subject its λ → DINO
curves, its DINO vs CLIP-T trade-off and the chosen method's best samples beside the reference photos.

The numbers and figures come from the report's own functions (`boothkit.evaluate.report`, `summary_rows`), so
the tab and report.html never disagree. The data logic is plain functions; `results_tab` only wires Gradio.
Paths typed on the page must lie inside `--root`; images named by results.json are shown only when they lie
inside the evaluation folder (best samples) or the root (reference photos).
"""

from __future__ import annotations

from pathlib import Path

from boothkit.errors import BoothkitError, first_line
from boothkit.evaluate.outputs import RESULTS_NAME, read_runs, summary_rows
from boothkit.evaluate.report import (DASH, best_image_path, lambda_curve_figure, mean_and_standard_error,
                                      method_colours, pareto_front, subjects_by_folder, tradeoff_figure,
                                      tradeoff_points)
from boothkit.evaluate.results import METRICS, MethodResults, SubjectResult

REFERENCE_PX = 512  # longest side of a reference photo shown in the gallery


def open_evaluation(workspace, folder: str) -> tuple[Path, list[MethodResults]]:
    """The evaluation folder typed on the page (inside the root) and the results of each method evaluated
    there (results.json order); a one-line `BoothkitError` when it is none or holds no results."""
    text = (folder or "").strip()
    if not text:
        raise BoothkitError("type an evaluation folder (a folder under the root that boothkit evaluate wrote)")
    path = workspace.inside(text, "evaluation folder")
    if not path.is_dir():
        raise BoothkitError(f"evaluation folder '{text}' does not exist or is not a folder")
    if not (path / RESULTS_NAME).is_file():
        raise BoothkitError(f"'{text}' is not an evaluation folder: it has no {RESULTS_NAME} "
                            "(boothkit evaluate --output_dir writes one)")
    try:
        runs = [run for run in read_runs(path).values() if run.subjects]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise BoothkitError(f"'{text}/{RESULTS_NAME}' is not results boothkit can read ({error!r}); "
                            "evaluate into the folder again") from None
    if not runs:
        raise BoothkitError(f"'{text}' holds no results: its {RESULTS_NAME} is empty, unreadable or from an older "
                            "boothkit (evaluate into it again)")
    return path, runs


def results_table(runs: list[MethodResults]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the comparison table: each subject's best evaluation per method (the summary CSV's
    values, `summary_rows`), then one mean ± standard error row per method over its subjects (as the report)."""
    rows = summary_rows(runs)
    with_omega = "omega" in rows[0]
    headers = ["subject", "method", *METRICS, "λ", *(["ω"] if with_omega else [])]
    body = [[row["subject"], row["method"], *(row[metric] or DASH for metric in METRICS), row["guidance_scale"],
             *([row["omega"] or DASH] if with_omega else [])] for row in rows]
    for run in runs:
        cells = []
        for metric in METRICS:
            mean, se, _ = mean_and_standard_error([subject.best.scores.get(metric) for subject in run.subjects])
            cells.append(DASH if mean is None else f"{mean:.6f} ± {DASH if se is None else f'{se:.6f}'}")
        body.append([f"mean ± SE (n = {len(run.subjects)})", run.method, *cells, "",
                     *([""] if with_omega else [])])
    return headers, body


def subject_choices(runs: list[MethodResults]) -> list[tuple[str, str]]:
    """(label, subject folder) for the subject menu, in the order subjects first appear."""
    return [(f"{folder} ({next(iter(by_method.values())).subject})", folder)
            for folder, by_method in subjects_by_folder(runs).items()]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def sample_items(evaluation: Path, subject: SubjectResult) -> list[tuple[str, str]]:
    """(image path, caption: prompt and DINO) of a subject's best samples that lie in the evaluation folder."""
    items = []
    for prompt in subject.best.per_prompt:
        dino = prompt.scores.get("DINO")
        caption = f"{prompt.prompt} · DINO {DASH if dino is None else f'{dino:.3f}'}"
        for file in prompt.files:
            path = (evaluation / best_image_path(subject, file)).resolve()
            if _within(path, evaluation) and path.is_file():
                items.append((str(path), caption))
    return items


def reference_items(root: Path, reference_dir: str) -> list[tuple[object, str]]:
    """(PIL image, caption) of the subject's reference photos, at most REFERENCE_PX on their longest side;
    none when the folder lies outside the root or cannot be read (the report shows them the same way)."""
    from boothkit.data.images import load_image_folder

    folder = Path(reference_dir).expanduser().resolve()
    if not _within(folder, root):
        return []
    try:
        photos = load_image_folder(folder, "reference folder")
    except BoothkitError:
        return []
    items = []
    for path, image in photos:
        image.thumbnail((REFERENCE_PX, REFERENCE_PX))
        items.append((image, f"reference: {path.name}"))
    return items


def subject_view(root: Path, evaluation: Path, runs: list[MethodResults], folder: str, method: str):
    """(λ → DINO figure, DINO vs CLIP-T figure or None, gallery items, note) for one subject and method. The
    figures compare every method that evaluated the subject; the note (else None) says when `method` did not."""
    by_folder = subjects_by_folder(runs)
    if folder not in by_folder:
        raise BoothkitError(f"subject '{folder}' is not in this evaluation folder (it holds {', '.join(by_folder)})")
    methods = [run.method for run in runs]
    if method not in methods:
        raise BoothkitError(f"method '{method}' is not in this evaluation folder (it holds {', '.join(methods)})")
    by_method, colours = by_folder[folder], method_colours(methods)
    points, owners = tradeoff_points(by_method)
    tradeoff = tradeoff_figure(points, [owner[0] for owner in owners], pareto_front(points), colours) if points \
        else None
    subject = by_method.get(method)
    items = sample_items(evaluation, subject) if subject else []
    items += reference_items(root, next(iter(by_method.values())).reference_dir)
    note = None if subject else (f"subject '{folder}' was not evaluated with {method} (only with "
                                 f"{', '.join(by_method)}): the gallery shows its reference photos only")
    return lambda_curve_figure(by_method, colours), tradeoff, items, note


def open_results(workspace, folder: str) -> dict:
    """Everything the Open button shows: the table, the subject and method menus (first subject, and the first
    method that evaluated it, chosen) and that subject's figures and gallery."""
    evaluation, runs = open_evaluation(workspace, folder)
    headers, rows = results_table(runs)
    subjects = subject_choices(runs)
    first = subjects[0][1]
    methods = [run.method for run in runs]
    method = next(name for name in methods if name in subjects_by_folder(runs)[first])
    lambda_figure, tradeoff, items, _ = subject_view(workspace.root, evaluation, runs, first, method)
    return {"headers": headers, "rows": rows, "subjects": subjects, "subject": first, "methods": methods,
            "method": method, "lambda": lambda_figure, "tradeoff": tradeoff, "gallery": items}


def show_subject(workspace, folder: str, subject: str, method: str):
    """The chosen subject's figures, gallery and note (the evaluation folder is read again: it may have grown)."""
    evaluation, runs = open_evaluation(workspace, folder)
    return subject_view(workspace.root, evaluation, runs, subject, method)


def results_tab(gr, workspace) -> None:
    """The tab's components and events, built inside the caller's `gr.Tab("Results")`. Endpoints:
    `open_results` (folder → table, subject menu, method menu, λ plot, trade-off plot, gallery) and
    `show_subject` (folder, subject, method → λ plot, trade-off plot, gallery)."""
    with gr.Row():
        folder = gr.Textbox(label="Evaluation folder (under the root; what boothkit evaluate --output_dir wrote)",
                            elem_id="results_folder", scale=4)
        button = gr.Button("Open", variant="primary", elem_id="open_results", scale=1)
    table = gr.Dataframe(label="Best evaluation of each subject and method; mean ± SE over subjects",
                         elem_id="results_table", interactive=False, wrap=True)
    with gr.Row():
        subject = gr.Dropdown(label="Subject", choices=[], elem_id="results_subject", interactive=True,
                              allow_custom_value=True)  # a value not offered: the endpoint's own one-line error
        method = gr.Dropdown(label="Method (best samples)", choices=[], elem_id="results_method", interactive=True,
                             allow_custom_value=True)
    with gr.Row():
        lambda_plot = gr.Plot(label="λ → DINO (one line per ω; best starred)", format="png",
                              elem_id="results_lambda")
        tradeoff_plot = gr.Plot(label="DINO vs CLIP-T, every evaluation (Pareto front ringed)", format="png",
                                elem_id="results_tradeoff")
    gallery = gr.Gallery(label="Best samples (prompt · DINO), then the reference photos", columns=4,
                         elem_id="results_gallery")

    def on_open(text):
        try:
            shown = open_results(workspace, text)
        except BoothkitError as error:
            raise gr.Error(first_line(error)) from None
        return ({"headers": shown["headers"], "data": shown["rows"]},
                gr.Dropdown(choices=shown["subjects"], value=shown["subject"]),
                gr.Dropdown(choices=shown["methods"], value=shown["method"]),
                shown["lambda"], shown["tradeoff"], shown["gallery"])

    def on_subject(text, chosen_subject, chosen_method):
        try:
            lambda_figure, tradeoff, items, note = show_subject(workspace, text, chosen_subject, chosen_method)
        except BoothkitError as error:
            raise gr.Error(first_line(error)) from None
        if note:
            gr.Warning(note)
        return lambda_figure, tradeoff, items

    gr.on([button.click, folder.submit], on_open, inputs=folder,
          outputs=[table, subject, method, lambda_plot, tradeoff_plot, gallery], api_name="open_results")
    gr.on([subject.input, method.input], on_subject, inputs=[folder, subject, method],
          outputs=[lambda_plot, tradeoff_plot, gallery], api_name="show_subject")
