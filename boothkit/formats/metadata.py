"""The safetensors metadata of the LoRA files boothkit writes, so that what they are travels with them.

`lora_metadata` gives every file kohya's `ss_*` fields and the SAI model spec's `modelspec.*` set (what A1111's
and Forge's extra-networks pages, kohya's tools and model managers read: base model, rank, alpha, trigger),
plus boothkit's own training settings (`boothkit.training`).

`boothkit.prompt_encoding` (a JSON string) records how the LoRA's training embedded prompts: the family
name, `max_sequence_length` and `complex_human_instruction` (SANA's; SD records its text encoder's token
limit and `false`). Sampling embeds prompts the same way even when `train_config.json` is not beside the
file. diffusers' own keys (`format`, `lora_adapter_metadata`) are kept as they are, so
`pipe.load_lora_weights` reads the file unchanged. A LoRA written by another tool has no such key:
`read_prompt_encoding` returns None and the caller says what it assumes.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from boothkit.errors import BoothkitError, first_line

if TYPE_CHECKING:
    from boothkit.formats.models import BaseModel

PROMPT_ENCODING_KEY = "boothkit.prompt_encoding"
PROMPT_ENCODING_FIELDS = ("family", "max_sequence_length", "complex_human_instruction")


def _as_file(lora: str | os.PathLike) -> Path:
    """A LoRA file, or a LoRA folder (then its `pytorch_lora_weights.safetensors`)."""
    from boothkit.layout import lora_file

    return lora_file(lora)


def read_metadata(lora: str | os.PathLike) -> dict[str, str]:
    """The safetensors `__metadata__` of a LoRA file ({} when it has none)."""
    from safetensors import SafetensorError, safe_open

    path = _as_file(lora)
    try:
        with safe_open(str(path), framework="np") as handle:
            return dict(handle.metadata() or {})
    except (OSError, SafetensorError) as error:
        raise BoothkitError(f"cannot read LoRA file '{path}': {first_line(error)}") from None


def encode_prompt_encoding(settings: dict) -> dict[str, str]:
    """The metadata entry for `settings` (see the module doc); checks that every field is there."""
    missing = [name for name in PROMPT_ENCODING_FIELDS if name not in settings]
    if missing:
        raise ValueError(f"prompt-encoding settings lack {', '.join(missing)}")
    return {PROMPT_ENCODING_KEY: json.dumps(settings, sort_keys=True)}


def write_prompt_encoding(lora: str | os.PathLike, settings: dict) -> None:
    """Add (or replace) `boothkit.prompt_encoding` in an existing LoRA file, keeping its tensors and every
    other metadata key. The file is rewritten atomically (with umask permissions)."""
    from safetensors.torch import load_file, save_file

    from boothkit.io import atomic_path

    path = _as_file(lora)
    metadata = {**read_metadata(path), **encode_prompt_encoding(settings)}
    tensors = load_file(str(path))
    with atomic_path(path) as staging:
        save_file(tensors, str(staging), metadata=metadata)


def read_prompt_encoding(lora: str | os.PathLike) -> dict | None:
    """The prompt-encoding settings a LoRA file records, or None when it records none (another tool's LoRA,
    or one boothkit wrote before it recorded them)."""
    raw = read_metadata(lora).get(PROMPT_ENCODING_KEY)
    if raw is None:
        return None
    try:
        settings = json.loads(raw)
    except ValueError:
        settings = None
    if not isinstance(settings, dict) or any(name not in settings for name in PROMPT_ENCODING_FIELDS):
        raise BoothkitError(f"LoRA file '{_as_file(lora)}' has a damaged '{PROMPT_ENCODING_KEY}' entry")
    return settings


# The fields A1111/Forge's extra-networks pages, kohya's tools and model managers read ---------------------------
WRITTEN_BY_KEY = "boothkit.written_by"  # marks a file boothkit wrote (and may replace with --overwrite)
TRAINING_KEY = "boothkit.training"  # boothkit's training settings (JSON)
_PHOTO_OF = re.compile(r"^(?:an?\s+|the\s+)?(?:photo|picture|image|portrait)\s+of\s+(?:an?\s+|the\s+|my\s+)?",
                       re.IGNORECASE)


def trigger_phrase(instance_prompt: str) -> str:
    """The words that call the subject up: the instance prompt without a leading "a photo of (a)"
    ("a photo of sks dog" → "sks dog")."""
    return _PHOTO_OF.sub("", instance_prompt.strip()).strip() or instance_prompt.strip()


@dataclass
class LoraDescription:
    """What a LoRA file says about itself beyond its tensors."""

    base: "BaseModel"
    title: str
    trigger: str | None = None
    resolution: int | None = None
    training: dict | None = None  # boothkit's own training settings
    images: int | None = None  # instance photos (ss_tag_frequency's count)
    extra: dict[str, str] = field(default_factory=dict)  # kept as given (e.g. boothkit.prompt_encoding)


def lora_metadata(description: LoraDescription, rank: float, alpha: float) -> dict[str, str]:
    """kohya's `ss_*` fields, the SAI model spec's `modelspec.*` set and boothkit's own, as strings."""
    from boothkit import __version__

    base = description.base
    resolution = description.resolution or base.resolution
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": _number(rank), "ss_network_alpha": _number(alpha),
        "ss_base_model_version": base.ss_base_model_version, "ss_output_name": description.title,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": base.architecture,
        "modelspec.implementation": "diffusers" if base.family == "sana" else "https://github.com/Stability-AI/generative-models",
        "modelspec.title": description.title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        WRITTEN_BY_KEY: f"boothkit {__version__}",
    }
    if base.family == "sd":
        metadata.update(ss_v2=str(base.version.startswith("sd2")), ss_v_parameterization=str(base.version == "sd2-v"))
    if base.source:
        metadata["ss_sd_model_name"] = base.source
    if resolution:
        metadata.update({"ss_resolution": f"({resolution}, {resolution})", "modelspec.resolution": f"{resolution}x{resolution}"})
    if description.trigger:
        metadata["ss_tag_frequency"] = json.dumps({"instance": {description.trigger: description.images or 1}})
        metadata["modelspec.trigger_phrase"] = description.trigger
    if description.training is not None:
        metadata[TRAINING_KEY] = json.dumps(description.training, sort_keys=True)
    metadata.update(description.extra)
    return metadata


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def read_trigger(metadata: dict[str, str]) -> str | None:
    """A LoRA's trigger: `modelspec.trigger_phrase`, else the most frequent tag of `ss_tag_frequency`."""
    if metadata.get("modelspec.trigger_phrase"):
        return metadata["modelspec.trigger_phrase"]
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency") or "{}")
        counts = {tag: count for tags in frequencies.values() for tag, count in tags.items()}
    except (ValueError, AttributeError):
        return None
    return max(counts, key=counts.get) if counts else None


def written_by_boothkit(path: Path) -> bool:
    """Whether a file is a safetensors file boothkit wrote (a boothkit key in its metadata); False for anything
    else, unreadable files included."""
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() == ".ckpt":
        from boothkit.formats.single_file import ckpt_written_by_boothkit

        return ckpt_written_by_boothkit(path)
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError, ValueError):
        return False
    return WRITTEN_BY_KEY in metadata or PROMPT_ENCODING_KEY in metadata
