"""`--validation_every N` scores validation samples (DINO, CLIP-I, CLIP-T) into validation_scores.csv; `--keep_best`
keeps the LoRA (with `--train_mode full` a pipeline folder) of the best DINO (CLIP-T at least `--min_clip_t`) in
best/. Tiny models, 32 px, 2 denoising steps."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from boothkit.data.images import load_image_folder
from boothkit.evaluate.metrics import SubjectMetrics
from boothkit.families.sd import StableDiffusionFamily
from boothkit.testing.tiny import build_tiny

from test_train import PROMPT, assert_one_line_error, train_args

SNOW = "a sks dog in the snow"


@pytest.fixture(autouse=True)
def quick_validation(monkeypatch):
    """Validation images in 2 denoising steps instead of 50."""
    monkeypatch.setattr(StableDiffusionFamily, "default_inference_steps", 2)


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metric-models")
    return {kind: build_tiny(kind, root / kind, seed=0) for kind in ("dino", "clip")}


def scored_args(sd15, instance_dir, out, metric_models, *extra) -> list:
    return train_args(sd15, instance_dir, out, "--max_train_steps", 4, "--resolution", 32, "--learning_rate", 1e-2,
                      "--num_validation_images", 1, "--dino_model", metric_models["dino"],
                      "--clip_model", metric_models["clip"], *extra)


def read_scores(out: Path) -> list[dict]:
    with open(out / "validation_scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def lora_values(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The LoRA tensors in a key order that the checkpoint's (PEFT) and the LoRA file's (diffusers) names share."""
    def key(name: str) -> str:
        return name.replace(".default", "").replace("base_model.model.", "")
    return [tensors[name] for name in sorted(tensors, key=key)]


def test_scores_are_a_direct_scoring_of_the_saved_validation_images(sd15, instance_dir, tmp_path, run_cli,
                                                                     metric_models):
    out = tmp_path / "out"
    # No --validation_prompt: the instance prompt's samples are scored (and saved as validation images).
    result = run_cli(*scored_args(sd15, instance_dir, out, metric_models, "--validation_every", 2,
                                  "--num_validation_images", 2))
    assert result.code == 0, result.err
    rows = read_scores(out)
    assert [int(row["step"]) for row in rows] == [2, 4]
    metrics = SubjectMetrics(str(metric_models["dino"]), str(metric_models["clip"]), device="cpu")
    references = metrics.references([image for _, image in load_image_folder(instance_dir)])
    for row in rows:
        images = [Image.open(out / f"validation/step-{int(row['step']):06d}_{i}.png").convert("RGB") for i in range(2)]
        direct = metrics.score(images, PROMPT, references, identifier="sks")
        for name in ("DINO", "CLIP-I", "CLIP-T"):
            assert float(row[name]) == pytest.approx(direct[name], rel=1e-6, abs=1e-7), name
    assert not (out / "best").exists()  # no --keep_best


def test_keep_best_saves_the_lora_of_the_step_with_the_best_dino(sd15, instance_dir, tmp_path, run_cli,
                                                                 metric_models):
    out = tmp_path / "out"
    result = run_cli(*scored_args(sd15, instance_dir, out, metric_models, "--validation_every", 1,
                                  "--checkpointing_steps", 1, "--validation_prompt", SNOW, "--keep_best"))
    assert result.code == 0, result.err
    rows = read_scores(out)
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    best_step = int(max(rows, key=lambda row: float(row["DINO"]))["step"])
    score = json.loads((out / "best" / "score.json").read_text())
    assert score["step"] == best_step
    assert score["DINO"] == pytest.approx(max(float(row["DINO"]) for row in rows), rel=1e-6)
    best = lora_values(load_file(out / "best" / "pytorch_lora_weights.safetensors"))
    steps = {step: lora_values(load_file(out / f"checkpoint-{step}" / "trainable.safetensors")) for step in (1, 2, 3)}
    steps[4] = lora_values(load_file(out / "pytorch_lora_weights.safetensors"))
    for step, tensors in steps.items():
        same = len(tensors) == len(best) and all(torch.equal(a.float(), b.float()) for a, b in zip(tensors, best))
        assert same == (step == best_step), step


