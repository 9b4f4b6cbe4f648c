"""`boothkit train` never destroys what it did not write, never saves non-finite weights, resumes only its own
run, and records how its LoRA embeds prompts inside the LoRA file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from boothkit.data.images import sample_subject_dir
from boothkit.errors import BoothkitError
from boothkit.families import load_family
from boothkit.formats.metadata import PROMPT_ENCODING_KEY, LoraDescription, read_prompt_encoding, write_prompt_encoding
from boothkit.layout import LOCK_NAME, MANIFEST_NAME, OutputFolder
from boothkit.testing.tiny import build_tiny
from boothkit.train import checkpoint as ckpt
from boothkit.train import trainer
from boothkit.train.lora import attach_lora, save_lora
from test_train import PROMPT, assert_one_line_error, read_log, train_args

LORA = "pytorch_lora_weights.safetensors"


def tree(root: Path) -> dict[str, bytes]:
    """Every file below root (boothkit's manifest and lock excepted) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST_NAME, LOCK_NAME)}


# Nothing lost -----------------------------------------------------------------------------------------------

USER_FILES = {"validation/notes.txt": b"my notes", "weak/README": b"read me", "checkpoint-2/mine.png": b"png?",
              "checkpoint-4/mine.png": b"another", "photo.jpg": b"a photo of my dog"}


def test_user_files_survive_resume_pruning_and_overwrite(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    validation = ("--validation_prompt", "a sks dog", "--num_validation_images", 1)  # at the end only
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 6, "--checkpointing_steps", 2,
                               *validation)).code == 0
    assert {"checkpoint-2/state.json", "checkpoint-4/state.json", "validation/step-000006_0.png"} <= set(tree(out))
    for name, data in USER_FILES.items():
        (out / name).write_bytes(data)

    # Resume from checkpoint-2: checkpoint-4 (abandoned) goes, then --checkpoints_total_limit 1 prunes
    # checkpoint-2 and checkpoint-4; the user's files in all of these folders stay.
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 6, "--checkpointing_steps", 2,
                                 "--resume_from_checkpoint", "checkpoint-2", "--checkpoints_total_limit", 1))
    assert result.code == 0, result.err
    files = tree(out)
    assert all(files[name] == data for name, data in USER_FILES.items())
    assert [path.name for _, path in ckpt.list_checkpoints(out)] == ["checkpoint-4"]
    assert sorted(name for name in files if name.startswith("checkpoint-2/")) == ["checkpoint-2/mine.png"]

    # --overwrite removes every file boothkit wrote, and only those.
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 1, "--overwrite"))
    assert result.code == 0, result.err
    files = tree(out)
    assert all(files[name] == data for name, data in USER_FILES.items())
    boothkit_files = set(files) - set(USER_FILES)
    assert boothkit_files == {LORA, "train_config.json", "train_log.csv"}
    assert [int(row["step"]) for row in read_log(out)] == [1]
    assert not list(out.rglob(".boothkit-tmp-*"))


def test_a_folder_boothkit_did_not_write_is_refused(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "dog.jpg").write_bytes(b"a photo")
    assert_one_line_error(run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 1)),
                          "not written by boothkit", "--overwrite")
    assert tree(out) == {"dog.jpg": b"a photo"} and not (out / MANIFEST_NAME).exists()


def write_lock(folder: Path, pid: int) -> None:
    record = {"pid": pid, "host": socket.gethostname(), "command": "train", "started": "2026-01-01T00:00:00"}
    (folder / LOCK_NAME).write_text(json.dumps(record))


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 2)).code == 0
    before = tree(out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(out, holder.pid)
        result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 2, "--overwrite"))
        assert_one_line_error(result, f"pid {holder.pid}", "boothkit train")
        assert result.code == 2
        assert tree(out) == before  # --overwrite removed nothing while another run holds the folder
    finally:
        holder.kill()
        holder.wait()
    write_lock(out, holder.pid)  # its process is gone now
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 2, "--overwrite"))
    assert result.code == 0, result.err
    assert "taking over the lock" in result.err and str(holder.pid) in result.err
    assert not (out / LOCK_NAME).exists()


def test_files_get_the_users_umask(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 3, "--checkpointing_steps", 2,
                                   "--weak_checkpoint_step", 1)).code == 0
    finally:
        os.umask(previous)
    files = [out / LORA, out / "weak" / LORA, out / "train_config.json", out / "train_log.csv",
             *sorted((out / "checkpoint-2").iterdir())]
    assert len(files) >= 8
    assert {f.relative_to(out).as_posix(): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == \
        {f.relative_to(out).as_posix(): oct(0o644) for f in files}


# Never silently wrong: non-finite numbers -------------------------------------------------------------------

def test_a_diverging_run_stops_with_the_step_and_saves_no_lora(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 5, "--learning_rate", 1e30,
                                 "--weak_checkpoint_step", 0))
    assert_one_line_error(result, "training stopped at step", "--learning_rate")
    assert result.code == 2
    assert not (out / LORA).exists()
    assert not list(out.rglob(".boothkit-tmp-*")) and not (out / LOCK_NAME).exists()


