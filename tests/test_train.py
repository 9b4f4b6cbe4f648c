"""`boothkit train` on tiny SD 1.5 / 2.1 models: the real CLI, checked through the files it writes."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from peft.utils import get_peft_model_state_dict

from boothkit.train.class_images import generate_class_images, missing_class_indices
from boothkit.families import load_family

PROMPT = "a photo of sks dog"


def train_args(model: Path, instance: Path, out: Path, *extra) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", model, "--instance_data_dir", instance,
            "--instance_prompt", PROMPT, "--output_dir", out, *extra]


def read_log(out: Path) -> list[dict]:
    with open(out / "train_log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def lora_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def generate(model: Path, lora_dir: Path | None, seed: int = 0) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    return pipe(PROMPT, num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np").images


@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_training_writes_the_layout_and_diffusers_loads_it(kind, tiny_models, instance_dir, tmp_path, run_cli):
    model, out = tiny_models[kind], tmp_path / "out"
    result = run_cli(*train_args(model, instance_dir, out, "--max_train_steps", 20, "--checkpointing_steps", 10,
                                 "--learning_rate", 1e-3, "--validation_prompt", "a sks dog in the snow",
                                 "--num_validation_images", 2, "--validation_steps", 10))
    assert result.code == 0, result.err
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "weak" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoint-10" / "state.json").is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        "step-000010_0.png", "step-000010_1.png", "step-000020_0.png", "step-000020_1.png"]
    log = read_log(out)
    assert [int(row["step"]) for row in log] == list(range(1, 21))
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["config"]["max_train_steps"] == 20 and saved["resolved"]["weak_checkpoint_step"] == 4
    assert saved["resolved"]["prediction_type"] == ("v_prediction" if kind == "sd21" else "epsilon")
    assert set(saved["versions"]) >= {"torch", "diffusers", "transformers", "peft"}
    assert all(key.startswith("unet.") for key in lora_keys(out / "pytorch_lora_weights.safetensors"))
    # The LoRA loads with diffusers' own loader and changes the images; weak and final differ.
    base, fine, weak = generate(model, None), generate(model, out), generate(model, out / "weak")
    assert np.abs(fine - base).max() > 1e-3
    assert np.abs(fine - weak).max() > 1e-4


def test_lora_alpha_is_kept_in_the_file(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 2, "--rank", 2,
                               "--lora_alpha", 8)).code == 0
    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(out, adapter_name="subject")
    config = pipe.unet.peft_config["subject"]
    assert (config.r, config.lora_alpha) == (2, 8)


def test_loss_falls_when_overfitting_one_image(sd15, instance_dir, tmp_path, run_cli):
    single = tmp_path / "single"
    single.mkdir()
    (single / "00.jpg").write_bytes((instance_dir / "00.jpg").read_bytes())
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, single, out, "--max_train_steps", 200, "--learning_rate", 1e-3,
                               "--rank", 8, "--checkpointing_steps", 1000)).code == 0
    losses = [float(row["loss"]) for row in read_log(out)]
    assert np.mean(losses[-40:]) < 0.9 * np.mean(losses[:40])


def test_text_encoder_lora_is_saved_and_loads(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 3, "--train_text_encoder",
                               "--learning_rate", 1e-2)).code == 0
    keys = lora_keys(out / "pytorch_lora_weights.safetensors")
    assert any(key.startswith("text_encoder.") for key in keys)
    assert any(key.startswith("unet.") for key in keys)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    # B ("up") starts at zero: a trained text-encoder LoRA has moved it.
    text_up = [key for key in keys if key.startswith("text_encoder.") and key.endswith(".lora_B.weight")]
    assert text_up and all(weights[key].abs().max() > 0 for key in text_up)
    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(out, adapter_name="subject")
    # Every tensor of the file arrived in the text encoder, with its value.
    loaded = get_peft_model_state_dict(pipe.text_encoder, adapter_name="subject")
    assert len(loaded) == sum(key.startswith("text_encoder.") for key in keys)
    loaded_up = sorted(value.abs().max().item() for key, value in loaded.items() if "lora_B" in key)
    assert loaded_up == sorted(weights[key].abs().max().item() for key in text_up)


def test_same_seed_same_weights_and_caching_changes_nothing(sd15, instance_dir, tmp_path, run_cli):
    runs = {}
    for name, extra in (("a", []), ("b", []), ("nocache", ["--no_cache_latents"])):
        out = tmp_path / name
        assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 6, "--random_flip",
                                   "--train_batch_size", 2, *extra)).code == 0
        runs[name] = load_file(out / "pytorch_lora_weights.safetensors")
    for key in runs["a"]:  # cached latents are encoded one photo at a time, as uncached ones: the same bits
        assert torch.equal(runs["a"][key], runs["b"][key]) and torch.equal(runs["a"][key], runs["nocache"][key])


def test_config_file_with_flag_override(sd15, instance_dir, tmp_path, run_cli):
    config = tmp_path / "train.yaml"
    config.write_text(f"pretrained_model_name_or_path: {sd15}\ninstance_data_dir: {instance_dir}\n"
                      f"instance_prompt: {PROMPT}\nmax_train_steps: 50\nrank: 2\n")
    out = tmp_path / "out"
    assert run_cli("train", "--config", config, "--output_dir", out, "--max_train_steps", 3).code == 0
    saved = json.loads((out / "train_config.json").read_text())["config"]
    assert (saved["max_train_steps"], saved["rank"]) == (3, 2)


# Resume ---------------------------------------------------------------------------------------------

RESUME_STEPS = ("--max_train_steps", 120, "--checkpointing_steps", 20, "--train_batch_size", 2,
                "--random_flip", "--train_text_encoder", "--lr_scheduler", "cosine")


LORA_FILES = ("pytorch_lora_weights.safetensors", "weak/pytorch_lora_weights.safetensors")


def kill_9_and_resume(model: Path, instance: Path, tmp_path: Path, run_cli, flags: tuple, first_checkpoint: int,
                      last_step: int, files: tuple[str, ...] = LORA_FILES) -> dict[str, torch.Tensor]:
    """Train uninterrupted; train again, `kill -9` the run as soon as `checkpoint-<first_checkpoint>` exists, and
    resume it: `files` (the LoRA and the weak LoRA) and the loss log equal the uninterrupted run's bit for bit.
    Returns the first file's tensors."""
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert run_cli(*train_args(model, instance, reference, *flags)).code == 0
    command = [sys.executable, "-m", "boothkit", *map(str, train_args(model, instance, interrupted, *flags))]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = interrupted / f"checkpoint-{first_checkpoint}"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.is_dir(), "the run never reached its first checkpoint"
    assert not (interrupted / f"checkpoint-{last_step}").exists()

    result = run_cli(*train_args(model, instance, interrupted, *flags, "--resume_from_checkpoint", "latest"))
    assert result.code == 0, result.err
    for name in files:
        expected, resumed = load_file(reference / name), load_file(interrupted / name)
        assert expected.keys() == resumed.keys()
        for key in expected:
            assert torch.equal(expected[key], resumed[key]), (name, key)
    assert read_log(reference) == read_log(interrupted)
    return load_file(interrupted / files[0])


