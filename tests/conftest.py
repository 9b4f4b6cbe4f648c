"""Shared fixtures: tiny models are built once per test session (they take well under a second each)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from boothkit.cli import main as cli_main
from boothkit.data.images import sample_subject_dir
from boothkit.testing.tiny import build_tiny


@pytest.fixture(scope="session", autouse=True)
def digest_memo(tmp_path_factory):
    """Content digests are memoised on disk (`boothkit.identity`): keep the tests' memo out of ~/.cache."""
    import os

    os.environ["BOOTHKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("boothkit-cache"))
    yield


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Run the real `boothkit` command in-process (imports are paid once per test session)."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = cli_main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny(kind, root / kind, seed=0) for kind in ("sd15", "sd21")}


@pytest.fixture(scope="session")
def sana(tmp_path_factory) -> Path:
    return build_tiny("sana", tmp_path_factory.mktemp("sana") / "model", seed=0)


@pytest.fixture(scope="session")
def sd15(tiny_models) -> Path:
    return tiny_models["sd15"]


@pytest.fixture(scope="session")
def sd21(tiny_models) -> Path:
    return tiny_models["sd21"]


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    """A copy of the sample subject (5 photos of a dog, 128 px)."""
    target = tmp_path / "instance"
    shutil.copytree(sample_subject_dir(), target)
    return target


def train_tiny_lora(model: Path, out: Path, *extra: str) -> Path:
    """A strongly trained LoRA (with text-encoder LoRA and a weak checkpoint) so guidance effects are visible."""
    code = cli_main(["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir",
                     str(sample_subject_dir()), "--instance_prompt", "a photo of sks dog", "--output_dir", str(out),
                     "--max_train_steps", "30", "--learning_rate", "1e-2", "--weak_checkpoint_step", "5",
                     "--train_text_encoder", *extra])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def sd15_lora(sd15, tmp_path_factory) -> Path:
    return train_tiny_lora(sd15, tmp_path_factory.mktemp("lora") / "sd15")


@pytest.fixture(scope="session")
def sd21_lora(sd21, tmp_path_factory) -> Path:
    return train_tiny_lora(sd21, tmp_path_factory.mktemp("lora") / "sd21")
