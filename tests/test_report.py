"""report.html (boothkit/evaluate/report.py) from hand-built results: no models, tiny PNGs in tmp_path."""

from __future__ import annotations

import base64
import io
import random
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from boothkit.evaluate.report import (best_image_path, lambda_curve_figure, lambda_curves, mean_and_standard_error,
                                      pareto_front, render_report, write_report)
from boothkit.evaluate.results import METRICS, Evaluation, MethodResults, PromptScores, Setting, SubjectResult
from boothkit.layout import OutputFolder, read_manifest

EVIL_SUBJECT = '</h2><script>alert("subject")</script>'
EVIL_PROMPT = 'a <img src=x onerror=alert(1)> "sks" & dog'
EVIL_FOLDER = "dog <b>&'2"  # a legal folder name full of HTML and URL specials


# Parsing the page ------------------------------------------------------------------------------------------

class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children, self.texts = tag, attrs, parent, [], []

    def text(self) -> str:
        return "".join(part if isinstance(part, str) else part.text() for part in self.texts)

    def find_all(self, tag: str, cls: str | None = None) -> list["Node"]:
        found = []
        for child in self.children:
            if child.tag == tag and (cls is None or cls in child.attrs.get("class", "").split()):
                found.append(child)
            found += child.find_all(tag, cls)
        return found


class Tree(HTMLParser):
    VOID = {"img", "br", "meta"}

    def __init__(self, page: str):
        super().__init__()
        self.root = self.current = Node("root", {}, None)
        self.tags: set[str] = set()
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        self.current.texts.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_endtag(self, tag):
        node = self.current
        while node.parent is not None and node.tag != tag:
            node = node.parent
        assert node.tag == tag, f"unbalanced </{tag}>"
        self.current = node.parent

    def handle_data(self, data):
        self.current.texts.append(data)


# Hand-built results ----------------------------------------------------------------------------------------

def tiny_png(path: Path, colour: tuple[int, int, int], size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def evaluation(lam, dino, clip_t, omega=None, clip_i=0.5, prompts=(), files_per_prompt=0, tag="") -> Evaluation:
    # The diversities and PRES: some present, some missing (one image per prompt, no class samples).
    diversity = None if dino is None or lam < 0 else round(0.05 + 0.01 * lam, 4)
    extra = {"DINO-D": diversity, "CLIP-D": None if diversity is None else diversity / 2,
             "PRES": None if omega == 1.0 or dino is None else round(dino - 0.1, 4)}
    per_prompt = [PromptScores(prompt=p, seeds=list(range(files_per_prompt)),
                               files=[f"{k:04d}_{tag}{j}.png" for k in range(files_per_prompt)],
                               scores={"DINO": None if dino is None else dino - 0.01 * j, "CLIP-I": clip_i,
                                       "CLIP-T": clip_t, "DINO-D": extra["DINO-D"], "CLIP-D": extra["CLIP-D"]})
                  for j, p in enumerate(prompts)]
    return Evaluation(setting=Setting(lam, omega), key=f"k{lam}-{omega}", per_prompt=per_prompt,
                      scores={"DINO": dino, "CLIP-I": clip_i, "CLIP-T": clip_t, **extra})


def subject_result(folder, subject, method, references, history, prompts) -> SubjectResult:
    best = max((e for e in history if e.scores["DINO"] is not None), key=lambda e: e.scores["DINO"])
    best.per_prompt = evaluation(best.setting.guidance_scale, best.scores["DINO"], best.scores["CLIP-T"],
                                 prompts=prompts, files_per_prompt=2, tag=method).per_prompt
    return SubjectResult(folder=folder, subject=subject, method=method, prompts=list(prompts),
                         reference_dir=str(references), history=history, best=best)


def build_world(tmp_path: Path) -> dict:
    """Two subjects (one with an evil name and prompt), methods cfg, ag (one subject only) and wig."""
    refs = {"dog2": tmp_path / "refs" / "dog2", EVIL_FOLDER: tmp_path / "refs" / "evil"}
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        tiny_png(refs["dog2"] / f"photo{i}.png", colour, size=(400, 300) if i == 0 else (8, 8))
    tiny_png(refs[EVIL_FOLDER] / "x.png", (9, 9, 9))
    prompts = {"dog2": ["a sks dog in the snow", "a red sks dog"], EVIL_FOLDER: [EVIL_PROMPT]}
    names = {"dog2": "dog", EVIL_FOLDER: EVIL_SUBJECT}
    histories = {  # λ deliberately out of order (golden-section order), ω interleaved
        ("cfg", "dog2"): [evaluation(5.0, 0.60, 0.30), evaluation(-2.0, 0.20, 0.35), evaluation(2.0, 0.55, 0.32),
                          evaluation(8.0, 0.58, 0.30), evaluation(2.0, 0.55, 0.32)],
        ("cfg", EVIL_FOLDER): [evaluation(3.0, 0.40, 0.20), evaluation(7.0, 0.45, 0.25)],
        ("ag", "dog2"): [evaluation(2.0, 0.62, 0.28, clip_i=None), evaluation(1.0, 0.50, 0.36, clip_i=None)],
        ("wig", "dog2"): [evaluation(4.0, 0.50, 0.31, omega=0.5), evaluation(1.0, 0.40, 0.33, omega=0.0),
                          evaluation(-1.0, 0.45, 0.33, omega=0.5), evaluation(3.0, 0.66, 0.29, omega=0.0),
                          evaluation(2.0, None, None, omega=1.0), evaluation(0.0, 0.35, 0.37, omega=1.0),
                          evaluation(6.0, 0.52, 0.30, omega=1.0)],
        ("wig", EVIL_FOLDER): [evaluation(1.0, 0.41, 0.27, omega=0.3), evaluation(2.0, 0.43, 0.26, omega=0.6)],
    }
    runs = {}
    for (method, folder), history in histories.items():
        subject = subject_result(folder, names[folder], method, refs[folder], history, prompts[folder])
        runs.setdefault(method, []).append(subject)
    runs = [MethodResults(method=m, settings={"optimize": "lambda"}, subjects=s) for m, s in runs.items()]
    root = tmp_path / "eval"
    for run in runs:  # the best images, where the evaluation writes them
        for subject in run.subjects:
            for file in subject.best.images:
                tiny_png(root / best_image_path(subject, file), (50, 50, 50))
    return {"runs": runs, "root": root, "refs": refs}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(world) -> dict:
    """The report, rendered once for the module (matplotlib takes about a second per figure here)."""
    ref_listing = {p: p.stat().st_mtime_ns for p in world["refs"]["dog2"].parent.rglob("*")}
    with OutputFolder(world["root"], "evaluate") as folder:
        path = write_report(folder, world["runs"])
    assert {p: p.stat().st_mtime_ns for p in world["refs"]["dog2"].parent.rglob("*")} == ref_listing
    return {**world, "path": path, "page": path.read_text(encoding="utf-8"),
            "tree": Tree(path.read_text(encoding="utf-8"))}


# Pure functions --------------------------------------------------------------------------------------------

def brute_force_front(points) -> list[int]:
    return [i for i, p in enumerate(points)
            if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for q in points)]


