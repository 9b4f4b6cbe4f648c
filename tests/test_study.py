"""`boothkit study` (issue 15) on tiny models over 3 subjects of the DreamBooth dataset's layout
(tests/data/study: cat, cat2, can, 3 photos each at 64 px; see its ATTRIBUTION.md)."""

from __future__ import annotations

import csv
import math
import shutil
import statistics
from pathlib import Path

import pytest

from boothkit.testing.tiny import build_tiny

SUBJECTS = Path(__file__).parent / "data" / "study"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every study here runs on one thread, as each torchrun process does: float sums depend on the count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("study-models")
    return {kind: build_tiny(kind, root / kind) for kind in ("sd15", "dino", "clip")}


def plan_file(folder: Path, tiny: dict[str, Path]) -> Path:
    path = folder / "plan.toml"
    path.write_text(f"""
methods = ["cfg", "wig"]
[train]
max_train_steps = 2
[evaluate]
num_inference_steps = 2
num_images_per_prompt = 2
max_prompts = 1
max_evaluations = 2
omega_grid = [0.0, 1.0]
dino_model = "{tiny['dino']}"
clip_model = "{tiny['clip']}"
[recipes.dreambooth]
[recipes.strong]
learning_rate = 1e-3
""")
    return path


def study(run_cli, tiny, out: Path, plan: Path, *extra: str):
    return run_cli("study", "--pretrained_model_name_or_path", tiny["sd15"], "--instance_data_dir", SUBJECTS,
                   "--output_dir", out, "--plan", plan, "--estimate_steps", "0", *extra)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """One whole study (3 subjects x 2 recipes x 2 methods)."""
    from boothkit.cli import main

    folder = tmp_path_factory.mktemp("study")
    plan = plan_file(folder, tiny)
    assert main(["study", "--pretrained_model_name_or_path", str(tiny["sd15"]), "--instance_data_dir",
                 str(SUBJECTS), "--output_dir", str(folder / "out"), "--plan", str(plan)]) == 0
    return folder / "out", plan


def test_a_study_writes_one_row_per_subject_recipe_and_method(finished):
    out, _ = finished
    rows = read_csv(out / "study.csv")
    assert [(r["subject"], r["recipe"], r["method"]) for r in rows] == [
        (subject, recipe, method) for subject in ("can", "cat", "cat2") for recipe in ("dreambooth", "strong")
        for method in ("cfg", "wig")]
    assert {r["class"] for r in rows if r["subject"].startswith("cat")} == {"cat"}
    assert all(float(r["DINO"]) == float(r["DINO"]) for r in rows) and all(r["omega"] for r in rows
                                                                            if r["method"] == "wig")
    assert (out / "train" / "strong" / "cat2" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "probe" / "6-steps" / "pytorch_lora_weights.safetensors").is_file()  # the time estimate's


def test_study_html_shows_the_table_the_tradeoff_and_each_subjects_best_samples(finished):
    import re
    from urllib.parse import unquote

    out, _ = finished
    page = (out / "study.html").read_text()
    assert page.count('class="subject"') == 3 and 'class="plot tradeoff" src="data:image/png;base64,' in page
    linked = [unquote(src) for src in re.findall(r'<img src="([^"]+)"', page) if not src.startswith("data:")]
    assert len(linked) == 3 * 2 * 2 * 2 and all((out / path).is_file() for path in linked)  # 2 images each


def test_the_tables_means_and_errors_equal_a_direct_computation(finished):
    out, _ = finished
    rows = read_csv(out / "study.csv")
    text = (out / "study.md").read_text()
    for recipe in ("dreambooth", "strong"):
        for method in ("cfg", "wig"):
            values = [float(r["DINO"]) for r in rows if r["recipe"] == recipe and r["method"] == method]
            mean, error = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
            line = next(l for l in text.splitlines() if l.startswith(f"| {recipe} | {method} | 3 |"))
            assert f"{mean:.4f} ± {error:.4f}" in line
            cats = [float(r["DINO"]) for r in rows if r["recipe"] == recipe and r["method"] == method
                    and r["class"] == "cat"]
            line = next(l for l in text.splitlines() if l.startswith(f"| {recipe} | {method} | cat | 2 |"))
            assert f"{statistics.fmean(cats):.4f} ± {statistics.stdev(cats) / math.sqrt(2):.4f}" in line


def test_a_rerun_recomputes_nothing_and_a_killed_study_resumes(finished, run_cli, tiny, monkeypatch, tmp_path):
    import boothkit.study.run as study_run

    out, plan = finished
    trainings, evaluations = [], []
    train_job, evaluate_job = study_run.train_job, study_run.evaluate_job
    monkeypatch.setattr(study_run, "train_job", lambda *a: trainings.append(a[2].name) or train_job(*a))
    monkeypatch.setattr(study_run, "evaluate_job", lambda *a: evaluations.append(a[2].name) or evaluate_job(*a))
    before = (out / "study.csv").read_text()
    assert study(run_cli, tiny, out, plan).code == 0
    assert trainings == [] and evaluations == [] and (out / "study.csv").read_text() == before
    killed = tmp_path / "killed"  # a study that stopped after its first two jobs' trainings
    shutil.copytree(out, killed)
    for record in sorted((killed / "jobs").glob("*__*.json"))[2:]:
        record.unlink()
    for csv_file in ("study.csv", "study.md"):
        (killed / csv_file).unlink()
    assert study(run_cli, tiny, killed, plan).code == 0
    assert len(trainings) == 4 and (killed / "study.csv").read_text() == before


