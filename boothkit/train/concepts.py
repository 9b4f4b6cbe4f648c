"""Several concepts in one run: `--concepts_list concepts.json` or `--dataset_config dataset.toml` (issue 12).

A concept is a subject's photos with their prompt and, for prior preservation, its class prompt and class images:

    [{"instance_prompt": "photo of zwx dog", "class_prompt": "photo of a dog",
      "instance_data_dir": "data/zwx", "class_data_dir": "data/dog", "num_class_images": 50, "repeats": 1,
      "validation_prompt": "zwx dog in the snow"}, ...]

(the `concepts_list` of the specification and of ShivamShrirao's trainer; `num_class_images`, `repeats` and
`validation_prompt` are optional; `validation_prompt` may also be a list of prompts). kohya users write the same in TOML:

    [[datasets]]
    [[datasets.subsets]]
    image_dir = "data/zwx"      # instance photos
    class_tokens = "zwx dog"    # their prompt
    num_repeats = 2
    [[datasets.subsets]]
    is_reg = true               # the class images of the dataset's instance subsets
    image_dir = "data/dog"
    class_tokens = "dog"

Each non-regularization subset becomes a concept; a dataset's one `is_reg` subset gives its concepts' class
prompt and folder. Both files are read into the same `Concept` schema, so a typo or a missing key is an error
naming the entry and the key. A concept's images appear `repeats` times per epoch (kohya's `num_repeats`), so
concepts are balanced by their repeats; each prior-preservation row uses a class image of its row's concept.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from boothkit.errors import BoothkitError, first_line


class Concept(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    instance_prompt: str = Field(min_length=1)
    instance_data_dir: str = Field(min_length=1)
    class_prompt: str | None = None
    class_data_dir: str | None = None
    num_class_images: int | None = Field(None, ge=1)
    repeats: int = Field(1, ge=1)
    validation_prompt: str | list[str] | None = None  # one prompt or several

    def prompt(self, which: str) -> str | None:
        """The concept's "instance" or "class" prompt."""
        return self.instance_prompt if which == "instance" else self.class_prompt

    @property
    def validation_prompts(self) -> list[str]:
        """The concept's validation prompts (empty ones left out)."""
        prompts = [self.validation_prompt] if isinstance(self.validation_prompt, str) else self.validation_prompt or []
        return [prompt for prompt in prompts if prompt]


class ValidationPrompt(NamedTuple):
    """One validation prompt of a run. `concept`: its concept's index, None in a single-concept run; `index`: its
    place among the concept's prompts, None when the concept has one (file names: `validation_image_names`)."""

    concept: int | None
    index: int | None
    prompt: str


def concepts_of(config) -> list[Concept]:
    """The run's concepts: from `--concepts_list`, `--dataset_config`, or the single concept of the flags; each
    with the run's `--num_class_images` unless it sets its own. Bad entries are refused (index and key)."""
    if config.concepts_list:
        concepts = _validated(_read_json(Path(config.concepts_list)), config.concepts_list)
    elif config.dataset_config:
        concepts = _validated(_from_kohya_toml(Path(config.dataset_config)), config.dataset_config)
    else:
        concepts = [Concept(instance_prompt=config.instance_prompt, instance_data_dir=config.instance_data_dir,
                            class_prompt=config.class_prompt, class_data_dir=config.class_data_dir,
                            validation_prompt=config.validation_prompt)]
    concepts = [c.model_copy(update={"num_class_images": c.num_class_images or config.num_class_images})
                for c in concepts]
    _check(concepts, config, config.concepts_list or config.dataset_config)
    return concepts


