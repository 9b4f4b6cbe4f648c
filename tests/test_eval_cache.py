"""The evaluation cache tells the truth: a cached evaluation answers only for the very same content.

A baseline evaluation (one subject, one prompt, one setting) is cached once; each test starts from a copy of
its inputs and its evaluation folder, changes ONE thing the images or scores depend on, and checks that the
evaluation is computed again (and gets another key). Changing nothing is answered entirely by the cache,
without loading any model, in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from boothkit.cli import main as cli_main
from boothkit.data.images import sample_subject_dir
from boothkit.evaluate.results import MethodResults
from boothkit.evaluate.runner import Evaluator
from boothkit.testing.tiny import build_tiny

PROMPTS = {"subjects": ["dog"], "prompts": ["a <subject> in the jungle"]}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, sd15, sd15_lora) -> Path:
    """Inputs (photos as BMP: a replaced photo keeps its byte size) and a cached baseline evaluation."""
    root = tmp_path_factory.mktemp("cache-baseline")
    shutil.copytree(sd15, root / "model")
    build_tiny("dino", root / "dino", seed=0)
    build_tiny("clip", root / "clip", seed=0)
    shutil.copytree(sd15_lora, root / "loras" / "dog", ignore=shutil.ignore_patterns("checkpoint-*", "validation"))
    (root / "photos" / "dog").mkdir(parents=True)
    for photo in sorted(sample_subject_dir().iterdir()):
        Image.open(photo).convert("RGB").save(root / "photos" / "dog" / f"{photo.stem}.bmp")
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    assert cli_main(evaluate_args(root)) == 0
    return root


def evaluate_args(root: Path, *extra) -> list[str]:
    return [str(arg) for arg in (
        "evaluate", "--pretrained_model_name_or_path", root / "model", "--lora_base_dir", root / "loras",
        "--instance_data_dir", root / "photos", "--evaluation_prompts_path", root / "prompts.json",
        "--output_dir", root / "eval", "--dino_model", root / "dino", "--clip_model", root / "clip",
        "--num_inference_steps", 2, "--guidance_scale", 3.0, *extra)]


@pytest.fixture
def work(baseline, tmp_path) -> Path:
    """A copy of the baseline's inputs and cached evaluation folder."""
    root = tmp_path / "work"
    shutil.copytree(baseline, root)
    return root


@pytest.fixture
def computed(monkeypatch) -> list[str]:
    """The keys of the evaluations computed (not answered by the cache) from here on."""
    keys: list[str] = []
    original = Evaluator.score

    def score(self, subject, setting, key, generated):
        keys.append(key)
        return original(self, subject, setting, key, generated)

    monkeypatch.setattr(Evaluator, "score", score)
    return keys


def best_key(root: Path, method: str = "cfg") -> str:
    data = json.loads((root / "eval" / "results.json").read_text())["methods"][method]
    return MethodResults.from_json(data).subjects[0].best.key


def run(root: Path, *extra) -> None:
    assert cli_main(evaluate_args(root, *extra)) == 0


def keep_times(path: Path):
    """Restore a file's modification time after its content changed (the size is kept by the change)."""
    stat = path.stat()
    return lambda: os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def replace_photo(root: Path) -> None:
    photo = root / "photos" / "dog" / "01.bmp"
    size, restore = photo.stat().st_size, keep_times(photo)
    ImageOps.mirror(Image.open(photo).convert("RGB")).save(photo)
    restore()
    assert photo.stat().st_size == size


def rebuild_model(root: Path) -> None:
    build_tiny("sd15", root / "model", seed=1)


def change_lora_bytes(root: Path) -> None:
    lora = root / "loras" / "dog" / "pytorch_lora_weights.safetensors"
    data, restore = bytearray(lora.read_bytes()), keep_times(lora)
    data[-3] ^= 0x40  # a bit of the last tensor's data (the header is at the start)
    lora.write_bytes(bytes(data))
    restore()


def change_prompt(root: Path) -> None:
    (root / "prompts.json").write_text(json.dumps({"subjects": ["dog"], "prompts": ["a <subject> in the snow"]}))


