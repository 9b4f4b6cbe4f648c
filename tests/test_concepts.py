"""Several concepts in one run (issue 12): `--concepts_list` (JSON) and `--dataset_config` (kohya TOML) are one
schema, rows balanced by repeats, per-concept prompts, class images and validation, bad entries named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from boothkit.data.images import sample_subject_dir
from boothkit.train.concepts import Concept, ConceptImages, RowPicker
from test_train import assert_one_line_error

LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture
def two_subjects(tmp_path) -> dict[str, Path]:
    """The sample dog, and a second "subject": the same photos inverted (another look, another identifier)."""
    dog, other = tmp_path / "dog", tmp_path / "inverted"
    shutil.copytree(sample_subject_dir(), dog)
    other.mkdir()
    for path in sorted(sample_subject_dir().glob("*.jpg"))[:3]:
        ImageOps.invert(Image.open(path).convert("RGB")).save(other / path.name)
    return {"dog": dog, "inverted": other}


def concepts(subjects: dict[str, Path], tmp_path: Path) -> list[dict]:
    return [{"instance_prompt": "a photo of zwx dog", "instance_data_dir": str(subjects["dog"]),
             "class_prompt": "a photo of dog", "class_data_dir": str(tmp_path / "class_dog"), "num_class_images": 2,
             "validation_prompt": "zwx dog on the beach"},
            {"instance_prompt": "a photo of qkp dog", "instance_data_dir": str(subjects["inverted"]),
             "class_prompt": "a photo of dog", "class_data_dir": str(tmp_path / "class_dog"), "repeats": 2,
             "validation_prompt": "qkp dog on the beach"}]


def train(run_cli, model, out: Path, *source: str, extra=()) -> None:
    result = run_cli("train", "--pretrained_model_name_or_path", str(model), "--output_dir", str(out), *source,
                     "--with_prior_preservation", "--num_class_images", "3", "--max_train_steps", "4",
                     "--learning_rate", "1e-2", "--train_batch_size", "2", "--num_validation_images", "1",
                     "--checkpointing_steps", "100", *extra)
    assert result.code == 0, result.err


def test_rows_follow_repeats_and_prior_rows_their_concept():
    images = ConceptImages([Concept(instance_prompt="a", instance_data_dir="x", repeats=2),
                            Concept(instance_prompt="b", instance_data_dir="y")],
                           [[("a0", None), ("a1", None)], [("b0", None), ("b1", None), ("b2", None)]],
                           [[("ca", None)], [("cb0", None), ("cb1", None)]])
    picker = RowPicker(images)
    assert images.slots == [0, 1, 0, 1, 2, 3, 4]  # concept 0's photos twice per epoch (kohya's num_repeats)
    assert [picker.instance(slot) for slot in range(7)] == [(0, 0), (1, 0), (0, 0), (1, 0), (2, 1), (3, 1), (4, 1)]
    assert picker.class_image(0, 5) == 0 and {picker.class_image(1, v) for v in range(4)} == {1, 2}
    single = ConceptImages([Concept(instance_prompt="a", instance_data_dir="x")], [[("a0", None), ("a1", None)]])
    assert single.slots == [0, 1] and single.validations() == []  # one concept: as a single-subject run


def test_two_concepts_train_with_their_own_prompts_and_validation(sd15, two_subjects, tmp_path, run_cli,
                                                                   monkeypatch):
    from boothkit.families.base import ModelFamily
    from boothkit.families.sd import StableDiffusionFamily

    encoded: list[str] = []
    original = StableDiffusionFamily.encode_prompts

    def spy(self: ModelFamily, prompts, device, negative=False):
        encoded.extend(p for p in prompts if p)
        return original(self, prompts, device, negative)

    monkeypatch.setattr(StableDiffusionFamily, "encode_prompts", spy)
    from boothkit.train import trainer

    validated: list[str] = []
    save_validation_images = trainer.save_validation_images
    monkeypatch.setattr(trainer, "save_validation_images",
                        lambda family, prompt, *args: validated.append(prompt) or save_validation_images(family, prompt, *args))
    listing = tmp_path / "concepts.json"
    listing.write_text(json.dumps(concepts(two_subjects, tmp_path)))
    out = tmp_path / "out"
    train(run_cli, sd15, out, "--concepts_list", str(listing), extra=("--validation_steps", "2"))
    assert {"a photo of zwx dog", "a photo of qkp dog", "a photo of dog"} <= set(encoded)
    for k, token in ((0, "zwx"), (1, "qkp")):
        assert sorted(p.name for p in (out / "validation" / f"concept-{k}").iterdir()) == \
            ["step-000002_0.png", "step-000004_0.png"]
        assert validated.count(f"{token} dog on the beach") == 2  # at step 2 and at the end
    assert len(list((tmp_path / "class_dog").glob("*.png"))) == 3  # the shared class folder, filled once
    from safetensors import safe_open

    with safe_open(str(out / LORA), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.trigger_phrase"] == "zwx dog, qkp dog"


def test_toml_and_json_give_the_same_run(sd15, two_subjects, tmp_path, run_cli):
    entries = [{"instance_prompt": "zwx dog", "instance_data_dir": str(two_subjects["dog"]), "repeats": 2,
                "class_prompt": "dog", "class_data_dir": str(tmp_path / "reg")},
               {"instance_prompt": "qkp dog", "instance_data_dir": str(two_subjects["inverted"]),
                "class_prompt": "dog", "class_data_dir": str(tmp_path / "reg")}]
    (tmp_path / "c.json").write_text(json.dumps(entries))
    (tmp_path / "d.toml").write_text(
        "[general]\n\n[[datasets]]\n"
        f"[[datasets.subsets]]\nimage_dir = '{two_subjects['dog']}'\nclass_tokens = 'zwx dog'\nnum_repeats = 2\n"
        f"[[datasets.subsets]]\nimage_dir = '{two_subjects['inverted']}'\nclass_tokens = 'qkp dog'\n"
        f"[[datasets.subsets]]\nis_reg = true\nimage_dir = '{tmp_path / 'reg'}'\nclass_tokens = 'dog'\n")
    train(run_cli, sd15, tmp_path / "json", "--concepts_list", str(tmp_path / "c.json"))
    train(run_cli, sd15, tmp_path / "toml", "--dataset_config", str(tmp_path / "d.toml"))
    a, b = load_file(tmp_path / "json" / LORA), load_file(tmp_path / "toml" / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # and the concepts matter: one concept alone is another run
    train(run_cli, sd15, tmp_path / "one", "--instance_data_dir", str(two_subjects["dog"]), "--instance_prompt",
          "zwx dog", "--class_prompt", "dog", "--class_data_dir", str(tmp_path / "reg"))
    c = load_file(tmp_path / "one" / LORA)
    assert any(not torch.equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("entry,fragments", [
    ({"instance_data_dir": "DOG"}, ["concept 1, key 'instance_prompt': missing"]),
    ({"instance_prompt": "a photo of zwx dog", "instance_data_dir": "DOG"}, ["concept 1, key 'instance_prompt'",
                                                                            "same prompt as concept 0"]),
    ({"instance_prompt": "b", "instance_data_dir": "DOG", "repeat": 2}, ["concept 1, key 'repeat'"]),
    ({"instance_prompt": "b", "instance_data_dir": "DOG", "repeats": 0}, ["concept 1, key 'repeats'"]),
    ({"instance_prompt": "b", "instance_data_dir": "EMPTY"}, ["of concept 1", "contains no images"]),
])
def test_bad_concepts_are_named(entry, fragments, sd15, two_subjects, tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    first = {"instance_prompt": "a photo of zwx dog", "instance_data_dir": str(two_subjects["dog"])}
    entry = {key: {"DOG": str(two_subjects["dog"]), "EMPTY": str(tmp_path / "empty")}.get(value, value)
             for key, value in entry.items()}
    (tmp_path / "c.json").write_text(json.dumps([first, entry]))
    result = run_cli("train", "--pretrained_model_name_or_path", str(sd15), "--output_dir", str(tmp_path / "o"),
                     "--concepts_list", str(tmp_path / "c.json"))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_dataset_configs_and_flag_mixes(sd15, two_subjects, tmp_path, run_cli):
    def run(*args):
        return run_cli("train", "--pretrained_model_name_or_path", str(sd15), "--output_dir", str(tmp_path / "o"), *args)

    (tmp_path / "u.toml").write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{two_subjects['dog']}'\n"
                                     "class_tokens = 'zwx dog'\ncaption_extension = '.txt'\n")
    assert_one_line_error(run("--dataset_config", str(tmp_path / "u.toml")), "subsets[0]", "caption_extension")
    (tmp_path / "bad.toml").write_text("[[datasets]\n")
    assert_one_line_error(run("--dataset_config", str(tmp_path / "bad.toml")), "not valid TOML")
    (tmp_path / "c.json").write_text(json.dumps([{"instance_prompt": "a", "instance_data_dir": str(two_subjects["dog"])}]))
    assert_one_line_error(run("--concepts_list", str(tmp_path / "c.json"), "--instance_prompt", "x"),
                          "--instance_prompt is set by each concept")
    assert_one_line_error(run("--concepts_list", str(tmp_path / "c.json"), "--with_prior_preservation"),
                          "concept 0, key 'class_prompt'")
    assert_one_line_error(run("--concepts_list", str(tmp_path / "missing.json")), "does not exist")
    assert_one_line_error(run(), "--instance_data_dir is required")


def test_evaluate_scores_each_concept_with_its_own_identifier(sd15, two_subjects, tmp_path, run_cli, monkeypatch):
    """One model trained on two concepts, evaluated per concept: `--lora_dir` for every subject folder, each
    folder's prompts with its concept's token (from `--concepts_list`), and the cache keyed on it."""
    from boothkit.evaluate.runner import Evaluator
    from boothkit.testing.tiny import build_tiny

    photos = tmp_path / "photos"
    entries = [{"instance_prompt": "a photo of zwx dog", "instance_data_dir": str(photos / "dog")},
               {"instance_prompt": "a photo of qkp dog", "instance_data_dir": str(photos / "dog2")}]
    shutil.copytree(two_subjects["dog"], photos / "dog")
    shutil.copytree(two_subjects["inverted"], photos / "dog2")
    listing = tmp_path / "concepts.json"
    listing.write_text(json.dumps(entries))
    model = tmp_path / "model"
    result = run_cli("train", "--pretrained_model_name_or_path", str(sd15), "--output_dir", str(model),
                     "--concepts_list", str(listing), "--max_train_steps", "2", "--checkpointing_steps", "100")
    assert result.code == 0, result.err
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"subjects": ["dog"], "prompts": ["a <subject> in the snow"]}))  # dog2 -> dog
    scorers = {kind: build_tiny(kind, tmp_path / kind, seed=0) for kind in ("dino", "clip")}
    sampled = {}
    sample = Evaluator.sample
    monkeypatch.setattr(Evaluator, "sample", lambda self, subject, setting: sampled.setdefault(
        subject.folder, subject.prompts) and sample(self, subject, setting))
    result = run_cli("evaluate", "--pretrained_model_name_or_path", str(sd15), "--lora_dir", str(model),
                     "--concepts_list", str(listing), "--instance_data_dir", str(photos), "--evaluation_prompts_path",
                     str(prompts), "--output_dir", str(tmp_path / "eval"), "--dino_model", str(scorers["dino"]),
                     "--clip_model", str(scorers["clip"]), "--num_inference_steps", "2")
    assert result.code == 0, result.err
    assert sampled == {"dog": ("a zwx dog in the snow",), "dog2": ("a qkp dog in the snow",)}
    both = run_cli("evaluate", "--pretrained_model_name_or_path", str(sd15), "--lora_dir", str(model), "--lora_base_dir",
                   str(tmp_path), "--instance_data_dir", str(photos), "--evaluation_prompts_path", str(prompts),
                   "--output_dir", str(tmp_path / "eval2"))
    assert_one_line_error(both, "--lora_base_dir", "--lora_dir")