def test_nan_loss_stops_at_its_step_keeping_earlier_checkpoints(sd15, instance_dir, tmp_path, run_cli, monkeypatch):
    original = trainer._micro_batch_loss

    def nan_at_step_3(run, micro_step):
        loss = original(run, micro_step)
        return loss * float("nan") if micro_step == 2 else loss

    monkeypatch.setattr(trainer, "_micro_batch_loss", nan_at_step_3)
    out = tmp_path / "out"
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 6, "--checkpointing_steps", 2))
    assert_one_line_error(result, "step 3", "nan")
    assert not (out / LORA).exists()
    assert [step for step, _ in ckpt.list_checkpoints(out)] == [2]
    assert [int(row["step"]) for row in read_log(out)] == [1, 2]


def test_save_lora_and_checkpoints_refuse_non_finite_tensors(sd15, tmp_path):
    family = load_family(str(sd15))
    attach_lora(family.denoiser, family.denoiser_lora_targets, rank=2, alpha=2, seed=0)
    with torch.no_grad():
        next(p for name, p in family.denoiser.named_parameters() if "lora_B" in name)[0, 0] = float("inf")
    with pytest.raises(BoothkitError, match="NaN or inf"):
        save_lora(family, {"unet": family.denoiser}, tmp_path / "lora", LoraDescription(family.base_model, "lora"))
    assert not (tmp_path / "lora" / LORA).exists() and not list(tmp_path.rglob(".boothkit-tmp-*"))

    state = ckpt.Checkpoint(step=2, trainable={"unet.a": torch.tensor([1.0, float("nan")])}, optimizer={"state": {}},
                            lr_scheduler={}, grad_scaler=None, info={})
    with OutputFolder(tmp_path / "out", "train") as folder:
        with pytest.raises(BoothkitError, match="NaN or inf"):
            ckpt.save_checkpoint(folder, state, None)
        assert folder.files == set()
    assert not (tmp_path / "out" / "checkpoint-2").exists()


# Resume only the run that wrote the checkpoint --------------------------------------------------------------

@pytest.fixture
def checkpointed(sd15, instance_dir, tmp_path, run_cli) -> Path:
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 4, "--checkpointing_steps", 2)).code == 0
    return out


def resume(run_cli, model, photos, out, *extra):
    return run_cli(*train_args(model, photos, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                               "--resume_from_checkpoint", "latest", *extra))


def test_resume_refuses_other_photos(checkpointed, sd15, instance_dir, tmp_path, run_cli):
    other = tmp_path / "other_photos"
    shutil.copytree(instance_dir, other)
    image = Image.open(other / "00.jpg")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other / "00.jpg")  # same name, same size, new content
    before = tree(checkpointed)
    assert_one_line_error(resume(run_cli, sd15, other, checkpointed),
                          "cannot resume: the instance photos differ from the checkpoint's run",
                          "--resume_from_checkpoint latest")
    assert tree(checkpointed) == before


@pytest.mark.parametrize("change, expected", [
    (("--instance_prompt", "a photo of zwx dog"), "the instance prompt (--instance_prompt) differs"),
    (("--seed", 7), "the seed (--seed) differs"),
    (("--rank", 8, "--seed", 7), "the seed (--seed) and the LoRA rank (--rank) differ"),
    (("--snr_gamma", 5), "the loss (--snr_gamma"),
])
def test_resume_refuses_another_prompt_or_seed(checkpointed, sd15, instance_dir, run_cli, change, expected):
    before = tree(checkpointed)
    assert_one_line_error(resume(run_cli, sd15, instance_dir, checkpointed, *change), "cannot resume", expected)
    assert tree(checkpointed) == before


def test_resume_refuses_another_model_even_at_the_same_path(checkpointed, sd15, instance_dir, tmp_path, run_cli):
    model = tmp_path / "model"
    shutil.copytree(sd15, model)
    out = tmp_path / "out2"
    assert run_cli(*train_args(model, instance_dir, out, "--max_train_steps", 4, "--checkpointing_steps", 2)).code == 0
    shutil.rmtree(model)
    build_tiny("sd15", model, seed=1)  # rebuilt at the same path: other weights
    assert_one_line_error(resume(run_cli, model, instance_dir, out), "cannot resume", "the model")
    # The original model resumes its own run, with a longer schedule and other checkpointing (that may change).
    result = run_cli(*train_args(sd15, instance_dir, checkpointed, "--max_train_steps", 6, "--checkpointing_steps", 3,
                                 "--resume_from_checkpoint", "latest"))
    assert result.code == 0, result.err
    assert [int(row["step"]) for row in read_log(checkpointed)] == list(range(1, 7))


