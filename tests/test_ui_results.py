"""`boothkit ui`'s Results tab (issue 13): an evaluation folder written by the real `boothkit evaluate` on tiny
models, opened through the tab's endpoints (gradio_client) and through its plain functions."""

from __future__ import annotations

import csv
import json
import math
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from boothkit.evaluate.outputs import read_runs
from boothkit.evaluate.report import lambda_curves, pareto_front, tradeoff_points
from boothkit.evaluate.results import METRICS

PROMPTS = {"subjects": ["dog", "cat statue"], "prompts": ["a <subject> in the snow", "a red <subject>"]}


def make_evaluation_folder(root: Path, methods: Sequence[str] = ("cfg", "ag", "wig"),
                           subjects: Sequence[str] = ("dog2", "cat_statue"),
                           only: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Run the real `boothkit evaluate` on tiny models into `root/evaluation` and return that folder (about
    5 s on two CPU cores). Everything it reads is written under `root` first: tiny base, DINO and CLIP models
    (`root/models/`), a "fine-tuned" model that every subject shares, with a `weak/` copy for AG
    (`root/finetuned/`), reference photos (`root/photos/<subject folder>/`: the sample dog, mirrored for every
    other subject) and the prompts (`root/prompts.json`; subject folders map to dog and cat statue).

    Each method searches λ (WIG also ω ∈ {0, 1}) with 2 inference steps at 32 px; `only` limits a method to
    some subject folders ({"ag": ["dog2"]}). Outside pytest, the digest memo goes where BOOTHKIT_CACHE_DIR
    (default ~/.cache/boothkit) says."""
    from boothkit.cli import main
    from boothkit.data.images import list_image_files, sample_subject_dir
    from boothkit.testing.tiny import build_tiny

    root = Path(root)
    models = {kind: build_tiny(kind, root / "models" / kind, seed=0) for kind in ("sd15", "dino", "clip")}
    finetuned = root / "finetuned"
    shutil.copytree(models["sd15"], finetuned)
    shutil.copytree(models["sd15"], finetuned / "weak")  # AG's weak model: all evaluations read the same files
    for index, folder in enumerate(subjects):
        (root / "photos" / folder).mkdir(parents=True)
        for photo in list_image_files(sample_subject_dir(), "sample subject"):
            image = Image.open(photo).convert("RGB")
            (ImageOps.mirror(image) if index else image).save(root / "photos" / folder / f"{photo.stem}.png")
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    searches = {"cfg": ["--optimize", "lambda", "--max_evaluations", "3"], "ag": ["--optimize", "lambda",
                "--max_evaluations", "2"], "wig": ["--optimize", "both", "--omega_grid", "0", "1",
                                                   "--max_evaluations", "2"]}
    out = root / "evaluation"
    for method in methods:
        args = ["evaluate", "--pretrained_model_name_or_path", models["sd15"], "--lora_dir", finetuned,
                "--instance_data_dir", root / "photos", "--evaluation_prompts_path", root / "prompts.json",
                "--output_dir", out, "--dino_model", models["dino"], "--clip_model", models["clip"],
                "--num_inference_steps", "2", "--height", "32", "--width", "32", "--method", method,
                *searches[method], *(["--subjects", *only[method]] if only and method in only else [])]
        if main([str(arg) for arg in args]) != 0:
            raise RuntimeError(f"boothkit evaluate --method {method} into '{out}' failed (see its error above)")
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A page holding only the Results tab, on 127.0.0.1, whose root holds an evaluation folder (cfg, wig on two
    subjects; ag on dog2 only), a folder that is no evaluation folder and one whose results.json is empty."""
    import gradio as gr

    from boothkit.ui.app import Workspace
    from boothkit.ui.config import UiConfig
    from boothkit.ui.results import results_tab

    root = tmp_path_factory.mktemp("results-root")
    evaluation = make_evaluation_folder(root, only={"ag": ["dog2"]})
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("not an evaluation")
    (root / "empty").mkdir()
    (root / "empty" / "results.json").write_text(json.dumps({"methods": {}}))
    with gr.Blocks() as app:
        with gr.Tab("Results"):
            results_tab(gr, Workspace(UiConfig(root=str(root))))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True,
               allowed_paths=[str(root)])
    yield {"url": f"http://127.0.0.1:{port}/", "root": root, "evaluation": evaluation, "runs": read_runs(evaluation)}
    app.close()


@pytest.fixture(scope="module")
def client(page):
    from gradio_client import Client

    return Client(page["url"], verbose=False)


def result_of(runs, method: str, folder: str):
    (subject,) = [s for s in runs[method].subjects if s.folder == folder]
    return subject