def test_resume_after_kill_9_is_bit_identical(sd15, instance_dir, tmp_path, run_cli):
    kill_9_and_resume(sd15, instance_dir, tmp_path, run_cli, RESUME_STEPS, first_checkpoint=20, last_step=120)


def test_checkpoints_total_limit_and_named_resume(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 8, "--checkpointing_steps", 2,
                               "--checkpoints_total_limit", 2)).code == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 8, "--checkpointing_steps", 2,
                                 "--checkpoints_total_limit", 2, "--resume_from_checkpoint", "checkpoint-4"))
    assert result.code == 0, result.err
    assert "removing checkpoint-6" in result.err  # the abandoned continuation of the older checkpoint
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert [int(row["step"]) for row in read_log(out)] == list(range(1, 9))


def test_resume_refuses_an_incompatible_run(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 4, "--checkpointing_steps", 2)).code == 0
    before = (out / "pytorch_lora_weights.safetensors").read_bytes()
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                 "--rank", 8, "--resume_from_checkpoint", "latest"))
    assert_one_line_error(result, "cannot resume", "--rank")
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == before


def test_latest_with_nothing_to_resume(sd15, instance_dir, tmp_path, run_cli):
    fresh = tmp_path / "fresh"  # an empty or missing folder: a new run starts
    assert run_cli(*train_args(sd15, instance_dir, fresh, "--max_train_steps", 2,
                               "--resume_from_checkpoint", "latest")).code == 0
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, occupied, "--resume_from_checkpoint", "latest")),
                          "not written by boothkit", "--overwrite")
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    # A boothkit folder without checkpoints: nothing to resume either.
    assert run_cli(*train_args(sd15, instance_dir, fresh, "--max_train_steps", 2, "--overwrite")).code == 0
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, fresh, "--resume_from_checkpoint", "latest")),
                          "no checkpoint to resume", "--overwrite")


# Prior preservation -----------------------------------------------------------------------------------