# Prompt-encoding settings travel inside the LoRA file -----------------------------------------------------

def test_sd_lora_records_its_prompt_encoding_and_diffusers_still_loads_it(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 2, "--rank", 2,
                               "--lora_alpha", 8)).code == 0
    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, requires_safety_checker=False)
    assert read_prompt_encoding(out / LORA) == {"family": "sd", "complex_human_instruction": False,
                                                "max_sequence_length": pipe.tokenizer.model_max_length}
    assert read_prompt_encoding(out) == read_prompt_encoding(out / LORA)  # a LoRA folder reads the same
    with safe_open(str(out / LORA), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and "lora_adapter_metadata" in metadata
    pipe.load_lora_weights(out, adapter_name="subject")
    assert pipe.unet.peft_config["subject"].lora_alpha == 8  # diffusers' own metadata still read


def test_sana_lora_records_its_prompt_encoding(tmp_path, run_cli):
    sana = build_tiny("sana", tmp_path / "sana", seed=0)
    out = tmp_path / "out"
    result = run_cli("train", "--pretrained_model_name_or_path", sana, "--instance_data_dir", sample_subject_dir(),
                     "--instance_prompt", PROMPT, "--output_dir", out, "--max_train_steps", 2,
                     "--weak_checkpoint_step", 1, "--max_sequence_length", 24, "--no_complex_human_instruction")
    assert result.code == 0, result.err
    expected = {"family": "sana", "max_sequence_length": 24, "complex_human_instruction": False}
    assert read_prompt_encoding(out) == expected and read_prompt_encoding(out / "weak") == expected


def test_a_diffusers_lora_has_no_settings_until_written(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 2)).code == 0
    layers = {key.removeprefix("unet."): value for key, value in load_file(out / LORA).items()}
    plain = tmp_path / "plain"
    StableDiffusionPipeline.save_lora_weights(plain, unet_lora_layers=layers)  # diffusers alone
    assert read_prompt_encoding(plain / LORA) is None
    with safe_open(str(plain / LORA), "pt") as handle:
        diffusers_metadata = handle.metadata() or {}
    settings = {"family": "sana", "max_sequence_length": 300, "complex_human_instruction": True}
    write_prompt_encoding(plain / LORA, settings)
    assert read_prompt_encoding(plain / LORA) == settings
    with safe_open(str(plain / LORA), "pt") as handle:
        assert handle.metadata() == {**diffusers_metadata, PROMPT_ENCODING_KEY: json.dumps(settings, sort_keys=True)}
    rewritten = load_file(plain / LORA)
    assert all(torch.equal(rewritten[key], value) for key, value in load_file(out / LORA).items())
    assert stat.S_IMODE((plain / LORA).stat().st_mode) == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_damaged_entry_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / LORA
    save_file({"a": torch.zeros(1)}, str(path), metadata={PROMPT_ENCODING_KEY: "{not json"})
    with pytest.raises(BoothkitError, match="damaged"):
        read_prompt_encoding(path)


# A checkpoint from another folder never mixes two runs ----------------------------------------------------

def two_runs(sd15, instance_dir, tmp_path, run_cli) -> tuple[Path, Path]:
    """Run X (seed 1) in A and run Y (seed 2) in B, each with checkpoints 2 and 4 and a weak LoRA at step 1."""
    a, b = tmp_path / "A", tmp_path / "B"
    for out, seed in ((a, 1), (b, 2)):
        result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 6, "--checkpointing_steps", 2,
                                     "--weak_checkpoint_step", 1, "--seed", seed))
        assert result.code == 0, result.err
    return a, b


