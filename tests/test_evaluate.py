"""`boothkit evaluate` on tiny models: outputs, search, caching and resume, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from boothkit.data.images import sample_subject_dir
from boothkit.evaluate.score import ScoreConfig, run_score
from boothkit.guidance.sampler import GuidedSampler
from boothkit.testing.tiny import build_tiny

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
    return ["evaluate", "--pretrained_model_path", sd15, "--lora_base_dir", layout["loras"],
            "--instance_data_dir", layout["instance"], "--evaluation_prompts_path", layout["prompts"],
            "--output_dir", layout["out"], "--dino_model", scorers["dino"], "--clip_model", scorers["clip"],
            "--num_inference_steps", 3, "--max_prompts", 2, *extra]


def read_summary(out: Path) -> list[dict]:
    with open(out / "evaluation_summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_cfg_lambda_search_writes_every_output(sd15, layout, scorers, run_cli):
    result = run_cli(*evaluate_args(sd15, layout, scorers, "--method", "cfg", "--optimize", "--tolerance", 4))
    assert result.code == 0, result.err
    assert "unknown_thing" in result.err  # skipped folders are named in one warning
    out = layout["out"]
    rows = read_summary(out)
    assert list(rows[0]) == ["subject", "num_prompts", "CLIP-I", "CLIP-T", "DINO", "guidance_scale"]
    assert rows[0]["subject"] == "dog2" and rows[0]["num_prompts"] == "2"
    results = json.loads((out / "results.json").read_text())["subjects"][0]
    history = results["history"]
    assert 4 <= len(history) <= 6 and all(-10 <= row["guidance_scale"] <= 10 for row in history)
    assert float(rows[0]["DINO"]) == pytest.approx(max(row["DINO"] for row in history), abs=1e-6)
    assert results["prompts"] == ["a sks dog in the jungle", "a sks dog in the snow"]  # identifier before the noun
    assert sorted(p.name for p in (out / "dog2").iterdir()) == ["0000_a_sks_dog_in_the_jungle.png",
                                                                "0001_a_sks_dog_in_the_snow.png"]
    # The summary's scores are the metrics of the final images (scored independently by `boothkit score`).
    per_prompt = results["best"]["per_prompt"][0]
    single = out / "single"
    single.mkdir()
    shutil.copy(out / "dog2" / per_prompt["files"][0], single)
    scores = run_score(ScoreConfig(images=str(single), references=str(layout["instance"] / "dog2"),
                                   prompt=per_prompt["prompt"], dino_model=str(scorers["dino"]),
                                   clip_model=str(scorers["clip"])))
    for metric in ("DINO", "CLIP-I", "CLIP-T"):
        assert scores[metric] == pytest.approx(per_prompt[metric], abs=1e-5)
    report = (out / "report.html").read_text()
    assert "dog2/0000_a_sks_dog_in_the_jungle.png" in report and "plots/dog2_lambda.png" in report
    assert (out / "plots" / "dog2_lambda.png").stat().st_size > 1000


def test_a_cached_rerun_runs_no_model_and_an_interrupted_run_resumes(sd15, layout, scorers, run_cli, monkeypatch):
    calls = []
    original = GuidedSampler.generate
    monkeypatch.setattr(GuidedSampler, "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    args = evaluate_args(sd15, layout, scorers, "--method", "cfg", "--optimize", "--tolerance", 0.5)
    partial = run_cli(*args, "--max_evaluations", 3)  # as if interrupted after 3 evaluations
    assert partial.code == 0, partial.err
    assert len(calls) == 3
    first = run_cli(*args)
    assert first.code == 0, first.err
    evaluations = len(json.loads((layout["out"] / "results.json").read_text())["subjects"][0]["history"])
    assert len(calls) == evaluations  # the first 3 came from the cache
    summary = (layout["out"] / "evaluation_summary.csv").read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("a cached re-run must not load or run a model")

    monkeypatch.setattr("boothkit.evaluate.runner.load_family", no_model)
    monkeypatch.setattr("boothkit.evaluate.runner.SubjectMetrics", no_model)
    again = run_cli(*args)
    assert again.code == 0, again.err
    assert again.out == first.out
    assert (layout["out"] / "evaluation_summary.csv").read_text() == summary


def test_wig_sweeps_omega_and_lambda(sd15, layout, scorers, run_cli):
    result = run_cli(*evaluate_args(sd15, layout, scorers, "--method", "wig", "--optimize", "both",
                                    "--omega_grid", 0.0, 1.0, "--max_evaluations", 3, "--max_prompts", 1))
    assert result.code == 0, result.err
    rows = read_summary(layout["out"])
    assert list(rows[0])[-2:] == ["guidance_scale", "omega"]
    subject = json.loads((layout["out"] / "results.json").read_text())["subjects"][0]
    assert [row["omega"] for row in subject["omega_table"]] == [0.0, 1.0]
    assert len(subject["history"]) == 6
    assert float(rows[0]["omega"]) in (0.0, 1.0)
    assert (layout["out"] / "plots" / "dog2_omega.png").is_file()


def test_ag_evaluates_with_the_weak_checkpoint(sd15, layout, scorers, run_cli):
    result = run_cli(*evaluate_args(sd15, layout, scorers, "--method", "ag", "--guidance_scale", 1.5,
                                    "--max_prompts", 1))
    assert result.code == 0, result.err
    assert read_summary(layout["out"])[0]["guidance_scale"] == "1.5"


def error_line(result) -> str:
    assert result.code == 2 and "Traceback" not in result.err, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.err
    return lines[0]


def test_evaluate_errors(sd15, layout, scorers, run_cli):
    shutil.rmtree(layout["loras"] / "dog2" / "weak")
    assert "weak" in error_line(run_cli(*evaluate_args(sd15, layout, scorers, "--method", "ag")))
    assert "--optimize" in error_line(run_cli(*evaluate_args(sd15, layout, scorers, "--optimize", "omega")))
    for image in (layout["instance"] / "dog2").iterdir():
        image.unlink()
    assert "dog2" in error_line(run_cli(*evaluate_args(sd15, layout, scorers)))
    layout["prompts"].write_text("{not json")
    assert "prompts" in error_line(run_cli(*evaluate_args(sd15, layout, scorers)))


def test_subjects_are_split_across_processes(sd15, layout, scorers, tmp_path):
    """Under a distributed launcher each process evaluates its share; the main process merges them."""
    import os
    import subprocess
    import sys

    shutil.copytree(layout["instance"] / "dog2", layout["instance"] / "dogcd")
    shutil.copytree(layout["loras"] / "dog2", layout["loras"] / "dogcd")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29518", "-m", "boothkit",
               *map(str, evaluate_args(sd15, layout, scorers, "--max_prompts", 1))]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.count("summary:") == 1  # only the main process reports
    assert [row["subject"] for row in read_summary(layout["out"])] == ["dog2", "dogcd"]
    assert sorted(p.name for p in (layout["out"] / "subjects").iterdir()) == ["dog2.json", "dogcd.json"]
