"""`boothkit sample` never loses or mixes results: manifest, lock, overwrite, images written as they are made,
and the guidance checks of issue 9 (wig/ag need a LoRA, per-method λ, flow_euler's shift)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from boothkit.guidance import sampler as sampler_module
from boothkit.guidance.schedulers import make_scheduler
from boothkit.layout import LOCK_NAME, SAMPLES_NAME, OutputFolder


def sample_args(model: Path, lora: Path, out: Path, *extra) -> list:
    return ["sample", "--pretrained_model_name_or_path", model, "--lora_dir", lora, "--output_dir", out,
            "--num_inference_steps", 2, "--height", 32, "--width", 32, *extra]


def pngs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


def listed(folder: Path) -> set[str]:
    return {record["file"] for record in json.loads((folder / SAMPLES_NAME).read_text())}


def test_overwrite_leaves_folder_and_samples_json_in_agreement(sd15, sd15_lora, tmp_path, run_cli):
    out = tmp_path / "out"
    first = run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks dog", "--prompt", "a sks dog on a sofa",
                                 "--num_images_per_prompt", 2))
    assert first.code == 0, first.err
    assert len(pngs(out)) == 4 and pngs(out) == listed(out)
    (out / "notes.txt").write_text("my notes")
    second = run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks cat", "--overwrite"))
    assert second.code == 0, second.err
    assert pngs(out) == listed(out) == {"0000_a_sks_cat.png"}
    assert (out / "notes.txt").read_text() == "my notes"


def test_rerun_without_overwrite_is_refused(sd15, sd15_lora, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks dog")).code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks cat"))
    assert result.code == 2 and "--overwrite" in result.err and len(result.err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_users_folder_is_refused_and_never_changed(sd15, sd15_lora, tmp_path, run_cli, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "0000_a_sks_dog.png").write_bytes(b"the user's own photo")  # the very name sample would write
    result = run_cli(*sample_args(sd15, sd15_lora, photos, "--prompt", "a sks dog"))
    assert result.code == 2 and "not written by boothkit" in result.err
    calls = []
    monkeypatch.setattr(sampler_module.GuidedSampler, "sample", lambda *args, **kwargs: calls.append(1))
    result = run_cli(*sample_args(sd15, sd15_lora, photos, "--prompt", "a sks dog", "--overwrite"))
    assert result.code == 2 and "will not replace" in result.err and not calls  # refused before sampling
    assert (photos / "0000_a_sks_dog.png").read_bytes() == b"the user's own photo"


def test_images_made_before_an_error_are_kept(sd15, sd15_lora, tmp_path, run_cli, monkeypatch):
    original, calls = sampler_module.GuidedSampler.sample, []

    def fail_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sampler_module.GuidedSampler, "sample", fail_on_second_batch)
    out = tmp_path / "out"
    result = run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks dog", "--num_images_per_prompt", 3,
                                  "--batch_size", 2))
    assert result.code == 2 and "No space left on device" in result.err
    assert pngs(out) == listed(out) == {"0000_a_sks_dog.png", "0001_a_sks_dog.png"}
    assert not (out / LOCK_NAME).exists()  # released on the way out


def test_files_follow_the_umask(sd15, sd15_lora, tmp_path, run_cli):
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks dog")).code == 0
    finally:
        os.umask(previous)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()} == {"0o644"}


def test_a_second_writer_is_refused_naming_the_holder(sd15, sd15_lora, tmp_path, run_cli):
    out = tmp_path / "out"
    with OutputFolder(out, "sample"):  # a run writing there right now (it holds the flock)
        result = run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks dog"))
        assert result.code == 2 and f"pid {os.getpid()}" in result.err and socket.gethostname() in result.err
        # The holder's record being overwritten (e.g. by a run that judged it stale) does not free the lock.
        (out / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
        assert run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks dog")).code == 2
    assert not pngs(out) and not (out / LOCK_NAME).exists()


def test_a_live_process_recorded_in_the_lock_is_respected(sd15, sd15_lora, tmp_path, run_cli):
    """A lock file naming a live process of this host (e.g. a run on a file system without flock) is refused."""
    out = tmp_path / "out"
    out.mkdir()
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            holder = {"pid": other.pid, "host": socket.gethostname(), "command": "sample"}
            (out / LOCK_NAME).write_text(json.dumps(holder))
            result = run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks dog"))
        finally:
            other.kill()
    assert result.code == 2 and f"pid {other.pid}" in result.err
    assert json.loads((out / LOCK_NAME).read_text()) == holder  # refused: their lock file is left as it was


def test_a_dead_writers_lock_is_taken_over(sd15, sd15_lora, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "command": "sample"}))
    result = run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks dog"))
    assert result.code == 0, result.err
    assert "taking over the lock" in result.err and pngs(out) == listed(out)


@pytest.mark.parametrize("method", ["wig", "ag"])
def test_personalized_methods_need_a_lora(method, sd15, tmp_path, run_cli):
    result = run_cli("sample", "--pretrained_model_name_or_path", sd15, "--method", method, "--prompt", "a dog",
                     "--output_dir", tmp_path / "out", "--num_inference_steps", 2)
    assert result.code == 2 and "--lora_dir" in result.err
    assert not (tmp_path / "out" / SAMPLES_NAME).exists()


@pytest.mark.parametrize("method, expected", [("cfg", 7.5), ("wig", 7.5), ("ag", 2.0)])
def test_each_method_has_its_own_default_scale(method, expected, sd15, sd15_lora, tmp_path, run_cli):
    out = tmp_path / method
    result = run_cli(*sample_args(sd15, sd15_lora, out, "--prompt", "a sks dog", "--method", method))
    assert result.code == 0, result.err
    assert json.loads((out / SAMPLES_NAME).read_text())[0]["guidance_scale"] == expected


def test_prompts_file_that_is_not_utf8_is_one_line(sd15, sd15_lora, tmp_path, run_cli):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a sks dog in München\n".encode("latin-1"))
    result = run_cli(*sample_args(sd15, sd15_lora, tmp_path / "out", "--prompts_file", prompts))
    assert result.code == 2 and "not UTF-8" in result.err and len(result.err.strip().splitlines()) == 1


def test_flow_euler_takes_the_models_flow_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sana_config = dict(make_scheduler("flow_dpm", {"flow_shift": 3.0}).config)  # a SANA-style scheduler config
    ours = make_scheduler("flow_euler", sana_config)
    expected = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(10)
    expected.set_timesteps(10)
    assert torch.allclose(ours.sigmas, expected.sigmas)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    unshifted.set_timesteps(10)
    assert not torch.allclose(ours.sigmas, unshifted.sigmas)  # the shift matters: the test can fail