def test_keep_best_takes_the_best_dino_above_the_clip_t_floor(sd15, instance_dir, tmp_path, run_cli, metric_models,
                                                              monkeypatch):
    """Scores made to order (the real ones are kept but for DINO and CLIP-T): step 3 has the best DINO but
    misses the floor, so step 2 is kept; its LoRA is the checkpoint's of step 2."""
    dino, clip_t = iter([0.1, 0.5, 0.9, 0.2]), iter([0.3, 0.3, 0.0, 0.3])
    real = SubjectMetrics.score

    def made_up(self, *args, **kwargs):
        return {**real(self, *args, **kwargs), "DINO": next(dino), "CLIP-T": next(clip_t)}

    monkeypatch.setattr(SubjectMetrics, "score", made_up)
    out = tmp_path / "out"
    result = run_cli(*scored_args(sd15, instance_dir, out, metric_models, "--validation_every", 1,
                                  "--checkpointing_steps", 1, "--keep_best", "--min_clip_t", 0.2))
    assert result.code == 0, result.err
    assert [float(row["DINO"]) for row in read_scores(out)] == [0.1, 0.5, 0.9, 0.2]
    score = json.loads((out / "best" / "score.json").read_text())
    assert (score["step"], score["DINO"], score["CLIP-T"]) == (2, 0.5, 0.3)
    best = lora_values(load_file(out / "best" / "pytorch_lora_weights.safetensors"))
    checkpoint = lora_values(load_file(out / "checkpoint-2" / "trainable.safetensors"))
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(best, checkpoint, strict=True))


def test_a_floor_above_every_clip_t_writes_nothing_to_best(sd15, instance_dir, tmp_path, run_cli, metric_models):
    out = tmp_path / "out"
    result = run_cli(*scored_args(sd15, instance_dir, out, metric_models, "--validation_every", 2,
                                  "--keep_best", "--min_clip_t", 1.0))
    assert result.code == 0, result.err
    assert len(read_scores(out)) == 2
    assert not (out / "best").exists()
    lines = [line for line in result.err.splitlines() if "nothing written to best/" in line]
    assert len(lines) == 1, result.err


def test_resume_keeps_the_rows_up_to_the_checkpoint_and_the_best(sd15, instance_dir, tmp_path, run_cli,
                                                                 metric_models):
    out = tmp_path / "out"
    args = scored_args(sd15, instance_dir, out, metric_models, "--validation_every", 1, "--checkpointing_steps", 2,
                       "--keep_best")
    assert run_cli(*args).code == 0
    first = read_scores(out)
    result = run_cli(*args, "--resume_from_checkpoint", "checkpoint-2")
    assert result.code == 0, result.err
    rows = read_scores(out)
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    assert rows[:2] == first[:2]
    assert [float(r["DINO"]) for r in rows] == pytest.approx([float(r["DINO"]) for r in first], rel=1e-5)
    best_step = int(max(rows, key=lambda row: float(row["DINO"]))["step"])
    assert json.loads((out / "best" / "score.json").read_text())["step"] == best_step
    # Other metric models on resume: the scores would not compare.
    other = build_tiny("dino", tmp_path / "other-dino", seed=1)
    changed = [str(other) if str(arg) == str(metric_models["dino"]) else arg for arg in args]
    assert_one_line_error(run_cli(*changed, "--resume_from_checkpoint", "checkpoint-2"), "validation scoring")


@pytest.mark.parametrize("extra, fragment", [
    (["--keep_best"], "--keep_best needs --validation_every"),
    (["--validation_every", 0, "--keep_best"], "--keep_best needs --validation_every"),
    (["--validation_every", 2, "--min_clip_t", 0.2], "--min_clip_t applies to --keep_best"),
    (["--validation_every", 2, "--dino_model", "./no-such-dino"], "cannot load DINO model"),
])
def test_bad_flags_are_one_line_and_write_nothing(extra, fragment, sd15, instance_dir, tmp_path, run_cli,
                                                  metric_models):
    out = tmp_path / "out"
    args = train_args(sd15, instance_dir, out, "--max_train_steps", 2, "--resolution", 32,
                      "--clip_model", metric_models["clip"], *extra)
    assert_one_line_error(run_cli(*args), fragment)
    assert not out.exists() or not any(out.iterdir())


