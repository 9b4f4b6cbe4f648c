"""Subjects, folders and evaluation prompts: how an evaluation finds what to evaluate.

An evaluation reads

* ``--instance_data_dir``: one folder of photos per subject (``backpack/``, ``cat2/``, ``dog7/`` ...);
* ``--lora_base_dir``: a LoRA folder with the same name for each of them (``backpack/``, ``cat2/`` ...);
* ``--evaluation_prompts_path``: the subjects and the prompts to generate for them, in one of three
  formats (see `load_evaluation_prompts`).

`subject_of_folder` maps a folder name to the subject it shows (rule: `MAPPING_RULE`),
`discover_subjects` pairs the photo folders with their LoRA folders, and `EvaluationPrompts.prompts_for`
writes the generation prompts with the identifier the LoRA was trained with ("a sks dog in the jungle").
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from boothkit.errors import BoothkitError, first_line

__all__ = [
    "LIVE_CLASSES",
    "MAPPING_RULE",
    "SUBJECT_PLACEHOLDER",
    "EvaluationPrompts",
    "SubjectEntry",
    "discover_subjects",
    "load_evaluation_prompts",
    "subject_of_folder",
]

SUBJECT_PLACEHOLDER = "<subject>"
"""Stands for "<identifier> <class noun>" in an evaluation prompt, e.g. "a <subject> in the jungle"."""

LIVE_CLASSES = frozenset({"cat", "dog"})
"""Classes that get the DreamBooth dataset's live-subject prompts (Ruiz et al. 2022); all others get the
object prompts."""

_VARIANT_SUFFIX = "cd"  # the DreamBooth-style variant suffix (`dogcd`)

MAPPING_RULE = (
    "Each folder of --instance_data_dir is evaluated on its own (folders are never combined) and maps to "
    "exactly one subject of the evaluation prompts file, by the first of these rules that gives a subject: "
    "(1) the folder name itself (`backpack` -> backpack, `dog2` -> dog2 when dog2 is a subject); "
    "(2) the name with underscores read as spaces (`cat_statue` -> cat statue); "
    "(3) a numbered variant: trailing digits removed, together with any `_` or `-` before them, then rules "
    "1-2 again (`cat2` -> cat, `dog7` -> dog, `cat_statue_3` -> cat statue); "
    "(4) a `cd` variant: a name from step 3 ending in `cd` whose removal leaves a subject by rules 1-2 "
    "(`dogcd` -> dog). "
    "Matching is case-sensitive. A folder that matches no subject, or has no LoRA folder of the same name "
    "in --lora_base_dir, is skipped with a warning."
)
"""The folder -> subject rule, as a paragraph for the README (implemented by `subject_of_folder`)."""


# --------------------------------------------------------------------------------------------- folders


def _direct_match(name: str, subjects: set[str]) -> str | None:
    """Rules 1-2: the name itself, then with underscores read as spaces."""
    if name in subjects:
        return name
    spaced = name.replace("_", " ")
    if spaced in subjects:
        return spaced
    return None


def subject_of_folder(folder_name: str, subjects: Iterable[str]) -> str | None:
    """The subject shown by the photo folder `folder_name`, or None when it matches none of `subjects`.

    The first rule that gives a subject wins (this is `MAPPING_RULE`):

    1. the folder name itself: ``backpack`` -> ``backpack``; ``dog2`` -> ``dog2`` when ``dog2`` is a
       subject (as in the DreamBooth dataset's ``prompts_and_classes.txt``);
    2. underscores read as spaces: ``cat_statue`` -> ``cat statue``, ``backpack_dog`` -> ``backpack dog``
       (when ``backpack_dog`` itself is not a subject);
    3. a numbered variant: trailing digits removed, with any ``_`` or ``-`` before them, then rules 1-2:
       ``cat2`` -> ``cat``, ``dog7`` -> ``dog``, ``cat_statue_3`` -> ``cat statue``;
    4. a ``cd`` variant: when the name left by step 3 ends in ``cd`` and its removal leaves a subject (by
       rules 1-2): ``dogcd`` -> ``dog``, ``dogcd2`` -> ``dog``. Only ``cd``: a looser suffix rule would map
       unrelated names (``canoe`` -> ``can``), and a wrong subject is worse than a skipped folder.

    Matching is case-sensitive, and a folder maps to exactly one subject: several folders may map to the
    same subject (``dog``, ``dog2``, ``dog7``), and each is evaluated on its own with its own LoRA.
    """
    subject_set = set(subjects)
    name = folder_name.strip()
    if not name:
        return None
    match = _direct_match(name, subject_set)
    if match is not None:
        return match
    stem = re.sub(r"[_-]*\d+$", "", name)
    if stem and stem != name:
        match = _direct_match(stem, subject_set)
        if match is not None:
            return match
    if stem.endswith(_VARIANT_SUFFIX) and len(stem) > len(_VARIANT_SUFFIX):
        return _direct_match(stem[: -len(_VARIANT_SUFFIX)], subject_set)
    return None


@dataclass(frozen=True)
class SubjectEntry:
    """One photo folder to evaluate: its name, the subject it shows, and its photos' and LoRA's folders."""

    folder: str
    subject: str
    images_dir: Path
    lora_dir: Path


def _require_dir(path: str | Path, flag: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise BoothkitError(f"{flag} '{folder}' does not exist")
    if not folder.is_dir():
        raise BoothkitError(f"{flag} '{folder}' is not a folder")
    return folder


def discover_subjects(
    instance_data_dir: str | Path,
    lora_base_dir: str | Path,
    subjects: Iterable[str],
    only: Sequence[str] | None = None,
    lora_dir: str | Path | None = None,
) -> tuple[list[SubjectEntry], list[str]]:
    """Pair each subject folder of `instance_data_dir` with the LoRA folder of the same name (or, with
    `lora_dir`, with that one LoRA or model: a model trained on several concepts).

    Every (non-hidden) sub-folder of `instance_data_dir` is mapped to a subject by `subject_of_folder`.
    It is skipped when it maps to no subject, when `lora_base_dir` has no folder of the same name, or when
    `only` is given and names neither the folder nor its subject.

    Returns:
        ``(entries, skipped)``: the matched folders sorted by folder name, and the names of the skipped
        folders (sorted), for the caller to report in one warning.

    Raises:
        BoothkitError: a missing `instance_data_dir` or `lora_base_dir`, or a name in `only` that is
            neither a folder of `instance_data_dir` nor the subject of one.
    """
    images_root = _require_dir(instance_data_dir, "--instance_data_dir")
    shared = _require_dir(lora_dir, "--lora_dir") if lora_dir is not None else None
    lora_root = _require_dir(lora_base_dir, "--lora_base_dir") if shared is None else None
    subject_list = list(subjects)
    folders = sorted(p.name for p in images_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    mapped = {folder: subject_of_folder(folder, subject_list) for folder in folders}

    wanted = None if only is None else set(only)
    if wanted is not None:
        known = set(folders) | {s for s in mapped.values() if s is not None}
        unknown = sorted(wanted - known)
        if unknown:
            raise BoothkitError(
                f"--subjects names {', '.join(repr(n) for n in unknown)}, which is neither a folder of "
                f"'{images_root}' nor the subject of one"
            )

    entries: list[SubjectEntry] = []
    skipped: list[str] = []
    for folder in folders:
        subject = mapped[folder]
        lora_dir = shared if shared is not None else lora_root / folder
        if (
            subject is None
            or not lora_dir.is_dir()
            or (wanted is not None and folder not in wanted and subject not in wanted)
        ):
            skipped.append(folder)
            continue
        entries.append(SubjectEntry(folder=folder, subject=subject, images_dir=images_root / folder,
                                    lora_dir=lora_dir))
    return entries, skipped


# --------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class EvaluationPrompts:
    """The subjects of an evaluation and the prompts to generate for each.

    Templates contain `SUBJECT_PLACEHOLDER` ("<subject>"), which `prompts_for` replaces by the identifier
    followed by the subject's class noun.
    """

    source: Path
    format: str  # "subjects-and-prompts-json", "per-subject-json" or "prompts-and-classes-txt"
    templates: dict[str, tuple[str, ...]] = field(repr=False)
    classes: dict[str, str] = field(repr=False)

    @property
    def subjects(self) -> list[str]:
        """The subjects, in the file's order."""
        return list(self.templates)

    def _check(self, subject: str) -> None:
        if subject not in self.templates:
            raise BoothkitError(f"evaluation prompts file '{self.source}' has no subject '{subject}'")

    def class_of(self, subject: str) -> str:
        """The noun the prompts use for `subject`: its class in prompts_and_classes.txt ("dog2" -> "dog"),
        the subject itself for the JSON formats ("cat statue")."""
        self._check(subject)
        return self.classes[subject]

    def prompts_for(self, subject: str, identifier: str = "sks") -> list[str]:
        """The generation prompts for `subject`, with the identifier before the class noun.

        "a <subject> in the jungle" becomes "a sks dog in the jungle": the phrase the LoRA was trained
        with ("a photo of sks dog"). An empty identifier gives the plain class prompt ("a dog in the
        jungle").
        """
        self._check(subject)
        identifier = identifier.strip()
        noun = self.classes[subject]
        phrase = f"{identifier} {noun}" if identifier else noun
        return [template.replace(SUBJECT_PLACEHOLDER, phrase) for template in self.templates[subject]]


def load_evaluation_prompts(path: str | Path) -> EvaluationPrompts:
    """Read an evaluation prompts file in one of three formats.

    (a) JSON with the same prompts for every subject::

            {"subjects": ["backpack", "dog"], "prompts": ["a <subject> in the jungle", ...]}

    (b) JSON mapping each subject to its own prompts::

            {"dog": ["a <subject> in the jungle", ...], "backpack": ["a <subject> on the beach", ...]}

    (c) the DreamBooth dataset's ``prompts_and_classes.txt``: a ``subject_name,class`` table under
        "Classes", then "Object Prompts" and "Live Subject Prompts" lists of
        ``'a {0} {1} in the jungle'.format(unique_token, class_token)`` lines. The subjects are the
        subject names (``dog2``), their noun is their class (``dog``); subjects of class cat or dog get the
        live-subject prompts, all others the object prompts.

    In (a) and (b) every prompt must contain "<subject>", and the noun of a subject is the subject itself.

    Raises:
        BoothkitError: an unreadable file, malformed JSON, a wrong structure or a prompt without the
            placeholder, naming the file and the problem in one line.
    """
    source = Path(path)
    if not source.is_file():
        raise BoothkitError(f"evaluation prompts file '{source}' does not exist or is not a file")
    try:
        text = source.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BoothkitError(f"cannot read evaluation prompts file '{source}': {first_line(exc)}") from None
    stripped = text.strip()
    if not stripped:
        raise BoothkitError(f"evaluation prompts file '{source}' is empty")
    if stripped[0] in "{[" or source.suffix.lower() == ".json":
        return _load_json(source, text)
    if re.search(r"^\s*subject_name\s*,\s*class\s*$", text, flags=re.MULTILINE | re.IGNORECASE):
        return _load_prompts_and_classes(source, text)
    raise BoothkitError(
        f"evaluation prompts file '{source}' is neither JSON nor a DreamBooth prompts_and_classes.txt "
        "(no 'subject_name,class' table)"
    )


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _subject_name(source: Path, value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BoothkitError(f"evaluation prompts file '{source}': {where} must be a non-empty string, got {value!r}")
    return value.strip()


def _prompt_list(source: Path, value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise BoothkitError(f"evaluation prompts file '{source}': {where} must be a non-empty list of prompts")
    prompts = []
    for prompt in value:
        if not isinstance(prompt, str) or not prompt.strip():
            raise BoothkitError(
                f"evaluation prompts file '{source}': {where} must hold non-empty strings, got {prompt!r}"
            )
        if SUBJECT_PLACEHOLDER not in prompt:
            raise BoothkitError(
                f"evaluation prompts file '{source}': prompt {prompt!r} in {where} has no "
                f"'{SUBJECT_PLACEHOLDER}' placeholder"
            )
        prompts.append(" ".join(prompt.split()))
    return tuple(prompts)


def _load_json(source: Path, text: str) -> EvaluationPrompts:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, and so is a duplicate key
        raise BoothkitError(f"evaluation prompts file '{source}' is not valid JSON: {first_line(exc)}") from None
    if not isinstance(data, dict) or not data:
        raise BoothkitError(
            f"evaluation prompts file '{source}' must hold a JSON object: "
            '{"subjects": [...], "prompts": [...]} or {"<subject>": [prompts], ...}'
        )

    templates: dict[str, tuple[str, ...]] = {}
    if "subjects" in data or "prompts" in data:
        extra = sorted(set(data) - {"subjects", "prompts"})
        if extra or "subjects" not in data or "prompts" not in data:
            missing = "prompts" if "subjects" in data else "subjects"
            problem = f"unknown keys {extra}" if extra else f"missing key '{missing}'"
            raise BoothkitError(
                f"evaluation prompts file '{source}': {problem} (expected exactly 'subjects' and 'prompts')"
            )
        subjects = data["subjects"]
        if not isinstance(subjects, list) or not subjects:
            raise BoothkitError(f"evaluation prompts file '{source}': 'subjects' must be a non-empty list of names")
        prompts = _prompt_list(source, data["prompts"], "'prompts'")
        for index, value in enumerate(subjects):
            subject = _subject_name(source, value, f"subjects[{index}]")
            if subject in templates:
                raise BoothkitError(f"evaluation prompts file '{source}': subject '{subject}' is listed twice")
            templates[subject] = prompts
        fmt = "subjects-and-prompts-json"
    else:
        for key, value in data.items():
            subject = _subject_name(source, key, "a subject name")
            if subject in templates:
                raise BoothkitError(f"evaluation prompts file '{source}': subject '{subject}' is listed twice")
            templates[subject] = _prompt_list(source, value, f"the prompts of '{subject}'")
        fmt = "per-subject-json"
    return EvaluationPrompts(source=source, format=fmt, templates=templates,
                             classes={subject: subject for subject in templates})


_FORMAT_LINE = re.compile(
    r"""^\s*(?P<literal>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\s*
        \.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""",
    re.VERBOSE,
)


def _load_prompts_and_classes(source: Path, text: str) -> EvaluationPrompts:
    """Format (c): the DreamBooth dataset's prompts_and_classes.txt."""
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        lowered = line.lower()
        if not line:
            continue
        if re.fullmatch(r"subject_name\s*,\s*class", lowered):
            section = "classes"
            continue
        if lowered in {"classes", "prompts"}:
            section = None if lowered == "prompts" else section
            continue
        if lowered == "object prompts":
            section = "object"
            continue
        if lowered == "live subject prompts":
            section = "live"
            continue
        if section == "classes":
            if "," not in line:
                raise BoothkitError(
                    f"evaluation prompts file '{source}', line {number}: expected 'subject_name,class', got {line!r}"
                )
            name, noun = (part.strip() for part in line.split(",", 1))
            if not name or not noun:
                raise BoothkitError(
                    f"evaluation prompts file '{source}', line {number}: expected 'subject_name,class', got {line!r}"
                )
            if name in classes:
                raise BoothkitError(
                    f"evaluation prompts file '{source}', line {number}: subject '{name}' is listed twice"
                )
            classes[name] = noun
        elif section in lists:
            if re.fullmatch(r"\w+\s*=\s*\[", line) or line == "]":
                continue
            match = _FORMAT_LINE.match(line)
            if match is None:
                raise BoothkitError(
                    f"evaluation prompts file '{source}', line {number}: expected "
                    f"\"'a {{0}} {{1}} ...'.format(unique_token, class_token),\", got {line!r}"
                )
            template = ast.literal_eval(match.group("literal"))
            if template.count("{0} {1}") != 1 or template.replace("{0} {1}", "").count("{") != 0:
                raise BoothkitError(
                    f"evaluation prompts file '{source}', line {number}: a prompt must contain '{{0}} {{1}}' "
                    f"(identifier, then class) once and no other placeholder, got {template!r}"
                )
            lists[section].append(" ".join(template.replace("{0} {1}", SUBJECT_PLACEHOLDER).split()))
    if not classes:
        raise BoothkitError(f"evaluation prompts file '{source}' has no 'subject_name,class' rows")
    for key, title in (("object", "Object Prompts"), ("live", "Live Subject Prompts")):
        if not lists[key]:
            raise BoothkitError(f"evaluation prompts file '{source}' has no '{title}' list")
    object_prompts, live_prompts = tuple(lists["object"]), tuple(lists["live"])
    templates = {
        name: live_prompts if noun in LIVE_CLASSES else object_prompts for name, noun in classes.items()
    }
    return EvaluationPrompts(source=source, format="prompts-and-classes-txt", templates=templates, classes=classes)
