"""Tests for boothkit.evaluate.dataset: folder -> subject mapping, folder discovery, evaluation prompt files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from boothkit.errors import BoothkitError
from boothkit.evaluate.dataset import (
    MAPPING_RULE,
    EvaluationPrompts,
    SubjectEntry,
    discover_subjects,
    load_evaluation_prompts,
    subject_of_folder,
)

ASSETS = Path(__file__).resolve().parent.parent / "boothkit" / "assets"
SEED_SUBJECTS = ["backpack", "backpack dog", "cat", "dog", "cat statue", "teapot"]


# ------------------------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("folder", "subject"),
    [
        ("backpack", "backpack"),
        ("cat2", "cat"),
        ("dog7", "dog"),
        ("dogcd", "dog"),
        ("dogcd2", "dog"),
        ("cat_statue", "cat statue"),
        ("cat_statue_3", "cat statue"),
        ("backpack_dog", "backpack dog"),
        ("dog_12", "dog"),
        ("unknown", None),
        ("robot_toy", None),
        ("dogs", None),  # a 2-letter suffix must leave a subject: "do" is none
        ("Dog", None),  # case-sensitive
        ("2", None),
        ("", None),
    ],
)
def test_seed_mapping(folder: str, subject: str | None) -> None:
    assert subject_of_folder(folder, SEED_SUBJECTS) == subject


def test_exact_name_wins() -> None:
    # A subject named like the folder beats every variant rule.
    assert subject_of_folder("cat2", ["cat", "cat2"]) == "cat2"
    assert subject_of_folder("backpack_dog", ["backpack_dog", "backpack"]) == "backpack_dog"
    assert subject_of_folder("backpack_dog", ["backpack dog", "backpack"]) == "backpack dog"
    assert subject_of_folder("dogcd", ["dogcd", "dog"]) == "dogcd"


def test_mapping_with_prompts_and_classes_subjects() -> None:
    subjects = load_evaluation_prompts(ASSETS / "prompts_and_classes.txt").subjects
    assert subject_of_folder("dog2", subjects) == "dog2"
    assert subject_of_folder("cat", subjects) == "cat"
    assert subject_of_folder("backpack_dog", subjects) == "backpack_dog"
    assert subject_of_folder("dog4", subjects) == "dog"  # not in the dataset: numbered variant of dog
    assert subject_of_folder("cat_statue", subjects) is None


# "`cat2` -> cat" and "`dog2` -> dog2 when dog2 is a subject", as MAPPING_RULE writes its examples.
_DOCUMENTED_EXAMPLE = re.compile(
    r"`(?P<folder>[^`]+)` -> (?P<subject>[a-z][a-z0-9 ]*?)(?: when (?P<condition>[a-z0-9 ]+) is a subject)?"
    r"(?=[;,)])"
)


def test_documented_mapping_examples_are_what_the_code_does() -> None:
    """Every `folder` -> subject example of MAPPING_RULE (the README paragraph) is what subject_of_folder
    returns, so the documentation and the code cannot drift apart."""
    examples = [(m["folder"], m["subject"], m["condition"]) for m in _DOCUMENTED_EXAMPLE.finditer(MAPPING_RULE)]
    # The parser must see every example the text gives (each is written "`folder` -> ...").
    assert len(examples) == MAPPING_RULE.count("` -> ") >= 7, f"parsed from MAPPING_RULE: {examples}"
    unconditional = {subject for _, subject, condition in examples if condition is None}
    for folder, subject, condition in examples:
        extra = {condition} if condition else set()
        # The example holds with only its own subject, and among all the documented subjects.
        for subjects in ({subject} | extra, unconditional | extra):
            assert subject_of_folder(folder, sorted(subjects)) == subject, (folder, sorted(subjects))
    assert "\n" not in MAPPING_RULE  # one paragraph for the README


# ----------------------------------------------------------------------------------------- discovery


def _make(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
    return root


def test_discover_subjects(tmp_path: Path) -> None:
    images = _make(tmp_path / "images", "backpack", "cat2", "cat", "dogcd", "mystery", "teapot", ".cache")
    (images / "notes.txt").write_text("not a folder")
    loras = _make(tmp_path / "loras", "backpack", "cat2", "cat", "dogcd", "mystery")  # no teapot LoRA
    entries, skipped = discover_subjects(images, loras, SEED_SUBJECTS)
    assert [(e.folder, e.subject) for e in entries] == [
        ("backpack", "backpack"), ("cat", "cat"), ("cat2", "cat"), ("dogcd", "dog"),
    ]
    assert skipped == ["mystery", "teapot"]
    cat2 = entries[2]
    assert cat2 == SubjectEntry("cat2", "cat", images / "cat2", loras / "cat2")
    # cat and cat2 show the same subject but stay separate entries with their own LoRA (never combined).
    assert entries[1].lora_dir != cat2.lora_dir and entries[1].images_dir != cat2.images_dir


def test_discover_only_by_folder_or_subject(tmp_path: Path) -> None:
    images = _make(tmp_path / "images", "backpack", "cat", "cat2", "dog7")
    loras = _make(tmp_path / "loras", "backpack", "cat", "cat2", "dog7")
    entries, skipped = discover_subjects(images, loras, SEED_SUBJECTS, only=["cat"])
    assert [e.folder for e in entries] == ["cat", "cat2"]  # "cat" names the subject of cat2 too
    assert skipped == ["backpack", "dog7"]
    entries, skipped = discover_subjects(images, loras, SEED_SUBJECTS, only=["cat2", "backpack"])
    assert [e.folder for e in entries] == ["backpack", "cat2"]
    assert skipped == ["cat", "dog7"]
    entries, _ = discover_subjects(images, loras, SEED_SUBJECTS, only=["dog"])
    assert [e.folder for e in entries] == ["dog7"]
    with pytest.raises(BoothkitError, match="'teapot'"):
        discover_subjects(images, loras, SEED_SUBJECTS, only=["teapot"])


def test_discover_missing_folders(tmp_path: Path) -> None:
    images = _make(tmp_path / "images", "cat")
    with pytest.raises(BoothkitError, match="--lora_base_dir"):
        discover_subjects(images, tmp_path / "nope", SEED_SUBJECTS)
    with pytest.raises(BoothkitError, match="--instance_data_dir"):
        discover_subjects(tmp_path / "nope", images, SEED_SUBJECTS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BoothkitError, match="not a folder"):
        discover_subjects(tmp_path / "file", images, SEED_SUBJECTS)


# ------------------------------------------------------------------------------------------- prompts


def _write(tmp_path: Path, content, name: str = "prompts.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_seed_json_format(tmp_path: Path) -> None:
    path = _write(tmp_path, {"subjects": ["backpack", "dog", "cat statue"],
                             "prompts": ["a <subject> in the jungle", "a red <subject>"]})
    prompts = load_evaluation_prompts(path)
    assert isinstance(prompts, EvaluationPrompts)
    assert prompts.subjects == ["backpack", "dog", "cat statue"]
    assert prompts.prompts_for("dog") == ["a sks dog in the jungle", "a red sks dog"]
    assert prompts.prompts_for("cat statue", identifier="zwx") == [
        "a zwx cat statue in the jungle", "a red zwx cat statue",
    ]
    assert prompts.class_of("cat statue") == "cat statue"
    assert prompts.prompts_for("dog", identifier="") == ["a dog in the jungle", "a red dog"]


def test_per_subject_json_format(tmp_path: Path) -> None:
    path = _write(tmp_path, {"dog": ["a <subject> in the jungle", "a <subject> wearing a red hat"],
                             "backpack": ["a <subject> on the beach"]})
    prompts = load_evaluation_prompts(path)
    assert prompts.subjects == ["dog", "backpack"]
    assert prompts.prompts_for("dog") == ["a sks dog in the jungle", "a sks dog wearing a red hat"]
    assert prompts.prompts_for("backpack") == ["a sks backpack on the beach"]
    assert prompts.class_of("backpack") == "backpack"
    with pytest.raises(BoothkitError, match="no subject 'cat'"):
        prompts.prompts_for("cat")


def test_prompts_and_classes_txt() -> None:
    prompts = load_evaluation_prompts(ASSETS / "prompts_and_classes.txt")
    assert len(prompts.subjects) == 30
    assert prompts.subjects[:3] == ["backpack", "backpack_dog", "bear_plushie"]
    assert prompts.class_of("dog2") == "dog"
    assert prompts.class_of("backpack_dog") == "backpack"
    assert prompts.class_of("bear_plushie") == "stuffed animal"

    dog2 = prompts.prompts_for("dog2")
    backpack = prompts.prompts_for("backpack")
    assert len(dog2) == len(backpack) == 25
    assert dog2[0] == "a sks dog in the jungle"
    assert "a sks dog wearing a santa hat" in dog2 and "a sks dog in a chef outfit" in dog2  # live subject
    assert backpack[0] == "a sks backpack in the jungle"
    assert "a sks backpack with the Eiffel Tower in the background" in backpack  # object prompts
    assert not any("santa hat" in p for p in backpack)
    assert backpack[-1] == "a cube shaped sks backpack"
    assert prompts.prompts_for("cat2")[10] == "a sks cat wearing a red hat"
    assert prompts.prompts_for("bear_plushie", identifier="zwx")[0] == "a zwx stuffed animal in the jungle"
    live = [s for s in prompts.subjects if "santa hat" in " ".join(prompts.prompts_for(s))]
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]


def test_identifier_goes_before_the_noun(tmp_path: Path) -> None:
    path = _write(tmp_path, {"subjects": ["dog"],
                             "prompts": ["<subject> sleeping", "a photo of a <subject> and a <subject>"]})
    assert load_evaluation_prompts(path).prompts_for("dog", "sks") == [
        "sks dog sleeping", "a photo of a sks dog and a sks dog",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"subjects": ["dog"], "prompts": ["a <subject>"]', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ("{}", "JSON object"),
        ({"subjects": ["dog"]}, "missing key 'prompts'"),
        ({"prompts": ["a <subject>"]}, "missing key 'subjects'"),
        ({"subjects": ["dog"], "prompts": ["a <subject>"], "extra": 1}, "unknown keys"),
        ({"subjects": "dog", "prompts": ["a <subject>"]}, "'subjects' must be a non-empty list"),
        ({"subjects": [], "prompts": ["a <subject>"]}, "'subjects' must be a non-empty list"),
        ({"subjects": ["dog", 3], "prompts": ["a <subject>"]}, r"subjects\[1\]"),
        ({"subjects": ["dog", "dog"], "prompts": ["a <subject>"]}, "listed twice"),
        ({"subjects": ["dog"], "prompts": []}, "non-empty list of prompts"),
        ({"subjects": ["dog"], "prompts": ["a dog in the jungle"]}, "no '<subject>' placeholder"),
        ({"subjects": ["dog"], "prompts": [None]}, "non-empty strings"),
        ({"dog": "a <subject>"}, "prompts of 'dog'"),
        ({"dog": ["a {subject} in the snow"]}, "no '<subject>' placeholder"),
        ('{"dog": ["a <subject>"], "dog": ["a <subject>"]}', "appears twice"),
        ("", "is empty"),
        ("hello", "neither JSON nor"),
    ],
)
def test_malformed_prompt_files(tmp_path: Path, content, message: str) -> None:
    name = "prompts.txt" if content == "hello" else "prompts.json"
    path = _write(tmp_path, content, name)
    with pytest.raises(BoothkitError, match=message) as excinfo:
        load_evaluation_prompts(path)
    assert str(path) in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


GOOD_TXT = (ASSETS / "prompts_and_classes.txt").read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GOOD_TXT.replace("dog2,dog", "dog2 dog"), "line 15: expected 'subject_name,class'"),
        (GOOD_TXT.split("Live Subject Prompts")[0], "no 'Live Subject Prompts' list"),
        (GOOD_TXT.replace("'a {0} {1} in the snow'.format(unique_token, class_token),", "'a {0} {1} in the snow',"),
         "expected"),
        (GOOD_TXT.replace("'a red {0} {1}'", "'a red {1} {0}'"), "must contain"),
        (GOOD_TXT.replace(GOOD_TXT[GOOD_TXT.index("backpack,"):GOOD_TXT.index("Prompts")], "\n"),
         "no 'subject_name,class' rows"),
    ],
    ids=["bad class row", "no live list", "bad prompt line", "swapped placeholders", "no classes"],
)
def test_malformed_prompts_and_classes(tmp_path: Path, content: str, message: str) -> None:
    path = _write(tmp_path, content, "prompts_and_classes.txt")
    with pytest.raises(BoothkitError, match=message) as excinfo:
        load_evaluation_prompts(path)
    assert str(path) in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_unreadable_prompt_files(tmp_path: Path) -> None:
    with pytest.raises(BoothkitError, match="does not exist"):
        load_evaluation_prompts(tmp_path / "missing.json")
    with pytest.raises(BoothkitError, match="does not exist or is not a file"):
        load_evaluation_prompts(tmp_path)
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(BoothkitError, match="cannot read"):
        load_evaluation_prompts(path)


def test_only_the_cd_suffix_marks_a_variant():
    assert subject_of_folder("dogcd", ["dog"]) == "dog"
    assert subject_of_folder("canoe", ["can"]) is None
    assert subject_of_folder("dogxy", ["dog"]) is None
