"""The subjects of one `boothkit evaluate` run, resolved once: the exact files each evaluation reads.

A `Subject` is what the cache key, the model loading and the scoring of one subject folder depend on: its
prompts (identifier placed, `--max_prompts` applied), its reference photo files, its fine LoRA file and, for
`--method ag`, its weak LoRA file, and the prompt-encoding options its LoRA was trained with. Resolving them
checks everything that would otherwise stop a run midway, with one line.

Weak LoRAs (`--method ag`): by default `LORA_BASE_DIR/<folder>/weak/` (the layout `boothkit train` writes).
`--weak_checkpoint_path P` replaces it: when P is a LoRA (a `.safetensors` file, or a folder holding
`pytorch_lora_weights.safetensors`) it is the weak LoRA of the one subject evaluated (refused when several
are); otherwise P holds one weak LoRA folder per subject folder, `P/<folder>/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from boothkit import layout
from boothkit.data.images import list_image_files
from boothkit.errors import BoothkitError
from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.dataset import EvaluationPrompts, SubjectEntry
from boothkit.guidance.adapters import existing_lora_file, text_options


@dataclass(frozen=True)
class Subject:
    """One subject folder to evaluate, with every file and option its evaluations depend on."""

    entry: SubjectEntry
    prompts: tuple[str, ...]
    references: tuple[Path, ...]  # the reference photos scored against
    lora: Path  # the fine LoRA file, or the folder of a fully fine-tuned model (`full_model`)
    weak: Path | None  # the weak LoRA file, or a full model's weak/ folder (--method ag), else None
    text: tuple[int, bool]  # (max_sequence_length, complex_human_instruction) as the LoRA was trained
    identifier: str = "sks"  # the token its prompts put before the class noun

    @property
    def folder(self) -> str:
        return self.entry.folder

    @property
    def full_model(self) -> bool:
        """A fully fine-tuned model (`train --train_mode full`): a pipeline folder instead of a LoRA."""
        return self.lora.is_dir()


def resolve_subjects(config: EvaluateConfig, prompts: EvaluationPrompts, entries: list[SubjectEntry]
                     ) -> list[Subject]:
    """Every entry as a `Subject`; one `BoothkitError` line for a folder without photos, a missing LoRA or
    weak LoRA, or a `--weak_checkpoint_path` that does not fit."""
    weak_for = _weak_resolver(config, entries) if config.method == "ag" else (lambda entry: None)
    identifiers = concept_identifiers(config, prompts, entries)
    subjects = []
    for entry in entries:
        identifier = identifiers.get(entry.folder, config.identifier)
        if is_full_model(entry.lora_dir):
            subjects.append(_full_model_subject(config, prompts, entry, identifier))
            continue
        texts = prompts.prompts_for(entry.subject, identifier)
        subjects.append(Subject(
            entry=entry, prompts=tuple(texts[: config.max_prompts] if config.max_prompts else texts),
            references=tuple(list_image_files(entry.images_dir, f"subject folder '{entry.folder}'")),
            lora=existing_lora_file(entry.lora_dir, f"LoRA folder of subject '{entry.folder}'"),
            weak=weak_for(entry), text=text_options(config, entry.lora_dir), identifier=identifier))
    return subjects


def concept_identifiers(config: EvaluateConfig, prompts: EvaluationPrompts, entries: list[SubjectEntry]
                        ) -> dict[str, str]:
    """{subject folder: identifier} from `--concepts_list`: the folder that is a concept's instance_data_dir takes
    the words of that concept's trigger ("a photo of zwx dog" → "zwx dog") other than the subject's class noun
    ("zwx"). Folders that are no concept's keep `--identifier`."""
    if not config.concepts_list:
        return {}
    from boothkit.formats.metadata import trigger_phrase
    from boothkit.train.concepts import read_concepts

    by_path = {Path(c.instance_data_dir).expanduser().resolve(): c for c in read_concepts(config.concepts_list)}
    identifiers = {}
    for entry in entries:
        concept = by_path.get(Path(entry.images_dir).resolve())
        if concept is not None:
            noun = set(prompts.class_of(entry.subject).split())
            words = [word for word in trigger_phrase(concept.instance_prompt).split() if word not in noun]
            identifiers[entry.folder] = " ".join(words) or config.identifier
    if not identifiers:
        raise BoothkitError(f"--concepts_list '{config.concepts_list}': no subject folder of "
                            f"'{config.instance_data_dir}' is a concept's instance_data_dir")
    return identifiers


def is_full_model(folder: str | Path) -> bool:
    return (Path(folder) / "model_index.json").is_file()


def _full_model_subject(config: EvaluateConfig, prompts: EvaluationPrompts, entry: SubjectEntry,
                        identifier: str) -> Subject:
    """A subject whose folder is a fully fine-tuned model: AG uses its `weak/` modules, WIG interpolates towards
    `--pretrained_model_name_or_path` (the base model)."""
    texts = prompts.prompts_for(entry.subject, identifier)
    weak = Path(config.weak_checkpoint_path or layout.weak_dir(entry.lora_dir)) if config.method == "ag" else None
    if weak is not None and not weak.is_dir():
        raise BoothkitError(f"--method ag needs a weak checkpoint for subject '{entry.folder}': '{weak}' is no folder "
                            "(train with --weak_checkpoint_step, or pass --weak_checkpoint_path)")
    return Subject(entry=entry, prompts=tuple(texts[: config.max_prompts] if config.max_prompts else texts),
                   references=tuple(list_image_files(entry.images_dir, f"subject folder '{entry.folder}'")),
                   lora=Path(entry.lora_dir), weak=weak, text=(config.max_sequence_length, config.complex_human_instruction),
                   identifier=identifier)


def _weak_resolver(config: EvaluateConfig, entries: list[SubjectEntry]):
    """entry → its weak LoRA file, as the module doc describes."""
    given = config.weak_checkpoint_path
    if given is None:
        return lambda entry: _weak_file(layout.weak_dir(entry.lora_dir), entry,
                                        "train with --weak_checkpoint_step, or pass --weak_checkpoint_path")
    path = Path(given).expanduser()
    if not path.exists():
        raise BoothkitError(f"--weak_checkpoint_path '{given}' does not exist")
    if path.is_file() or layout.lora_file(path).is_file():
        if len(entries) > 1:
            raise BoothkitError(f"--weak_checkpoint_path '{given}' is one weak LoRA but {len(entries)} subjects are "
                                "evaluated; give a folder with one weak LoRA folder per subject folder, or choose "
                                "one subject with --subjects")
        single = existing_lora_file(path, "--weak_checkpoint_path")
        return lambda entry: single
    return lambda entry: _weak_file(path / entry.folder, entry, f"--weak_checkpoint_path '{given}' holds no "
                                                                f"folder '{entry.folder}' with a weak LoRA")


def _weak_file(folder: Path, entry: SubjectEntry, hint: str) -> Path:
    try:
        return existing_lora_file(folder, "weak checkpoint")
    except BoothkitError:
        raise BoothkitError(f"--method ag needs a weak checkpoint for subject '{entry.folder}': '{folder}' has no "
                            f"{layout.LORA_WEIGHT_NAME} ({hint})") from None