@pytest.mark.parametrize("points, expected", [
    ([], []),
    ([(0.3, 0.5)], [0]),
    ([(1, 1), (1, 1)], [0, 1]),  # duplicates do not dominate each other
    ([(1, 2), (2, 1), (1, 1), (2, 2)], [3]),
    ([(1, 1), (1, 0)], [0]),  # tie in x: the larger y dominates
    ([(0, 1), (1, 0), (0, 1), (1, 0)], [0, 1, 2, 3]),
    ([(3, 1), (2, 2), (1, 3), (2, 1), (1, 2), (3, 1)], [0, 1, 2, 5]),
    ([(1, 5), (2, 5), (3, 4)], [1, 2]),  # tie in y: the larger x dominates
])
def test_pareto_front_hand_examples(points, expected):
    assert pareto_front(points) == expected == brute_force_front(points)


def test_pareto_front_equals_brute_force_with_ties():
    rng = random.Random(0)
    for trial in range(500):
        grid = rng.choice([2, 3, 5, 100])  # small grids force ties and duplicates
        points = [(rng.randrange(grid) / grid, rng.randrange(grid) / grid) for _ in range(rng.randrange(1, 30))]
        assert pareto_front(points) == brute_force_front(points), points


def test_mean_and_standard_error_equal_numpy():
    values = [0.61, 0.42, None, 0.55, 0.48]
    present = np.array([v for v in values if v is not None])
    mean, se, n = mean_and_standard_error(values)
    assert n == 4 and mean == pytest.approx(present.mean(), rel=1e-12)
    assert se == pytest.approx(present.std(ddof=1) / np.sqrt(4), rel=1e-12)
    assert mean_and_standard_error([0.7]) == (0.7, None, 1)
    assert mean_and_standard_error([None]) == (None, None, 0)


