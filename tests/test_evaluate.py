"""`boothkit evaluate` on tiny models: outputs, search, methods side by side, user files, errors, processes."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boothkit.cli import build_parser
from boothkit.config import build_config
from boothkit.data.images import sample_subject_dir
from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.results import Evaluation, MethodResults, PromptScores
from boothkit.evaluate.score import ScoreConfig, run_score
from boothkit.evaluate.search import expected_evaluations, search_subject
from boothkit.guidance.sampler import GuidedSampler
from boothkit.layout import MANIFEST_NAME, read_manifest
from boothkit.testing.tiny import build_tiny
from boothkit.tune import golden_section_evaluations, golden_section_search

PROMPTS = {"subjects": ["dog", "cat statue"], "prompts": ["a <subject> in the jungle", "a <subject> in the snow",
                                                          "a red <subject>"]}


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorers")
    return {kind: build_tiny(kind, root / kind, seed=0) for kind in ("dino", "clip")}


@pytest.fixture
def layout(tmp_path, sd15_lora) -> dict[str, Path]:
    """The seed's layout: instance_data_dir/<folder>/, lora_base_dir/<folder>/ (+ weak/), prompts JSON."""
    instance, loras = tmp_path / "instance", tmp_path / "loras"
    shutil.copytree(sample_subject_dir(), instance / "dog2")
    shutil.copytree(sd15_lora, loras / "dog2", ignore=shutil.ignore_patterns("checkpoint-*", "validation"))
    (instance / "unknown_thing").mkdir()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    return {"instance": instance, "loras": loras, "prompts": prompts, "out": tmp_path / "eval"}


def evaluate_args(sd15, layout, scorers, *extra) -> list:
    return ["evaluate", "--pretrained_model_name_or_path", sd15, "--lora_base_dir", layout["loras"],
            "--instance_data_dir", layout["instance"], "--evaluation_prompts_path", layout["prompts"],
            "--output_dir", layout["out"], "--dino_model", scorers["dino"], "--clip_model", scorers["clip"],
            "--num_inference_steps", 2, "--max_prompts", 1, *extra]