def test_another_folders_checkpoint_resumes_only_into_an_empty_folder_or_with_overwrite(
        sd15, instance_dir, tmp_path, run_cli):
    a, b = two_runs(sd15, instance_dir, tmp_path, run_cli)
    foreign = b / "checkpoint-4"
    resume_y = ("--max_train_steps", 6, "--checkpointing_steps", 2, "--weak_checkpoint_step", 1, "--seed", 2,
                "--resume_from_checkpoint", foreign)
    before = tree(a)
    result = run_cli(*train_args(sd15, instance_dir, a, *resume_y))
    assert_one_line_error(result, f"output_dir '{a}' is not empty", str(foreign), "--overwrite")
    assert result.code == 2 and tree(a) == before

    # Into a new folder: Y goes on from step 4 and ends exactly where B ended.
    new = tmp_path / "new"
    result = run_cli(*train_args(sd15, instance_dir, new, *resume_y))
    assert result.code == 0, result.err
    assert "gets no weak LoRA" in result.err and not (new / "weak").exists()
    assert load_file(new / LORA).keys() == load_file(b / LORA).keys()
    assert all(torch.equal(value, load_file(b / LORA)[key]) for key, value in load_file(new / LORA).items())

    # With --overwrite: X's files go first (LoRA, weak/, checkpoints, log rows), so nothing of X is left.
    (a / "notes.txt").write_bytes(b"mine")
    result = run_cli(*train_args(sd15, instance_dir, a, *resume_y, "--overwrite"))
    assert result.code == 0, result.err
    assert set(tree(a)) == set(tree(new)) | {"notes.txt"}
    assert all(torch.equal(value, load_file(b / LORA)[key]) for key, value in load_file(a / LORA).items())
    assert not (a / "weak").exists() and ckpt.list_checkpoints(a) == []
    assert [int(row["step"]) for row in read_log(a)] == [5, 6]
    # `latest` in A now finds nothing of X to continue.
    assert ckpt.resolve_resume(a, "latest") is None


def test_a_checkpoint_copied_into_the_folder_is_not_the_folders_own(sd15, instance_dir, tmp_path, run_cli):
    a, b = two_runs(sd15, instance_dir, tmp_path, run_cli)
    shutil.copytree(b / "checkpoint-4", a / "checkpoint-5")  # inside A, but A's run never wrote it
    before = tree(a)
    result = run_cli(*train_args(sd15, instance_dir, a, "--max_train_steps", 6, "--checkpointing_steps", 2,
                                 "--weak_checkpoint_step", 1, "--seed", 2, "--resume_from_checkpoint", "latest"))
    assert_one_line_error(result, "not empty", "checkpoint-5", "--overwrite")
    assert tree(a) == before


# Every output is claimed before the first step ----------------------------------------------------------

def no_step(run, step_index):
    raise AssertionError("a training step ran")


@pytest.mark.parametrize("user_file", [LORA, f"weak/{LORA}", "train_config.json", "train_log.csv",
                                       "validation/step-000002_0.png", "validation/step-000003_1.png"])
def test_a_users_output_named_file_fails_before_any_step(sd15, instance_dir, tmp_path, run_cli, monkeypatch,
                                                         user_file):
    out = tmp_path / "out"
    (out / user_file).parent.mkdir(parents=True)
    (out / user_file).write_bytes(b"the diffusers example's LoRA")
    monkeypatch.setattr(trainer, "_optimizer_step", no_step)
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 3, "--weak_checkpoint_step", 1,
                                 "--validation_prompt", "a sks dog", "--num_validation_images", 2,
                                 "--validation_steps", 2, "--overwrite"))
    assert_one_line_error(result, "will not replace", user_file)
    assert result.code == 2
    assert tree(out) == {user_file: b"the diffusers example's LoRA"}
    assert not (out / LOCK_NAME).exists()


def test_a_resumed_run_claims_only_what_it_writes(sd15, instance_dir, tmp_path, run_cli):
    """A resume from step 4 writes no weak LoRA (step 1) and no validation image of step 2."""
    out = tmp_path / "out"
    args = ("--max_train_steps", 6, "--checkpointing_steps", 2, "--weak_checkpoint_step", 1)
    assert run_cli(*train_args(sd15, instance_dir, out, *args)).code == 0
    validation = ("--validation_prompt", "a sks dog", "--num_validation_images", 1, "--validation_steps", 2)
    result = run_cli(*train_args(sd15, instance_dir, out, *args, *validation, "--resume_from_checkpoint", "latest"))
    assert result.code == 0, result.err
    manifest = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert [name for name in manifest if name.startswith("validation/")] == ["validation/step-000006_0.png"]
    assert all((out / name).is_file() for name in manifest)


# The weak LoRA belongs to the run ------------------------------------------------------------------------

def test_resume_keeps_the_runs_weak_step_and_refuses_another(sd15, instance_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 6, "--checkpointing_steps", 2,
                               "--weak_checkpoint_step", 3)).code == 0
    before = tree(out)
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 6, "--checkpointing_steps", 2,
                                 "--weak_checkpoint_step", 2, "--resume_from_checkpoint", "latest"))
    assert_one_line_error(result, "cannot resume", "the weak checkpoint step (--weak_checkpoint_step) differs")
    assert tree(out) == before

    # A longer schedule without the flag keeps the run's weak step (the default would have moved it to 2).
    result = run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 10, "--checkpointing_steps", 2,
                                 "--resume_from_checkpoint", "latest"))
    assert result.code == 0, result.err
    assert json.loads((out / "train_config.json").read_text())["resolved"]["weak_checkpoint_step"] == 3
    assert (out / "weak" / LORA).read_bytes() == before[f"weak/{LORA}"]