def test_lambda_curves_are_sorted_with_one_line_per_omega(world):
    wig = world["runs"][2].subjects[0]
    assert lambda_curves(wig) == {0.0: [(1.0, 0.40), (3.0, 0.66)], 0.5: [(-1.0, 0.45), (4.0, 0.50)],
                                  1.0: [(0.0, 0.35), (6.0, 0.52)]}  # the ω = 1 point without DINO is left out
    cfg = world["runs"][0].subjects[0]
    assert lambda_curves(cfg) == {None: [(-2.0, 0.20), (2.0, 0.55), (5.0, 0.60), (8.0, 0.58)]}  # duplicate once


def test_lambda_figure_draws_sorted_lines_one_per_omega(world):
    by_method = {run.method: run.subjects[0] for run in world["runs"]}
    figure = lambda_curve_figure(by_method, {"cfg": "C0", "ag": "C1", "wig": "C2"})
    for axis, (method, subject) in zip(figure.axes, by_method.items()):
        curves = lambda_curves(subject)
        lines = [line for line in axis.get_lines() if line.get_label() != "best"]
        assert len(lines) == len(curves), method
        for line, points in zip(lines, curves.values()):
            assert list(line.get_xdata()) == sorted(line.get_xdata()) == [p[0] for p in points]
            assert list(line.get_ydata()) == [p[1] for p in points]


# The page --------------------------------------------------------------------------------------------------

def test_report_is_claimed_and_self_contained(report):
    assert report["path"] == report["root"] / "report.html"
    assert "report.html" in read_manifest(report["root"])["files"]
    for img in report["tree"].root.find_all("img", "plot"):
        assert img.attrs["src"].startswith("data:image/png;base64,")
    assert len(report["tree"].root.find_all("img", "lambda")) == 2
    assert len(report["tree"].root.find_all("img", "tradeoff")) == 2


def test_summary_table_equals_results(report):
    (table,) = report["tree"].root.find_all("table")[:1]
    header, *body = table.find_all("tr")
    assert [th.text() for th in header.find_all("th")] == ["subject", "method", *METRICS, "λ", "ω"]
    k = len(METRICS)
    assert all(len(tr.find_all("td")) == k + 4 for tr in body)
    rows = {(tr.attrs["data-subject"], tr.attrs["data-method"]): tr.find_all("td")
            for tr in report["tree"].root.find_all("tr", "best")}
    runs = report["runs"]
    assert len(rows) == sum(len(run.subjects) for run in runs) == 5
    for run in runs:
        for subject in run.subjects:
            cells = rows[(subject.folder, run.method)]
            assert [cells[0].text(), cells[1].text()] == [subject.folder, run.method]
            best = subject.best
            for cell, metric in zip(cells[2:2 + k], METRICS):
                value = best.scores[metric]
                assert cell.text() == ("—" if value is None else f"{value:.4f}")
                assert cell.attrs.get("data-value") == (None if value is None else repr(value))
            assert float(cells[2 + k].attrs["data-value"]) == best.setting.guidance_scale
            assert cells[3 + k].text() == ("—" if best.setting.omega is None else f"{best.setting.omega:g}")
    assert rows[("dog2", "cfg")][2 + k].text() == "5" and rows[("dog2", "wig")][3 + k].text() == "0"
    shown = [cell.text() for tr in body for cell in tr.find_all("td")[2:2 + k]]
    assert "—" in shown and any(text not in ("—", "") for text in shown)  # the new metrics: values and dashes


def test_summary_means_and_standard_errors_equal_numpy(report):
    means = {}
    for tr in report["tree"].root.find_all("tr", "mean"):
        cells = tr.find_all("td")
        n = sum(len(run.subjects) for run in report["runs"] if run.method == tr.attrs["data-method"])
        assert [cell.text() for cell in cells[:2]] == [f"mean ± SE (n = {n})", tr.attrs["data-method"]]
        means[tr.attrs["data-method"]] = cells[2:2 + len(METRICS)]
    assert list(means) == ["cfg", "ag", "wig"]
    for run in report["runs"]:
        for cell, metric in zip(means[run.method], METRICS):
            values = np.array([s.best.scores[metric] for s in run.subjects if s.best.scores[metric] is not None])
            if len(values) == 0:
                assert cell.text() == "—"
                continue
            mean_text, se_text = cell.text().split(" ± ")
            assert float(cell.attrs["data-mean"]) == pytest.approx(values.mean(), rel=1e-12)
            assert mean_text == f"{values.mean():.4f}"
            if len(values) == 1:
                assert se_text == "—" and cell.attrs["data-se"] == "None"
            else:
                se = values.std(ddof=1) / np.sqrt(len(values))
                assert float(cell.attrs["data-se"]) == pytest.approx(se, rel=1e-12)
                assert se_text == f"{se:.4f}"