def read_summary(out: Path) -> list[dict]:
    with open(out / "evaluation_summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def read_runs(out: Path) -> dict[str, MethodResults]:
    methods = json.loads((out / "results.json").read_text())["methods"]
    return {method: MethodResults.from_json(data) for method, data in methods.items()}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cfg_lambda_search_writes_every_output(sd15, layout, scorers, run_cli):
    result = run_cli(*evaluate_args(sd15, layout, scorers, "--method", "cfg", "--optimize", "--max_evaluations", 3,
                                    "--max_prompts", 2))
    assert result.code == 0, result.err
    assert "unknown_thing" in result.err  # skipped folders are named in one warning
    out = layout["out"]
    rows = read_summary(out)
    assert list(rows[0]) == ["subject", "method", "num_prompts", "CLIP-I", "CLIP-T", "DINO", "DINO-D", "CLIP-D", "PRES",
                             "guidance_scale"]
    assert (rows[0]["DINO-D"], rows[0]["CLIP-D"], rows[0]["PRES"]) == ("", "", "")  # one image per prompt, no PRES
    assert rows[0]["subject"] == "dog2" and rows[0]["method"] == "cfg" and rows[0]["num_prompts"] == "2"
    subject = read_runs(out)["cfg"].subjects[0]
    assert len(subject.history) == 3 and all(-10 <= e.setting.guidance_scale <= 10 for e in subject.history)
    assert float(rows[0]["DINO"]) == pytest.approx(max(e.scores["DINO"] for e in subject.history), abs=1e-6)
    assert subject.prompts == ["a sks dog in the jungle", "a sks dog in the snow"]  # identifier before the noun
    assert sorted(p.name for p in (out / "dog2" / "cfg").iterdir()) == ["0000_a_sks_dog_in_the_jungle.png",
                                                                       "0001_a_sks_dog_in_the_snow.png"]
    # The summary's scores are the metrics of the final images (scored independently by `boothkit score`).
    per_prompt = subject.best.per_prompt[0]
    single = out.parent / "single"
    single.mkdir()
    shutil.copy(out / "dog2" / "cfg" / per_prompt.files[0], single)
    scores = run_score(ScoreConfig(images=str(single), references=str(layout["instance"] / "dog2"),
                                   prompt=per_prompt.prompt, dino_model=str(scorers["dino"]),
                                   clip_model=str(scorers["clip"])))
    for metric in ("DINO", "CLIP-I", "CLIP-T"):
        assert scores[metric] == pytest.approx(per_prompt.scores[metric], abs=1e-5)
    report = (out / "report.html").read_text()
    assert "dog2/cfg/0000_a_sks_dog_in_the_jungle.png" in report
    # Every file boothkit wrote is in the manifest (the lock is gone after the run).
    manifest = set(json.loads((out / MANIFEST_NAME).read_text())["files"])
    assert manifest == set(digests(out)) - {MANIFEST_NAME}


def test_a_cached_rerun_runs_no_model_and_an_interrupted_run_resumes(sd15, layout, scorers, run_cli, monkeypatch):
    calls = []
    original = GuidedSampler.generate
    monkeypatch.setattr(GuidedSampler, "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    args = evaluate_args(sd15, layout, scorers, "--method", "cfg", "--optimize", "--tolerance", 4)
    partial = run_cli(*args, "--max_evaluations", 3)  # as if interrupted after 3 evaluations
    assert partial.code == 0, partial.err
    assert len(calls) == 3
    first = run_cli(*args)
    assert first.code == 0, first.err
    evaluations = len(read_runs(layout["out"])["cfg"].subjects[0].history)
    assert evaluations == golden_section_evaluations(-10, 10, 4) == 5
    assert len(calls) == evaluations  # the first 3 came from the cache
    summary = (layout["out"] / "evaluation_summary.csv").read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("a cached re-run must not load or run a model")

    monkeypatch.setattr("boothkit.evaluate.models.load_family", no_model)
    monkeypatch.setattr("boothkit.evaluate.models.SubjectMetrics", no_model)
    again = run_cli(*args)
    assert again.code == 0, again.err
    assert again.out == first.out
    assert (layout["out"] / "evaluation_summary.csv").read_text() == summary


def test_wig_sweeps_omega_and_lambda(sd15, layout, scorers, run_cli):
    result = run_cli(*evaluate_args(sd15, layout, scorers, "--method", "wig", "--optimize", "both",
                                    "--omega_grid", 0.0, 1.0, "--max_evaluations", 2))
    assert result.code == 0, result.err
    rows = read_summary(layout["out"])
    assert list(rows[0])[-2:] == ["guidance_scale", "omega"]
    subject = read_runs(layout["out"])["wig"].subjects[0]
    assert [e.setting.omega for e in subject.omega_table()] == [0.0, 1.0]
    assert len(subject.history) == 4
    assert float(rows[0]["omega"]) == subject.best.setting.omega


def test_ag_evaluates_with_the_weak_checkpoint(sd15, layout, scorers, run_cli, tmp_path):
    """CFG + AG with weak = fine is CFG(s) of the fine model for any λ (docs/guidance.md): evaluating AG with the
    fine LoRA as --weak_checkpoint_path gives the images of `--method cfg --guidance_scale s`, and AG with the
    real weak checkpoint (trained 5 of 30 steps) gives other images. A weak LoRA that is not loaded, or not
    used, breaks one of the two."""
    common = ["--guidance_scale", 1.5, "--cfg_scale", 3.0]
    real = run_cli(*evaluate_args(sd15, layout, scorers, "--method", "ag", *common))
    assert real.code == 0, real.err
    layout_fine = dict(layout, out=tmp_path / "eval_weak_is_fine")
    fine = layout["loras"] / "dog2"
    same = run_cli(*evaluate_args(sd15, layout_fine, scorers, "--method", "ag", *common,
                                  "--weak_checkpoint_path", fine))
    assert same.code == 0, same.err
    layout_cfg = dict(layout, out=tmp_path / "eval_cfg")
    cfg = run_cli(*evaluate_args(sd15, layout_cfg, scorers, "--method", "cfg", "--guidance_scale", 3.0))
    assert cfg.code == 0, cfg.err
    name = "0000_a_sks_dog_in_the_jungle.png"
    with_real_weak = pixels(layout["out"] / "dog2" / "ag" / name)
    with_fine_as_weak = pixels(layout_fine["out"] / "dog2" / "ag" / name)
    cfg_of_fine = pixels(layout_cfg["out"] / "dog2" / "cfg" / name)
    assert np.abs(with_fine_as_weak - cfg_of_fine).max() <= 1  # equal up to rounding
    assert np.abs(with_real_weak - with_fine_as_weak).mean() > 2.0
    best = {out: read_runs(out)[method].subjects[0].best for out, method in
            ((layout["out"], "ag"), (layout_fine["out"], "ag"), (layout_cfg["out"], "cfg"))}
    assert best[layout_fine["out"]].scores["DINO"] == pytest.approx(best[layout_cfg["out"]].scores["DINO"], abs=1e-3)
    assert best[layout["out"]].key != best[layout_fine["out"]].key  # the weak LoRA is part of the cache key
    assert read_summary(layout["out"])[0]["guidance_scale"] == "1.5"


def test_weak_checkpoint_path_holds_one_weak_lora_per_subject(sd15, layout, scorers, run_cli, tmp_path, monkeypatch):
    """--weak_checkpoint_path W with W/<folder>/: the weak LoRA of each subject. Same content as the default
    LORA_BASE_DIR/<folder>/weak/ → the same cache keys: the run is answered by the cache."""
    args = evaluate_args(sd15, layout, scorers, "--method", "ag", "--guidance_scale", 2.0)
    assert run_cli(*args).code == 0
    weak_root = tmp_path / "weak_loras"
    shutil.copytree(layout["loras"] / "dog2" / "weak", weak_root / "dog2")
    monkeypatch.setattr(GuidedSampler, "generate", lambda *a, **k: pytest.fail("the cache should answer"))
    again = run_cli(*args, "--weak_checkpoint_path", weak_root)
    assert again.code == 0, again.err
    single_file = weak_root / "dog2" / "pytorch_lora_weights.safetensors"
    assert run_cli(*args, "--weak_checkpoint_path", single_file).code == 0  # one subject: a single LoRA file


def test_several_methods_share_one_folder(sd15, layout, scorers, run_cli):
    out = layout["out"]
    assert run_cli(*evaluate_args(sd15, layout, scorers, "--method", "cfg", "--guidance_scale", 1.0)).code == 0
    first_cfg = digests(out / "dog2" / "cfg")
    result = run_cli(*evaluate_args(sd15, layout, scorers, "--method", "wig", "--guidance_scale", 1.0))
    assert result.code == 0, result.err
    assert [(row["subject"], row["method"], row["omega"]) for row in read_summary(out)] == [
        ("dog2", "cfg", ""), ("dog2", "wig", "0.5")]
    assert set(read_runs(out)) == {"cfg", "wig"}
    assert digests(out / "dog2" / "cfg") == first_cfg  # kept
    report = (out / "report.html").read_text()
    assert "dog2/cfg/" in report and "dog2/wig/" in report  # one report comparing both
    # Evaluating cfg again (another λ) replaces cfg's images and results, and keeps wig's.
    (out / "dog2" / "cfg" / "notes.txt").write_text("mine")
    wig_images = digests(out / "dog2" / "wig")
    assert run_cli(*evaluate_args(sd15, layout, scorers, "--method", "cfg", "--guidance_scale", 5.0)).code == 0
    runs = read_runs(out)
    assert runs["cfg"].subjects[0].best.setting.guidance_scale == 5.0 and runs["wig"].subjects[0].best.setting.omega == 0.5
    assert digests(out / "dog2" / "wig") == wig_images
    now = digests(out / "dog2" / "cfg")
    assert set(now) == set(first_cfg) | {"notes.txt"}
    assert all(now[name] != first_cfg[name] for name in first_cfg)  # the λ = 5 images
    assert (out / "dog2" / "cfg" / "notes.txt").read_text() == "mine"


def test_results_of_other_models_are_dropped(sd15, layout, scorers, run_cli):
    """cfg and ag evaluated into one folder, then the LoRA retrained (other bytes) and cfg evaluated again: ag's
    results came from the old LoRA, so its rows, results and images go, named in one warning line."""
    out = layout["out"]
    for method in ("cfg", "ag"):
        assert run_cli(*evaluate_args(sd15, layout, scorers, "--method", method, "--guidance_scale", 2.0)).code == 0
    assert [row["method"] for row in read_summary(out)] == ["cfg", "ag"]
    lora = layout["loras"] / "dog2" / "pytorch_lora_weights.safetensors"
    data = bytearray(lora.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor: as if retrained
    lora.write_bytes(bytes(data))
    result = run_cli(*evaluate_args(sd15, layout, scorers, "--method", "cfg", "--guidance_scale", 2.0))
    assert result.code == 0, result.err
    warnings = [line for line in result.err.splitlines() if "dropping" in line]
    assert len(warnings) == 1 and "ag" in warnings[0], result.err
    assert [row["method"] for row in read_summary(out)] == ["cfg"]
    assert set(read_runs(out)) == {"cfg"}
    assert "dog2/ag/" not in (out / "report.html").read_text() and not (out / "dog2" / "ag").exists()
    assert set(read_manifest(out)["files"]) == {name for name in digests(out) if not name.startswith(".boothkit")}


def test_user_files_are_never_replaced_or_removed(sd15, layout, scorers, run_cli):
    """Pointed at the reference photos' own folder, evaluate refuses; with --overwrite it writes beside the
    photos; a second --overwrite removes only what boothkit wrote. Not one user file changes."""
    photos = layout["instance"] / "dog2"
    (photos / "notes.txt").write_text("my notes")
    before = digests(photos)
    args = evaluate_args(sd15, dict(layout, out=photos), scorers, "--guidance_scale", 2.0)
    refused = run_cli(*args)
    assert refused.code == 2 and "not written by boothkit" in refused.err and "Traceback" not in refused.err
    assert digests(photos) == before
    for _ in range(2):  # the second --overwrite removes the first run's files first
        result = run_cli(*args, "--overwrite")
        assert result.code == 0, result.err
        after = digests(photos)
        assert {name: after[name] for name in before} == before
        assert "dog2/cfg/0000_a_sks_dog_in_the_jungle.png" in after
    # A user file where boothkit wants to write is refused before any evaluation, and left as it was.
    out = layout["out"]
    out.mkdir()
    (out / "report.html").write_text("my report")
    result = run_cli(*evaluate_args(sd15, layout, scorers, "--overwrite"))
    assert result.code == 2 and "report.html" in result.err
    assert (out / "report.html").read_text() == "my report" and not (out / "cache").exists()


def test_expected_evaluations_is_the_number_the_search_makes():
    """The progress bar's total: golden-section counts for several ranges, tolerances and budgets, times the
    ω grid for --optimize both."""

    class Objective:
        def __init__(self, config):
            self.config, self.calls = config, 0

        def evaluate(self, subject, setting):
            self.calls += 1
            dino = -(setting.guidance_scale - 1.7) ** 2 - (setting.omega or 0.0)
            return Evaluation(setting, "key", {"DINO": dino, "CLIP-I": None, "CLIP-T": None},
                              [PromptScores("p", [0], [], {})])

    class Entry:
        folder, subject, images_dir = "dog", "dog", Path(".")

    class Subject:
        folder, prompts, entry = "dog", ("p",), Entry()

    base = dict(pretrained_model_name_or_path="m", lora_base_dir="l", instance_data_dir="i",
                evaluation_prompts_path="p", output_dir="o")
    cases = [((-10, 10), 0.05, None), ((-10, 10), 4, None), ((0, 3), 0.01, None), ((-10, 10), 0.05, 6),
             ((1, 2), 0.5, None), ((-5, 15), 1e-3, 20), ((0, 1), 2.0, None)]
    for (low, high), tolerance, budget in cases:
        for optimize, method in (("lambda", "cfg"), ("both", "wig")):
            config = EvaluateConfig(**base, lambda_range=(low, high), tolerance=tolerance, max_evaluations=budget,
                                    optimize=optimize, method=method, omega_grid=[0.0, 0.5, 1.0])
            objective = Objective(config)
            search_subject(objective, Subject(), 7.5)
            assert objective.calls == expected_evaluations(config), (low, high, tolerance, budget, optimize)
            made = golden_section_search(lambda x: -abs(x - 0.3), low, high, tol=tolerance, max_evals=budget)
            assert made.evaluations == golden_section_evaluations(low, high, tolerance, budget)
    # (hi - lo) * phi**(n - 1) <= tol: 20 * phi**13 = 0.038 <= 0.05 < 20 * phi**12; 20 * phi**4 = 2.9 <= 4 < 4.7
    assert [golden_section_evaluations(-10, 10, 0.05), golden_section_evaluations(-10, 10, 4),
            golden_section_evaluations(0, 1, 2.0), golden_section_evaluations(-10, 10, 0.05, 6)] == [14, 5, 2, 6]


def test_the_old_model_flag_is_a_hidden_alias(tmp_path):
    parser = build_parser()
    required = ["--lora_base_dir", "l", "--instance_data_dir", "i", "--evaluation_prompts_path", "p",
                "--output_dir", "o"]
    for flag in ("--pretrained_model_name_or_path", "--pretrained_model_path"):
        args = parser.parse_args(["evaluate", flag, "model", *required])
        assert build_config(EvaluateConfig, args).pretrained_model_name_or_path == "model"
    config_file = tmp_path / "evaluate.yaml"
    config_file.write_text("pretrained_model_path: from_file\n")
    args = parser.parse_args(["evaluate", "--config", str(config_file), *required])
    assert build_config(EvaluateConfig, args).pretrained_model_name_or_path == "from_file"
    evaluate_parser = parser._subparsers._group_actions[0].choices["evaluate"]
    help_text = evaluate_parser.format_help()
    assert "--pretrained_model_name_or_path" in help_text and "--pretrained_model_path" not in help_text


def error_line(result) -> str:
    assert result.code == 2 and "Traceback" not in result.err, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.err
    return lines[0]


def test_evaluate_errors(sd15, layout, scorers, run_cli, tmp_path):
    assert "--optimize" in error_line(run_cli(*evaluate_args(sd15, layout, scorers, "--optimize", "omega")))
    missing = tmp_path / "nowhere"
    assert "does not exist" in error_line(run_cli(*evaluate_args(sd15, layout, scorers, "--method", "ag",
                                                                 "--weak_checkpoint_path", missing)))
    empty = tmp_path / "weak_loras"
    empty.mkdir()
    assert "'dog2'" in error_line(run_cli(*evaluate_args(sd15, layout, scorers, "--method", "ag",
                                                         "--weak_checkpoint_path", empty)))
    shutil.copytree(layout["instance"] / "dog2", layout["instance"] / "dogcd")
    shutil.copytree(layout["loras"] / "dog2", layout["loras"] / "dogcd")
    single = layout["loras"] / "dog2" / "weak"
    assert "2 subjects" in error_line(run_cli(*evaluate_args(sd15, layout, scorers, "--method", "ag",
                                                             "--weak_checkpoint_path", single)))
    shutil.rmtree(layout["loras"] / "dog2" / "weak")
    assert "weak" in error_line(run_cli(*evaluate_args(sd15, layout, scorers, "--method", "ag")))
    for image in (layout["instance"] / "dog2").iterdir():
        image.unlink()
    assert "dog2" in error_line(run_cli(*evaluate_args(sd15, layout, scorers)))
    layout["prompts"].write_text("{not json")
    assert "prompts" in error_line(run_cli(*evaluate_args(sd15, layout, scorers)))
    assert not layout["out"].exists()  # nothing was written


def test_subjects_are_split_across_processes(sd15, layout, scorers, tmp_path):
    """Under a distributed launcher each process evaluates its share; the main process merges them and
    records the other process's files in the manifest."""
    import os
    import subprocess
    import sys

    shutil.copytree(layout["instance"] / "dog2", layout["instance"] / "dogcd")
    shutil.copytree(layout["loras"] / "dog2", layout["loras"] / "dogcd")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29518", "-m", "boothkit",
               *map(str, evaluate_args(sd15, layout, scorers, "--guidance_scale", 2.0))]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    out = layout["out"]
    assert completed.stdout.count("summary:") == 1  # only the main process reports
    assert [row["subject"] for row in read_summary(out)] == ["dog2", "dogcd"]
    assert sorted(p.name for p in (out / "subjects" / "cfg").iterdir()) == ["dog2.json", "dogcd.json"]
    assert not list(out.glob(".boothkit-manifest.rank*"))  # the main process absorbed the other's claims
    manifest = set(read_manifest(out)["files"])
    assert manifest == {name for name in digests(out) if not name.startswith(".boothkit-manifest")}
    assert "subjects/cfg/dogcd.json" in manifest and any(name.startswith("cache/dogcd/") for name in manifest)


class KilledAtTheLastBarrier(Exception):
    pass


class SecondProcessState:
    """accelerate's state as process 1 of 2 sees it; the run is killed at its last barrier (the main process
    never gets to see this process's files)."""

    def __init__(self, *args, **kwargs):
        import torch

        self.device, self.process_index, self.num_processes, self.is_main_process = torch.device("cpu"), 1, 2, False
        self.barriers = 0

    def wait_for_everyone(self):
        self.barriers += 1
        if self.barriers == 2:
            raise KilledAtTheLastBarrier


def test_a_killed_distributed_run_leaves_a_folder_that_can_be_rerun(sd15, layout, scorers, run_cli, monkeypatch,
                                                                   tmp_path):
    """Process 1 of a 2-process run writes its subject's cache entry and results, then the run is killed before
    the main process records them. Its files are boothkit's all the same: a rerun reuses them (and does not
    refuse them as the user's), and --overwrite removes them."""
    from boothkit.evaluate import run as run_module
    from boothkit.evaluate.run import run_evaluate
    from boothkit.layout import OutputFolder

    shutil.copytree(layout["instance"] / "dog2", layout["instance"] / "dogcd")
    shutil.copytree(layout["loras"] / "dog2", layout["loras"] / "dogcd")
    args = evaluate_args(sd15, layout, scorers, "--guidance_scale", 2.0)
    config = build_config(EvaluateConfig, build_parser().parse_args([str(arg) for arg in args]))
    out = layout["out"]
    with OutputFolder(out, "evaluate") as folder:  # what the main process did before the first barrier
        folder.claim("results.json", "evaluation_summary.csv", "report.html")
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "PartialState", SecondProcessState)
        with pytest.raises(KilledAtTheLastBarrier):
            run_evaluate(config)
    written = {name for name in digests(out) if not name.startswith(".boothkit")}
    assert "subjects/cfg/dogcd.json" in written and any(name.startswith("cache/dogcd/") for name in written)
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)

    rerun = run_cli(*args)
    assert rerun.code == 0, rerun.err
    assert [row["subject"] for row in read_summary(out)] == ["dog2", "dogcd"]
    assert written <= set(read_manifest(out)["files"])

    overwrite = run_cli(*evaluate_args(sd15, dict(layout, out=killed), scorers, "--guidance_scale", 2.0,
                                       "--subjects", "dog2", "--overwrite"))
    assert overwrite.code == 0, overwrite.err
    assert not (killed / "cache" / "dogcd").exists() and not (killed / "subjects" / "cfg" / "dogcd.json").exists()
    assert set(read_manifest(killed)["files"]) == {name for name in digests(killed) if not name.startswith(".boothkit")}


@pytest.mark.parametrize("low, high", [(-1e308, 1e308), (-2e6, 10), (0, 1e7), (float("-inf"), 1)])
def test_lambda_range_must_be_finite_and_bounded(run_cli, tmp_path, low, high):
    """A range whose width overflows (or whose bounds are no guidance scale) is refused with one line before any
    work: the golden search would otherwise evaluate λ = ±inf."""
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--pretrained_model_name_or_path", tmp_path / "m", "--lora_base_dir", tmp_path / "l",
                     "--instance_data_dir", tmp_path / "i", "--evaluation_prompts_path", tmp_path / "p.json",
                     "--output_dir", out, "--optimize", "--lambda_range", low, high)
    assert "--lambda_range" in error_line(result)
    assert not out.exists()
    EvaluateConfig(pretrained_model_name_or_path="m", lora_base_dir="l", instance_data_dir="i",
                   evaluation_prompts_path="p", output_dir="o", lambda_range=(-1e6, 1e6))  # the bound itself: fine
