"""A LoRA's prompt-encoding settings travel with the file; sampling uses them, and says what it assumes when a
LoRA records none (issue 9: a SANA LoRA without train_config.json was sampled with the wrong instruction)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from boothkit.cli import main as cli_main
from boothkit.data.images import sample_subject_dir
from boothkit.formats.metadata import PROMPT_ENCODING_KEY
from boothkit.guidance import adapters
from boothkit.guidance.config import SampleConfig
from boothkit.layout import LORA_WEIGHT_NAME


@pytest.fixture(scope="module")
def sana_lora_without_instruction(sana, tmp_path_factory) -> Path:
    """A LoRA trained WITHOUT the complex human instruction and 120 tokens (not the sampling defaults)."""
    out = tmp_path_factory.mktemp("sana-lora") / "lora"
    code = cli_main(["train", "--pretrained_model_name_or_path", str(sana), "--instance_data_dir",
                     str(sample_subject_dir()), "--instance_prompt", "a photo of sks dog", "--output_dir", str(out),
                     "--max_train_steps", "6", "--learning_rate", "1e-2", "--no_complex_human_instruction",
                     "--max_sequence_length", "120", "--weak_checkpoint_step", "0"])
    assert code == 0
    return out


def config(sana: Path, **extra) -> SampleConfig:
    return SampleConfig(pretrained_model_name_or_path=str(sana), prompt=["a sks dog"], output_dir="unused", **extra)


def lone_file(lora: Path, target: Path, keep_metadata: bool) -> Path:
    """The LoRA file alone in a new folder (no train_config.json), with or without boothkit's metadata entry."""
    target.mkdir(parents=True)
    if keep_metadata:
        shutil.copy(lora / LORA_WEIGHT_NAME, target / LORA_WEIGHT_NAME)
    else:  # as another tool (e.g. the diffusers SANA example) writes it: diffusers' keys only
        with safe_open(str(lora / LORA_WEIGHT_NAME), "pt") as handle:
            metadata = {k: v for k, v in (handle.metadata() or {}).items() if k != PROMPT_ENCODING_KEY}
        save_file(load_file(lora / LORA_WEIGHT_NAME), target / LORA_WEIGHT_NAME, metadata=metadata)
    return target


def test_settings_travel_with_the_lora_file(sana, sana_lora_without_instruction, tmp_path):
    moved = lone_file(sana_lora_without_instruction, tmp_path / "moved", keep_metadata=True)
    assert adapters.text_options(config(sana), moved) == (120, False)
    # Flags the user sets still win.
    assert adapters.text_options(config(sana, complex_human_instruction=True), moved) == (120, True)


def test_unknown_settings_are_announced_once(sana, sana_lora_without_instruction, tmp_path, caplog):
    foreign = lone_file(sana_lora_without_instruction, tmp_path / "foreign", keep_metadata=False)
    with caplog.at_level(logging.WARNING, logger="boothkit"):
        assert adapters.text_options(config(sana), foreign) == (300, True)
        assert adapters.text_options(config(sana), foreign) == (300, True)
    notices = [record.getMessage() for record in caplog.records if "does not record" in record.getMessage()]
    assert len(notices) == 1
    assert "complex_human_instruction True" in notices[0] and "--no_complex_human_instruction" in notices[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="boothkit"):  # nothing assumed when the user sets both
        adapters.text_options(config(sana, complex_human_instruction=False, max_sequence_length=120), foreign)
    assert not caplog.records


def test_sampling_a_lone_lora_file_embeds_prompts_as_trained(sana, sana_lora_without_instruction, tmp_path):
    """Sampling the LoRA file alone gives exactly the images of sampling it with its training settings."""
    moved = lone_file(sana_lora_without_instruction, tmp_path / "moved", keep_metadata=True)

    def sample(lora: Path, out: Path, *extra: str) -> np.ndarray:
        code = cli_main(["sample", "--pretrained_model_name_or_path", str(sana), "--lora_dir", str(lora),
                         "--prompt", "a sks dog", "--output_dir", str(out), "--num_inference_steps", "2",
                         "--height", "32", "--width", "32", *extra])
        assert code == 0
        record = json.loads((out / "samples.json").read_text())[0]
        return np.asarray(Image.open(out / record["file"]), dtype=np.int16)

    as_trained = sample(sana_lora_without_instruction, tmp_path / "a", "--no_complex_human_instruction",
                        "--max_sequence_length", "120")
    assert np.array_equal(sample(moved, tmp_path / "b"), as_trained)
    assert not np.array_equal(sample(moved, tmp_path / "c", "--complex_human_instruction"), as_trained)