def test_full_training_keeps_a_pipeline_of_the_step_with_the_best_dino(sd15, instance_dir, tmp_path, run_cli,
                                                                        metric_models, monkeypatch):
    """--train_mode full (UNet and text encoder): best/ is a pipeline folder like the run's own, holding the trained
    weights of the best DINO above the floor. Scores made to order: step 3 has the best DINO but misses the floor,
    so step 2 is kept (neither the first nor the last step); its weights are the checkpoint's of step 2."""
    dino, clip_t = iter([0.1, 0.5, 0.9]), iter([0.3, 0.3, 0.0])
    real = SubjectMetrics.score

    def made_up(self, *args, **kwargs):
        return {**real(self, *args, **kwargs), "DINO": next(dino), "CLIP-T": next(clip_t)}

    monkeypatch.setattr(SubjectMetrics, "score", made_up)
    out = tmp_path / "out"
    result = run_cli(*train_args(sd15, instance_dir, out, "--train_mode", "full", "--train_text_encoder",
                                 "--max_train_steps", 3, "--resolution", 32, "--learning_rate", 1e-3,
                                 "--num_validation_images", 1, "--dino_model", metric_models["dino"],
                                 "--clip_model", metric_models["clip"], "--validation_every", 1,
                                 "--checkpointing_steps", 1, "--keep_best", "--min_clip_t", 0.2))
    assert result.code == 0, result.err
    rows = read_scores(out)
    assert [(int(r["step"]), float(r["DINO"]), float(r["CLIP-T"])) for r in rows] == [
        (1, 0.1, 0.3), (2, 0.5, 0.3), (3, 0.9, 0.0)]
    best_step = int(max((r for r in rows if float(r["CLIP-T"]) >= 0.2), key=lambda r: float(r["DINO"]))["step"])
    assert best_step == 2 and json.loads((out / "best" / "score.json").read_text())["step"] == best_step
    files = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}

    def trained(step: int) -> dict[str, dict[str, torch.Tensor]]:
        """The weights of each trained module at `step`: its checkpoint's, or at the last step the run's model."""
        if step == 3:
            return {name: load_file(out / file) for name, file in files.items()}
        state = load_file(out / f"checkpoint-{step}" / "trainable.safetensors")
        return {name: {key.removeprefix(name + "."): value for key, value in state.items()
                       if key.startswith(name + ".")} for name in files}

    best = {name: load_file(out / "best" / file) for name, file in files.items()}
    for step in (1, 2, 3):
        weights = trained(step)
        same = all(weights[name].keys() == best[name].keys()
                   and all(torch.equal(weights[name][key], best[name][key]) for key in best[name]) for name in files)
        assert same == (step == best_step), step
    # best/ loads as the run's model does (a diffusers pipeline: the VAE as the base stores it)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "best", safety_checker=None, requires_safety_checker=False)
    base = load_file(Path(sd15) / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipe.vae.state_dict()[key], value) for key, value in base.items())
    assert all(torch.equal(pipe.unet.state_dict()[key], value) for key, value in best["unet"].items())
    # ... and `boothkit sample` takes it as the README says, AG with the run's weak/
    samples = tmp_path / "samples"
    result = run_cli("sample", "--pretrained_model_name_or_path", out / "best", "--method", "ag",
                     "--weak_checkpoint_path", out / "weak", "--prompt", SNOW, "--output_dir", samples,
                     "--num_inference_steps", 2)
    assert result.code == 0, result.err
    record = json.loads((samples / "samples.json").read_text())[0]
    assert record["weak_lora"] == str(out / "weak") and (samples / record["file"]).is_file()
    # best/ is not part of the run's final model (as weak/ is not): evaluating that one does not read best/
    from boothkit.evaluate.keys import _weights_digest

    final = _weights_digest(out)
    shutil.rmtree(out / "best")
    assert _weights_digest(out) == final


@pytest.mark.parametrize("mode, user_file", [("lora", "best/pytorch_lora_weights.safetensors"),
                                             ("full", "best/unet/config.json")])
def test_a_users_file_in_best_stops_the_run_before_any_step(mode, user_file, sd15, instance_dir, tmp_path, run_cli,
                                                            metric_models, monkeypatch):
    from boothkit.train import trainer

    def no_step(run, step_index):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(trainer, "_optimizer_step", no_step)
    out = tmp_path / "out"
    (out / user_file).parent.mkdir(parents=True)
    (out / user_file).write_text("mine")
    result = run_cli(*scored_args(sd15, instance_dir, out, metric_models, "--train_mode", mode,
                                  "--validation_every", 1, "--keep_best", "--overwrite"))
    assert_one_line_error(result, "in the way", user_file)
    assert (out / user_file).read_text() == "mine"


def test_best_has_no_score_while_it_is_rewritten(tmp_path):
    """While a new best/ is written, best/score.json (the earlier best's) is gone: a run killed meanwhile leaves a
    best/ that its resume clears (`Scorer._resume_best`), never the earlier step's score beside newer weights."""
    from types import SimpleNamespace

    from boothkit.layout import OutputFolder
    from boothkit.train.scoring import Scorer

    score = tmp_path / "out" / "best" / "score.json"
    seen = []
    with OutputFolder(tmp_path / "out", "train") as folder:
        scorer = object.__new__(Scorer)  # only what keeping the best uses
        scorer.config, scorer.folder, scorer.best = SimpleNamespace(keep_best=True, min_clip_t=None), folder, None
        for step, dino in ((1, 0.1), (2, 0.5)):
            row = {"step": str(step), "DINO": str(dino), "CLIP-I": "0.2", "CLIP-T": "0.3"}
            scorer._keep_if_best(step, row, lambda: seen.append(score.exists()))
            assert json.loads(score.read_text())["step"] == step
    assert seen == [False, False]
