"""`boothkit train --report_to tensorboard` and repeatable `--validation_prompt` on the tiny SD 1.5 model."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from boothkit.config import validate_config
from boothkit.families.sd import StableDiffusionFamily
from boothkit.train.config import TrainConfig

from test_train import read_log, train_args

PROMPTS = ["a sks dog in the snow", "a sks dog on the beach"]


@pytest.fixture(autouse=True)
def quick_validation(monkeypatch):
    """Validation images in 2 denoising steps instead of 50: these tests check where images go, not how good."""
    monkeypatch.setattr(StableDiffusionFamily, "default_inference_steps", 2)


def two_prompt_run(sd15, instance_dir, out, *extra) -> list[str]:
    return train_args(sd15, instance_dir, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                      "--validation_steps", 2, "--num_validation_images", 1, "--validation_prompt", PROMPTS[0],
                      "--validation_prompt", PROMPTS[1], *extra)


def events(out):
    """TensorBoard's own reading of OUT/logs (purged as TensorBoard shows it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def assert_scalars_match_the_log(out) -> None:
    accumulator, rows = events(out), read_log(out)
    for name in ("loss", "lr"):
        logged = [(event.step, event.value) for event in accumulator.Scalars(name)]
        assert [step for step, _ in logged] == [int(row["step"]) for row in rows]
        assert [value for _, value in logged] == pytest.approx([float(row[name]) for row in rows], rel=1e-6)


def test_tensorboard_logs_the_steps_and_the_images_of_each_prompt(sd15, instance_dir, tmp_path, run_cli):
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    result = run_cli(*two_prompt_run(sd15, instance_dir, out, "--report_to", "tensorboard"))
    assert result.code == 0, result.err
    assert_scalars_match_the_log(out)
    accumulator = events(out)
    for k in (0, 1):
        images = accumulator.Images(f"validation/prompt-{k}/0")
        assert [image.step for image in images] == [2, 4]
        for image in images:  # the logged image is the saved file, pixel for pixel
            logged = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
            saved = np.asarray(Image.open(out / f"validation/prompt-{k}/step-{image.step:06d}_0.png").convert("RGB"))
            assert np.array_equal(logged, saved)
    manifest = set(json.loads((out / ".boothkit-manifest.json").read_text())["files"])
    event_files = sorted(p.relative_to(out).as_posix() for p in (out / "logs").rglob("*") if p.is_file())
    assert event_files and set(event_files) <= manifest  # boothkit's: --overwrite and resume know them

    # A resume from checkpoint-2 redoes steps 3-4: TensorBoard shows each step once, as train_log.csv does.
    result = run_cli(*two_prompt_run(sd15, instance_dir, out, "--report_to", "tensorboard", "--max_train_steps", 6,
                                     "--resume_from_checkpoint", "latest"))
    assert result.code == 0, result.err
    assert [int(row["step"]) for row in read_log(out)] == list(range(1, 7))
    assert_scalars_match_the_log(out)
    assert [image.step for image in events(out).Images("validation/prompt-1/0")] == [2, 4, 6]
    event_files = sorted(p.relative_to(out).as_posix() for p in (out / "logs").rglob("*") if p.is_file())
    assert len(event_files) == 2
    assert set(event_files) <= set(json.loads((out / ".boothkit-manifest.json").read_text())["files"])

    # --overwrite removes the earlier run's event files with its other files.
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 1, "--overwrite")).code == 0
    assert not (out / "logs").exists()


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_one_line_and_writes_nothing(report_to, sd15, instance_dir, tmp_path, run_cli,
                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, report_to, None)  # `import tensorboard` raises ImportError
    out = tmp_path / "out"
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 1, "--report_to", report_to))
    assert result.code == 2
    assert result.err.strip().count("\n") == 0
    assert f"--report_to {report_to} needs the {report_to} package: pip install {report_to}" in result.err
    assert not out.exists()


def test_two_validation_prompts_give_two_sets_of_images_and_the_prompts_file(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    result = run_cli(*two_prompt_run(sd15, instance_dir, out))
    assert result.code == 0, result.err
    for k in (0, 1):
        assert sorted(p.name for p in (out / f"validation/prompt-{k}").iterdir()) == [
            "step-000002_0.png", "step-000004_0.png"]
    prompts = json.loads((out / "validation/prompts.json").read_text())["prompts"]
    assert prompts == [{"folder": f"validation/prompt-{k}", "concept": None, "prompt": PROMPTS[k], "steps": [2, 4]}
                       for k in (0, 1)]
    images = [np.asarray(Image.open(out / f"validation/prompt-{k}/step-000004_0.png")) for k in (0, 1)]
    assert not np.array_equal(*images)  # each folder shows its own prompt
    assert not (out / "logs").exists()  # --report_to none (the default) logs nowhere else

    # A resume with other prompts: the redone step 4 moves to the new prompt of prompt-1/.
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                 "--validation_steps", 2, "--num_validation_images", 1, "--validation_prompt",
                                 PROMPTS[0], "--test_prompts", "a sks dog in a bucket",
                                 "--resume_from_checkpoint", "latest"))
    assert result.code == 0, result.err
    prompts = json.loads((out / "validation/prompts.json").read_text())["prompts"]
    assert [(p["folder"], p["prompt"], p["steps"]) for p in prompts] == [
        ("validation/prompt-0", PROMPTS[0], [2, 4]), ("validation/prompt-1", PROMPTS[1], [2]),
        ("validation/prompt-1", "a sks dog in a bucket", [4])]


def test_validation_prompt_accepts_one_prompt_a_list_and_the_test_prompts_alias():
    base = {"pretrained_model_name_or_path": "m", "instance_data_dir": "d", "instance_prompt": "p",
            "output_dir": "o"}
    assert validate_config(TrainConfig, dict(base, validation_prompt="one")).validation_prompt == ["one"]
    assert validate_config(TrainConfig, dict(base, test_prompts=["a", "b"])).validation_prompt == ["a", "b"]
    assert validate_config(TrainConfig, base).validation_prompt == []
    assert validate_config(TrainConfig, base).report_to == "none"


def test_a_concepts_list_may_give_a_concept_several_validation_prompts(tmp_path):
    from boothkit.train.concepts import ConceptImages, ValidationPrompt, read_concepts
    from boothkit.train.validation import validation_image_names

    listed = tmp_path / "concepts.json"
    listed.write_text(json.dumps([{"instance_prompt": "zwx dog", "instance_data_dir": "a", "validation_prompt": "v"},
                                  {"instance_prompt": "qkp cat", "instance_data_dir": "b",
                                   "validation_prompt": ["c1", "c2"]}]))
    validations = ConceptImages(read_concepts(listed), [[], []]).validations()
    assert validations == [ValidationPrompt(0, None, "v"), ValidationPrompt(1, 0, "c1"), ValidationPrompt(1, 1, "c2")]
    assert [validation_image_names(3, 1, concept, index)[0] for concept, index, _ in validations] == [
        "validation/concept-0/step-000003_0.png", "validation/concept-1/prompt-0/step-000003_0.png",
        "validation/concept-1/prompt-1/step-000003_0.png"]