def test_pareto_table_equals_brute_force(report):
    runs, shown = report["runs"], {}
    for section in report["tree"].root.find_all("section", "subject"):
        folder = section.attrs["data-subject"]
        everything = [(run.method, e) for run in runs for s in run.subjects if s.folder == folder for e in s.history
                      if e.scores["DINO"] is not None and e.scores["CLIP-T"] is not None]
        points = [(e.scores["CLIP-T"], e.scores["DINO"]) for _, e in everything]
        (table,) = section.find_all("table", "pareto")
        rows = [tr.find_all("td") for tr in table.find_all("tr")][1:]
        shown[folder] = sorted((cells[0].text(), float(cells[1].attrs["data-value"]),
                                float(cells[3].attrs["data-value"]), float(cells[4].attrs["data-value"]))
                               for cells in rows)
        assert shown[folder] == sorted((everything[i][0], everything[i][1].setting.guidance_scale, points[i][1],
                                        points[i][0]) for i in brute_force_front(points))
    # By hand: (method, λ, DINO, CLIP-T); cfg's λ = 2 was evaluated twice, and both copies are on the front.
    assert shown["dog2"] == sorted([("wig", 0.0, 0.35, 0.37), ("ag", 1.0, 0.50, 0.36), ("cfg", 2.0, 0.55, 0.32),
                                    ("cfg", 2.0, 0.55, 0.32), ("cfg", 5.0, 0.60, 0.30), ("wig", 3.0, 0.66, 0.29)])


def test_subject_sections_hold_references_and_best_images(report):
    sections = {s.attrs["data-subject"]: s for s in report["tree"].root.find_all("section", "subject")}
    assert list(sections) == ["dog2", EVIL_FOLDER]
    for folder, section in sections.items():
        (references,) = section.find_all("div", "references")
        thumbnails = references.find_all("img")
        photos = sorted(path.name for path in report["refs"][folder].iterdir())
        assert sorted(img.attrs["alt"] for img in thumbnails) == photos
        for img in thumbnails:
            header, data = img.attrs["src"].split(",", 1)
            assert header == "data:image/jpeg;base64"
            assert max(Image.open(io.BytesIO(base64.b64decode(data))).size) <= 160
        methods = [run.method for run in report["runs"] if any(s.folder == folder for s in run.subjects)]
        samples = {div.attrs["data-method"]: div for div in section.find_all("div", "samples")}
        assert list(samples) == methods
        for run in report["runs"]:
            for subject in (s for s in run.subjects if s.folder == folder):
                figures = samples[run.method].find_all("figure")
                assert [unquote(f.find_all("img")[0].attrs["src"]) for f in figures] == \
                    [f"{folder}/{run.method}/{file}" for file in subject.best.images]
                assert all((report["root"] / unquote(f.find_all("img")[0].attrs["src"])).is_file() for f in figures)
                captions = [f.find_all("figcaption")[0].text() for f in figures]
                assert captions == [f"{p.prompt}DINO {p.scores['DINO']:.3f}" for p in subject.best.per_prompt
                                    for _ in p.files]


def test_user_text_is_escaped(report):
    page, tree = report["page"], report["tree"]
    for evil in (EVIL_SUBJECT, EVIL_PROMPT, EVIL_FOLDER):
        assert evil not in page
    assert "script" not in tree.tags and "b" not in tree.tags
    assert len(tree.root.find_all("img")) == len(tree.root.find_all("img", "plot")) + sum(
        len(section.find_all("figure")) for section in tree.root.find_all("section", "subject"))
    (evil_section,) = [s for s in tree.root.find_all("section") if s.attrs["data-subject"] == EVIL_FOLDER]
    heading = evil_section.find_all("h2")[0].text()
    assert heading == f"{EVIL_FOLDER} ({EVIL_SUBJECT})"
    assert EVIL_PROMPT in evil_section.text()


def test_missing_reference_folder_is_reported_not_fatal(tmp_path):
    world = build_world(tmp_path)
    for path in world["refs"]["dog2"].iterdir():
        path.unlink()
    world["refs"]["dog2"].rmdir()
    tree = Tree(render_report(world["runs"]))
    (section, _) = tree.root.find_all("section", "subject")
    (note,) = section.find_all("p", "missing")
    assert "reference photos unavailable" in note.text() and "does not exist" in note.text()


def test_one_report_compares_every_method(report):
    tree = report["tree"]
    for section, methods in zip(tree.root.find_all("section", "subject"), [["cfg", "ag", "wig"], ["cfg", "wig"]]):
        assert [div.attrs["data-method"] for div in section.find_all("div", "samples")] == methods
    assert [tr.attrs["data-method"] for tr in tree.root.find_all("tr", "mean")] == ["cfg", "ag", "wig"]