def test_prior_preservation_generates_exactly_the_missing_images(sd15, instance_dir, tmp_path, run_cli):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for name in ("00.jpg", "01.jpg"):  # the user's own class images are kept and counted
        (class_dir / f"mine_{name}").write_bytes((instance_dir / name).read_bytes())
    out = tmp_path / "out"
    result = run_cli(*train_args(sd15, instance_dir, out, "--with_prior_preservation", "--class_prompt",
                                 "a photo of dog", "--class_data_dir", class_dir, "--num_class_images", 5,
                                 "--max_train_steps", 3, "--sample_batch_size", 2))
    assert result.code == 0, result.err
    names = sorted(p.name for p in class_dir.iterdir())
    assert names == ["class_00000.png", "class_00001.png", "class_00002.png", "mine_00.jpg", "mine_01.jpg"]
    before = {p.name: p.read_bytes() for p in class_dir.iterdir()}
    result = run_cli(*train_args(sd15, instance_dir, out, "--with_prior_preservation", "--class_prompt",
                                 "a photo of dog", "--class_data_dir", class_dir, "--num_class_images", 6,
                                 "--max_train_steps", 3, "--overwrite"))
    assert result.code == 0, result.err
    after = {p.name: p.read_bytes() for p in class_dir.iterdir()}
    assert set(after) - set(before) == {"class_00003.png"}
    assert all(after[name] == data for name, data in before.items())


def test_interrupted_class_generation_resumes_to_the_same_images(sd15, tmp_path):
    family = load_family(str(sd15))
    whole, parts, other_batch = tmp_path / "whole", tmp_path / "parts", tmp_path / "other_batch"

    def generate(folder, wanted, batch_size):
        indices = missing_class_indices(folder, wanted)
        return generate_class_images(family, folder, "a photo of dog", indices, batch_size, seed=3, resolution=32)

    assert generate(whole, 4, 2) == 4
    # Interrupted after the first batch, then run again: the same files, bit for bit.
    assert generate(parts, 2, 2) == 2
    assert generate(parts, 4, 2) == 2
    # Another batch size: each image keeps its own seed, so only float rounding can differ.
    assert generate(other_batch, 4, 3) == 4
    for name in (f"class_0000{i}.png" for i in range(4)):
        assert (whole / name).read_bytes() == (parts / name).read_bytes()
        a = np.asarray(Image.open(whole / name), dtype=int)
        b = np.asarray(Image.open(other_batch / name), dtype=int)
        assert np.abs(a - b).max() <= 1


# Bad input ----------------------------------------------------------------------------------------------

def assert_one_line_error(result, *fragments: str) -> None:
    assert result.code != 0
    lines = [line for line in result.err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_and_empty_instance_dirs(sd15, tmp_path, run_cli):
    assert_one_line_error(run_cli(*train_args(sd15, tmp_path / "nope", tmp_path / "o1")), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli(*train_args(sd15, empty, tmp_path / "o2")), "contains no images")


def test_no_readable_image(sd15, tmp_path, run_cli):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_text("not a jpeg")
    (folder / "b.png").write_bytes(b"")
    assert_one_line_error(run_cli(*train_args(sd15, folder, tmp_path / "out")), "no readable image")
    assert not (tmp_path / "out").exists()


def test_corrupt_images_are_skipped_with_a_warning(sd15, instance_dir, tmp_path, run_cli):
    data = (instance_dir / "01.jpg").read_bytes()
    (instance_dir / "zz_truncated.jpg").write_bytes(data[: len(data) // 2])
    result = run_cli(*train_args(sd15, instance_dir, tmp_path / "out", "--max_train_steps", 2))
    assert result.code == 0, result.err
    assert "zz_truncated.jpg" in result.err and "warning" in result.err


def test_odd_image_modes_train(sd15, tmp_path, run_cli):
    folder = tmp_path / "odd"
    folder.mkdir()
    rgb = Image.open(Path(__file__).parent.parent / "boothkit/assets/sample_subject/dog/00.jpg").convert("RGB")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("L").save(folder / "gray.png")
    Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(folder / "sixteen.png")
    rgb.resize((16, 24)).save(folder / "small.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(folder / "rotated.jpg", exif=exif)
    result = run_cli(*train_args(sd15, folder, tmp_path / "out", "--max_train_steps", 2, "--resolution", 32))
    assert result.code == 0, result.err
    assert "upscaled" in result.err


def test_non_empty_output_dir_is_refused_and_kept(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("earlier results")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, out)), "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 2, "--overwrite")).code == 0
    assert (out / "precious.txt").read_text() == "earlier results"


def test_prior_preservation_without_class_prompt(sd15, instance_dir, tmp_path, run_cli):
    result = run_cli(*train_args(sd15, instance_dir, tmp_path / "out", "--with_prior_preservation",
                                 "--class_data_dir", tmp_path / "class"))
    assert_one_line_error(result, "--class_prompt")


def test_unknown_model_path(instance_dir, tmp_path, run_cli):
    result = run_cli(*train_args(tmp_path / "no-such-model", instance_dir, tmp_path / "out"))
    assert_one_line_error(result, "no-such-model")
    not_a_pipeline = tmp_path / "folder"
    not_a_pipeline.mkdir()
    assert_one_line_error(run_cli(*train_args(not_a_pipeline, instance_dir, tmp_path / "out")), "model_index.json")


def test_unknown_config_key_and_malformed_config(sd15, instance_dir, tmp_path, run_cli):
    config = tmp_path / "c.yaml"
    config.write_text("max_train_step: 10\n")
    result = run_cli(*train_args(sd15, instance_dir, tmp_path / "out", "--config", config))
    assert_one_line_error(result, "unknown key", "max_train_step")
    config.write_text("rank: [unclosed\n")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "out", "--config", config)), "malformed")
    toml = tmp_path / "c.toml"
    toml.write_text("rank = 'four'\n")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "out", "--config", toml)), "--rank")