def test_two_processes_give_the_same_study_csv_as_one(finished, tiny, tmp_path):
    """`torchrun --nproc_per_node 2 -m boothkit study ...`: each process takes every other job."""
    import os
    import subprocess
    import sys

    out, plan = finished
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
               "-m", "boothkit", "study", "--pretrained_model_name_or_path", str(tiny["sd15"]), "--instance_data_dir",
               str(SUBJECTS), "--output_dir", str(tmp_path / "two"), "--plan", str(plan)]
    environment = dict(os.environ, OMP_NUM_THREADS="1")  # as the reference study ran (`finished`)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "study plan: 3 subject(s) x 2 recipe(s)" in result.stdout and "s per training step" in result.stdout
    assert "s per evaluation image" in result.stdout and "h of evaluation (72 images)" in result.stdout
    assert (tmp_path / "two" / "study.csv").read_text() == (out / "study.csv").read_text()


def test_a_users_study_csv_is_never_replaced(run_cli, tiny, tmp_path, finished):
    from test_train import assert_one_line_error

    out, plan = finished
    target = tmp_path / "mine"
    shutil.copytree(out, target)
    (target / "study.csv").write_text("my own numbers\n")
    assert_one_line_error(study(run_cli, tiny, target, plan), "was not written by boothkit study")
    assert (target / "study.csv").read_text() == "my own numbers\n"


@pytest.mark.parametrize("extra,message", [
    (["--subjects", "dog9"], "subject 'dog9' has no photo folder"),
    (["--recipes", "magic"], "unknown recipe 'magic'"),
])
def test_bad_study_input_ends_in_one_line(run_cli, tiny, tmp_path, extra, message):
    from test_train import assert_one_line_error

    assert_one_line_error(run_cli("study", "--pretrained_model_name_or_path", tiny["sd15"], "--instance_data_dir",
                                  SUBJECTS, "--output_dir", tmp_path / "o", *extra), message)


@pytest.mark.parametrize("recipe, options, kept", [("dreambooth", "", "pytorch_lora_weights.safetensors"),
                                                   ("full", 'train_mode = "full"', "model_index.json")])
def test_with_keep_best_the_study_evaluates_the_kept_model_and_shows_the_training_curve(recipe, options, kept, run_cli,
                                                                                       tiny, tmp_path):
    """The kept model is evaluated, a LoRA or with --train_mode full a pipeline folder (`evaluate` takes it as the
    full model it is, as it takes the run's own)."""
    import json

    plan = tmp_path / "plan.toml"
    plan.write_text(f"""
methods = ["cfg"]
subjects = ["cat"]
[train]
max_train_steps = 2
validation_every = 1
num_validation_images = 1
keep_best = true
dino_model = "{tiny['dino']}"
clip_model = "{tiny['clip']}"
[evaluate]
num_inference_steps = 2
num_images_per_prompt = 1
max_prompts = 1
dino_model = "{tiny['dino']}"
clip_model = "{tiny['clip']}"
[recipes.{recipe}]
{options}
""")
    out = tmp_path / "out"
    result = study(run_cli, tiny, out, plan, "--no_optimize")
    assert result.code == 0, result.err
    best = out / "train" / recipe / "cat" / "best"
    assert (best / kept).is_file()
    results = json.loads((out / "eval" / recipe / "cat" / "results.json").read_text())
    assert str(best) in json.dumps(results)  # the kept model was evaluated (its path is in the settings)
    assert 'class="plot training"' in (out / "study.html").read_text()


def test_an_evaluation_record_says_which_of_the_runs_models_it_evaluated(tiny, tmp_path, monkeypatch):
    """With keep_best, an evaluation of the final model (the run kept nothing, or an older boothkit evaluated it)
    is not taken for one of best/: when best/ holds a model the evaluation runs again, once."""
    import boothkit.study.run as study_run
    from boothkit.config import validate_config
    from boothkit.study.config import StudyConfig
    from boothkit.study.plan import build_plan

    plan_path = tmp_path / "plan.toml"
    plan_path.write_text('methods = ["cfg"]\nsubjects = ["cat"]\n[train]\nvalidation_every = 1\nkeep_best = true\n'
                         '[recipes.full]\ntrain_mode = "full"\n')
    out = tmp_path / "out"
    config = validate_config(StudyConfig, {"pretrained_model_name_or_path": str(tiny["sd15"]),
                                           "instance_data_dir": str(SUBJECTS), "output_dir": str(out),
                                           "plan": str(plan_path)})
    plan = build_plan(config)
    evaluated = []
    monkeypatch.setattr(study_run, "train_job", lambda *args: None)
    monkeypatch.setattr(study_run, "evaluate_job", lambda *args: evaluated.append(
        study_run.evaluation_options(*args).get("lora_dir")))
    study_run.run_job(config, plan, plan.jobs[0], out)  # nothing kept: the final model
    best = out / "train" / "full" / "cat" / "best"
    best.mkdir(parents=True)
    (best / "model_index.json").write_text("{}")
    study_run.run_job(config, plan, plan.jobs[0], out)
    study_run.run_job(config, plan, plan.jobs[0], out)
    assert evaluated == [None, str(best)]