def assert_gallery_shows(gallery: list[dict], evaluation: Path, subject, photos: Path) -> None:
    """The gallery: the subject's best samples (bytes equal to the files in the evaluation folder, captioned
    with prompt and DINO), then its reference photos."""
    expected = [(evaluation / subject.folder / subject.method / file, f"{p.prompt} · DINO {p.scores['DINO']:.3f}")
                for p in subject.best.per_prompt for file in p.files]
    assert sorted(path.name for path, _ in expected) == sorted(p.name for p in (evaluation / subject.folder /
                                                                                 subject.method).iterdir())
    shown, references = gallery[:len(expected)], gallery[len(expected):]
    assert [item["caption"] for item in shown] == [caption for _, caption in expected]
    for item, (path, _) in zip(shown, expected):
        assert Path(item["image"]).read_bytes() == path.read_bytes(), path
    names = sorted(p.name for p in photos.iterdir())
    assert [item["caption"] for item in references] == [f"reference: {name}" for name in names]
    for item, name in zip(references, names):
        assert Image.open(item["image"]).size == Image.open(photos / name).size  # 128 px: not shrunk


def test_open_results_shows_the_table_menus_plots_and_gallery(page, client):
    table, subjects, methods, lambda_plot, tradeoff_plot, gallery = client.predict("evaluation",
                                                                                    api_name="/open_results")
    runs = page["runs"]
    assert list(runs) == ["cfg", "ag", "wig"]
    assert table["headers"] == ["subject", "method", "DINO", "CLIP-I", "CLIP-T", "DINO-D", "CLIP-D", "PRES", "λ",
                                "ω"]
    k = len(METRICS)
    best_rows, mean_rows = table["data"][:-3], table["data"][-3:]
    assert [row[:2] for row in best_rows] == [["cat_statue", "cfg"], ["cat_statue", "wig"], ["dog2", "cfg"],
                                              ["dog2", "ag"], ["dog2", "wig"]]
    for folder, method, *cells in best_rows:
        best = result_of(runs, method, folder).best
        for cell, metric in zip(cells, METRICS):
            value = best.scores[metric]  # one image per prompt, no class samples: DINO-D, CLIP-D and PRES are None
            assert cell == "—" if value is None else float(cell) == pytest.approx(value, abs=1e-6), (folder, metric)
        assert float(cells[k]) == pytest.approx(best.setting.guidance_scale, rel=1e-5)
        assert cells[k + 1] == "—" if best.setting.omega is None else float(cells[k + 1]) == best.setting.omega
    with open(page["evaluation"] / "evaluation_summary.csv", newline="") as handle:  # the CLI's numbers
        summary = {(row["subject"], row["method"]): row for row in csv.DictReader(handle)}
    for folder, method, *cells in best_rows:
        row = summary[(folder, method)]
        assert cells[:k + 1] == [row[metric] or "—" for metric in METRICS] + [row["guidance_scale"]]
    for (label, method, *cells), run in zip(mean_rows, runs.values()):
        n = len(run.subjects)
        assert (label, method, cells[k:]) == (f"mean ± SE (n = {n})", run.method, ["", ""])
        for cell, metric in zip(cells, METRICS):  # by hand: the mean, and the sample std / √n
            values = [subject.best.scores[metric] for subject in run.subjects]
            if all(value is None for value in values):
                assert cell == "—"
                continue
            mean = sum(values) / n
            shown_mean, shown_se = cell.split(" ± ")
            assert float(shown_mean) == pytest.approx(mean, abs=1e-6)
            if n == 1:
                assert shown_se == "—"
            else:
                se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
                assert float(shown_se) == pytest.approx(se, abs=1e-6) and se > 0
    assert subjects["choices"] == [["cat_statue (cat statue)", "cat_statue"], ["dog2 (dog)", "dog2"]]
    assert subjects["value"] == "cat_statue"
    assert [value for _, value in methods["choices"]] == ["cfg", "ag", "wig"]
    assert methods["value"] == "cfg"  # ag did not evaluate cat_statue
    for plot in (lambda_plot, tradeoff_plot):
        assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/png;base64,")
    assert_gallery_shows(gallery, page["evaluation"], result_of(runs, "cfg", "cat_statue"),
                         page["root"] / "photos" / "cat_statue")


@pytest.mark.parametrize("folder, method", [("dog2", "ag"), ("dog2", "wig"), ("cat_statue", "wig")])
def test_show_subject_returns_the_chosen_subjects_and_methods_images(page, client, folder, method):
    lambda_plot, tradeoff_plot, gallery = client.predict("evaluation", folder, method, api_name="/show_subject")
    assert lambda_plot["plot"].startswith("data:image/png;base64,") and tradeoff_plot["type"] == "matplotlib"
    assert_gallery_shows(gallery, page["evaluation"], result_of(page["runs"], method, folder),
                         page["root"] / "photos" / folder)