def rebuild_dino(root: Path) -> None:
    build_tiny("dino", root / "dino", seed=1)


CHANGES = {
    "a reference photo replaced (same name, size and mtime)": (replace_photo, ()),
    "the base model rebuilt at the same path": (rebuild_model, ()),
    "the LoRA's bytes (same size and mtime)": (change_lora_bytes, ()),
    "a prompt": (change_prompt, ()),
    "the seed": (None, ("--seed", 1)),
    "a sampler setting (steps)": (None, ("--num_inference_steps", 3)),
    "a sampler setting (scheduler)": (None, ("--scheduler", "euler")),
    "the batch size (batched products round differently)": (None, ("--batch_size", 3)),
    "the negative prompt": (None, ("--negative_prompt", "blurry")),
    "the DINO model rebuilt at the same path": (rebuild_dino, ()),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changing_one_thing_recomputes(work, computed, change):
    before = best_key(work)
    edit, flags = CHANGES[change]
    if edit is not None:
        edit(work)
    run(work, *flags)
    assert len(computed) == 1 and computed[0] != before
    assert best_key(work) == computed[0]


@pytest.mark.parametrize("module, name", [("boothkit.evaluate.scoring", "SCORING_VERSION"),
                                          ("boothkit.evaluate.keys", "SAMPLING_VERSION")])
def test_a_new_code_version_recomputes(work, computed, monkeypatch, module, name):
    import importlib

    target = importlib.import_module(module)
    before = best_key(work)
    monkeypatch.setattr(target, name, getattr(target, name) + 1)
    run(work)
    assert len(computed) == 1 and computed[0] != before


def test_the_weak_lora_is_part_of_the_key(work, computed):
    """--method ag: the weak LoRA's content is keyed (a copy elsewhere answers from the cache, other bytes do not)."""
    run(work, "--method", "ag")
    assert len(computed) == 1
    copy = work / "weak_copy"
    shutil.copytree(work / "loras" / "dog" / "weak", copy)
    run(work, "--method", "ag", "--weak_checkpoint_path", copy)
    assert len(computed) == 1
    run(work, "--method", "ag", "--weak_checkpoint_path", work / "loras" / "dog")  # the fine LoRA as the weak one
    assert len(computed) == 2 and computed[1] != computed[0]


def test_changing_nothing_is_answered_by_the_cache_without_any_model(work, computed, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a fully cached run must not load a model")

    from diffusers import DiffusionPipeline

    from boothkit.evaluate import metrics

    for target in (DiffusionPipeline, metrics.DinoEmbedder, metrics.ClipEmbedder, metrics.SubjectMetrics):
        monkeypatch.setattr(target, "__init__", no_model)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_model)
    monkeypatch.setattr("boothkit.evaluate.models.load_family", no_model)
    start = time.perf_counter()
    run(work)
    seconds = time.perf_counter() - start
    # The settings as resolved are keyed, not as typed: the family's defaults spelled out are the same run.
    run(work, "--scheduler", "ddim", "--height", 32, "--width", 32)
    assert computed == []
    with capsys.disabled():
        print(f"\nfully cached re-run: {seconds:.3f} s")
    assert seconds < 2.0


def test_the_device_type_is_part_of_the_key(work):
    """Images computed on another device type (cuda vs cpu kernels) are other images: other keys."""
    from boothkit.cli import build_parser
    from boothkit.config import build_config
    from boothkit.evaluate.config import EvaluateConfig
    from boothkit.evaluate.keys import EvaluationKeys
    from boothkit.evaluate.results import Setting
    from boothkit.evaluate.run import find_subjects
    from boothkit.guidance.settings import family_defaults, sampler_settings

    config = build_config(EvaluateConfig, build_parser().parse_args(evaluate_args(work)))
    settings = sampler_settings(family_defaults(config.pretrained_model_name_or_path, None), config)
    subject, = find_subjects(config, warn=False)
    keys = {device: EvaluationKeys(config, settings, device).key(subject, Setting(3.0)) for device in ("cpu", "cuda")}
    assert keys["cpu"] != keys["cuda"]
    assert keys["cpu"] == best_key(work)  # the baseline was computed on the cpu