def read_concepts(path: str | Path) -> list[Concept]:
    """The concepts of a `--concepts_list` JSON, or of a kohya TOML dataset config (by its suffix)."""
    path = Path(path)
    entries = _from_kohya_toml(path) if path.suffix.lower() == ".toml" else _read_json(path)
    return _validated(entries, str(path))


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise BoothkitError(f"concepts list '{path}' does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise BoothkitError(f"concepts list '{path}' is not valid JSON: {first_line(error)}") from None


def _validated(entries: object, source: str) -> list[Concept]:
    if not isinstance(entries, list) or not entries:
        raise BoothkitError(f"'{source}' must hold a non-empty list of concepts")
    concepts = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BoothkitError(f"'{source}': concept {index} is not a mapping of keys to values")
        try:
            concepts.append(Concept.model_validate(entry))
        except ValidationError as error:
            problem = error.errors()[0]
            key = ".".join(str(part) for part in problem["loc"]) or "?"
            message = "missing" if problem["type"] == "missing" else problem["msg"]
            raise BoothkitError(f"'{source}': concept {index}, key '{key}': {message}") from None
    return concepts


def _check(concepts: list[Concept], config, source: str | None) -> None:
    """What a concept list can get wrong beyond its keys: a duplicate prompt, prior preservation without a
    class, validation prompts given twice."""
    where = f"'{source}': " if source else ""
    seen: dict[str, int] = {}
    for index, concept in enumerate(concepts):
        if concept.instance_prompt in seen:
            raise BoothkitError(f"{where}concept {index}, key 'instance_prompt': the same prompt as concept "
                                f"{seen[concept.instance_prompt]} ('{concept.instance_prompt}'): each concept needs "
                                "its own identifier")
        seen[concept.instance_prompt] = index
        if config.with_prior_preservation:
            for key in ("class_prompt", "class_data_dir"):
                if not getattr(concept, key):
                    raise BoothkitError(f"{where}concept {index}, key '{key}': missing (--with_prior_preservation "
                                        "needs each concept's class)")
    if source and config.validation_prompt:
        raise BoothkitError("--validation_prompt applies to a single concept: give each concept of "
                            f"'{source}' its own validation_prompt")


_SUBSET_KEYS = {"image_dir", "class_tokens", "num_repeats", "is_reg"}


def _from_kohya_toml(path: Path) -> list[dict]:
    """kohya's dataset config (datasets → subsets) as concept entries (see the module doc)."""
    if not path.is_file():
        raise BoothkitError(f"dataset config '{path}' does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise BoothkitError(f"dataset config '{path}' is not valid TOML: {first_line(error)}") from None
    entries = []
    for d, dataset in enumerate(data.get("datasets") or []):
        subsets = dataset.get("subsets") or []
        for s, subset in enumerate(subsets):
            unknown = sorted(set(subset) - _SUBSET_KEYS)
            if unknown:
                raise BoothkitError(f"'{path}': datasets[{d}].subsets[{s}] has unknown key '{unknown[0]}' (boothkit "
                                    f"reads {', '.join(sorted(_SUBSET_KEYS))})")
        regs = [subset for subset in subsets if subset.get("is_reg")]
        if len(regs) > 1:
            raise BoothkitError(f"'{path}': datasets[{d}] has {len(regs)} is_reg subsets; boothkit pairs one class "
                                "folder with a dataset's instance subsets (put other classes in their own dataset)")
        reg = regs[0] if regs else {}
        for subset in subsets:
            if subset.get("is_reg"):
                continue
            entry = {"instance_prompt": subset.get("class_tokens"), "instance_data_dir": subset.get("image_dir"),
                     "repeats": subset.get("num_repeats", 1)}
            if reg:
                entry.update(class_prompt=reg.get("class_tokens"), class_data_dir=reg.get("image_dir"))
            entries.append({key: value for key, value in entry.items() if value is not None})
    return entries


@dataclass
class ConceptImages:
    """The photos of every concept in one instance bank and one class bank, and which rows belong to which.

    `slots`: the instance-bank index of each slot of an epoch (a concept's photos `repeats` times);
    `concept_of`: the concept of each instance-bank index; `class_indices`: each concept's class-bank indices.
    With one concept and no repeats, slot i is photo i and class draws are unchanged from a single-subject run."""

    concepts: list[Concept]
    instance_files: list[list[tuple[Path, Image.Image]]]
    class_files: list[list[tuple[Path, Image.Image]]] = field(default_factory=list)

    @property
    def all_instance_files(self) -> list[tuple[Path, Image.Image]]:
        return [item for files in self.instance_files for item in files]

    @property
    def all_class_files(self) -> list[tuple[Path, Image.Image]]:
        return [item for files in self.class_files for item in files]

    @property
    def slots(self) -> list[int]:
        slots, start = [], 0
        for concept, files in zip(self.concepts, self.instance_files):
            slots += [start + i for _ in range(concept.repeats) for i in range(len(files))]
            start += len(files)
        return slots

    @property
    def concept_of(self) -> list[int]:
        return [k for k, files in enumerate(self.instance_files) for _ in files]

    @property
    def class_indices(self) -> list[list[int]]:
        indices, start = [], 0
        for files in self.class_files:
            indices.append(list(range(start, start + len(files))))
            start += len(files)
        return indices

    def validations(self) -> list[ValidationPrompt]:
        """Every validation prompt of every concept, in order (concepts without one add none)."""
        single = len(self.concepts) == 1
        return [ValidationPrompt(None if single else k, j if len(c.validation_prompts) > 1 else None, prompt)
                for k, c in enumerate(self.concepts) for j, prompt in enumerate(c.validation_prompts)]


class RowPicker:
    """Which photo each row of a batch uses: instance row p takes slot `order[p]`; its prior row a class image
    of the same concept."""

    def __init__(self, images: ConceptImages):
        self.slots, self.concept_of, self.class_indices = images.slots, images.concept_of, images.class_indices

    def instance(self, order_value: int) -> tuple[int, int]:
        """(instance-bank index, concept) of the slot `order_value` falls on."""
        index = self.slots[order_value % len(self.slots)]
        return index, self.concept_of[index]

    def class_image(self, concept: int, order_value: int) -> int:
        indices = self.class_indices[concept]
        return indices[order_value % len(indices)]