def test_show_subject_needs_no_open_first(page):
    """A new session (a script calling the endpoint) shows a subject without opening the folder first."""
    from gradio_client import Client

    _, _, gallery = Client(page["url"], verbose=False).predict("evaluation", "dog2", "cfg", api_name="/show_subject")
    assert_gallery_shows(gallery, page["evaluation"], result_of(page["runs"], "cfg", "dog2"),
                         page["root"] / "photos" / "dog2")


def test_a_method_that_skipped_the_subject_shows_its_reference_photos_only(page, client):
    from boothkit.ui.results import subject_view

    _, _, gallery = client.predict("evaluation", "cat_statue", "ag", api_name="/show_subject")
    assert [item["caption"] for item in gallery] == [f"reference: {p.name}" for p in
                                                     sorted((page["root"] / "photos" / "cat_statue").iterdir())]
    *_, note = subject_view(page["root"], page["evaluation"], list(page["runs"].values()), "cat_statue", "ag")
    assert note.startswith("subject 'cat_statue' was not evaluated with ag (only with cfg, wig)")


@pytest.mark.parametrize("api, args, message", [
    ("/open_results", ["/etc"], "evaluation folder '/etc' is outside the folder this page may use"),
    ("/open_results", ["evaluation/../.."], "is outside the folder this page may use"),
    ("/open_results", ["plain"], "'plain' is not an evaluation folder: it has no results.json"),
    ("/open_results", ["missing"], "evaluation folder 'missing' does not exist or is not a folder"),
    ("/open_results", ["empty"], "'empty' holds no results"),
    ("/open_results", [" "], "type an evaluation folder"),
    ("/show_subject", ["/etc", "dog2", "cfg"], "is outside the folder this page may use"),
    ("/show_subject", ["evaluation", "horse", "cfg"], "subject 'horse' is not in this evaluation folder "
                                                      "(it holds cat_statue, dog2)"),
    ("/show_subject", ["evaluation", "dog2", "dpo"], "method 'dpo' is not in this evaluation folder"),
])
def test_user_errors_are_one_clear_line(client, api, args, message):
    import re

    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=re.escape(message)) as caught:
        client.predict(*args, api_name=api)
    assert "\n" not in str(caught.value)


# The plain functions -----------------------------------------------------------------------------------------

def test_the_figures_are_the_reports_for_every_method_of_the_subject(page):
    from boothkit.ui.results import subject_view

    runs = page["runs"]
    lambda_figure, tradeoff, _, note = subject_view(page["root"], page["evaluation"], list(runs.values()), "dog2",
                                                    "wig")
    assert note is None
    assert [axis.get_title() for axis in lambda_figure.axes] == ["cfg", "ag", "wig"]
    for axis, method in zip(lambda_figure.axes, runs):
        curves = lambda_curves(result_of(runs, method, "dog2"))
        lines = [line for line in axis.get_lines() if line.get_label() != "best"]
        assert [list(zip(line.get_xdata(), line.get_ydata())) for line in lines] == list(curves.values())
    by_method = {method: result_of(runs, method, "dog2") for method in runs}
    points, _ = tradeoff_points(by_method)
    assert len(points) == sum(len(s.history) for s in by_method.values())  # every evaluation has both scores
    ring = tradeoff.axes[0].collections[-1]  # the Pareto front, ringed
    assert sorted(map(tuple, ring.get_offsets().tolist())) == sorted(points[i] for i in pareto_front(points))


def test_images_outside_the_evaluation_folder_or_the_root_are_not_shown(page, tmp_path):
    from boothkit.ui.results import reference_items, sample_items

    subject = read_runs(page["evaluation"])["cfg"].subjects[0]
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    depth = len((page["evaluation"] / subject.folder / subject.method).resolve().parts) - 1
    escape = Path(*[".."] * depth, *outside.resolve().parts[1:]).as_posix()  # ../../../tmp/.../secret.png
    assert (page["evaluation"] / subject.folder / subject.method / escape).resolve() == outside.resolve()
    subject.best.per_prompt[0].files = [escape, "missing.png", *subject.best.per_prompt[0].files]
    shown = [Path(path) for path, _ in sample_items(page["evaluation"], subject)]
    assert shown == [page["evaluation"] / subject.folder / "cfg" / file for file in subject.best.images[2:]]
    assert reference_items(page["root"], str(tmp_path)) == []  # photos outside the root
    assert reference_items(page["root"], str(page["root"] / "no-photos")) == []
    assert len(reference_items(page["root"], str(page["root"] / "photos" / "dog2"))) == 5