def test_unknown_flag_and_bad_values(sd15, instance_dir, tmp_path, run_cli):
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "o", "--rnak", 4)), "--rnak")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "o", "--mixed_precision", "fp8")),
                          "fp8")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "o", "--max_train_steps", 10,
                                              "--weak_checkpoint_step", 10)), "--weak_checkpoint_step")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "o", "--resume_from_checkpoint",
                                              "checkpoint-7")), "checkpoint-7")
    assert_one_line_error(run_cli("train", "--instance_data_dir", instance_dir), "pretrained_model_name_or_path")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "o", "--resolution", 36)),
                          "multiple of 8")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "o", "--adam_beta2", 1.0)),
                          "--adam_beta2")
    for value in (-1.01, 1.76):  # outside [-1, 2/(pi-2)] the mode density is no density (SD3, Eq. 20)
        assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "o", "--mode_scale", value)),
                              "--mode_scale")


def test_a_lora_file_is_never_half_written(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 2)).code == 0
    leftovers = [p.name for p in out.rglob(".*")]
    assert leftovers == [".boothkit-manifest.json"]  # no staging file (.boothkit-tmp-*) left, no lock


# Equivalences: the same samples give the same training however they are batched ----------------------

def trained_weights(run_cli, model, instance, out, *extra) -> dict:
    result = run_cli(*train_args(model, instance, out, "--max_train_steps", 4, "--learning_rate", 1e-3,
                                 "--train_text_encoder", *extra))
    assert result.code == 0, result.err
    return load_file(out / "pytorch_lora_weights.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_accumulation_equals_a_larger_batch(sd15, instance_dir, tmp_path, run_cli):
    batch = trained_weights(run_cli, sd15, instance_dir, tmp_path / "batch", "--train_batch_size", 2)
    accumulated = trained_weights(run_cli, sd15, instance_dir, tmp_path / "acc", "--train_batch_size", 1,
                                  "--gradient_accumulation_steps", 2)
    assert_same_weights(batch, accumulated)


def test_gradient_checkpointing_changes_memory_not_results(sd15, instance_dir, tmp_path, run_cli):
    plain = trained_weights(run_cli, sd15, instance_dir, tmp_path / "plain")
    checkpointed = trained_weights(run_cli, sd15, instance_dir, tmp_path / "gc", "--gradient_checkpointing")
    assert_same_weights(plain, checkpointed)


def test_bf16_mixed_precision_keeps_lora_in_float32(sd15, instance_dir, tmp_path, run_cli):
    weights = trained_weights(run_cli, sd15, instance_dir, tmp_path / "bf16", "--mixed_precision", "bf16")
    assert all(value.dtype == torch.float32 for value in weights.values())
    assert any(value.abs().max() > 0 for key, value in weights.items() if key.endswith(".lora_B.weight"))


def test_fp16_on_cpu_is_a_clear_error(sd15, instance_dir, tmp_path, run_cli):
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, tmp_path / "o", "--mixed_precision", "fp16")),
                          "fp16", "GPU")


def test_unsupported_pipeline_is_a_clear_error(instance_dir, tmp_path, run_cli):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    assert_one_line_error(run_cli(*train_args(other, instance_dir, tmp_path / "o")), "KandinskyPipeline")


def test_tiny_command_writes_a_loadable_pipeline(tmp_path, run_cli):
    result = run_cli("tiny", "sd21", tmp_path / "m", "--seed", 3)
    assert result.code == 0, result.err
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert_one_line_error(run_cli("tiny", "sd99", tmp_path / "x"), "sd99")
