"""boothkit's entries in a LoRA file's own safetensors metadata, so that they travel with the file.

`boothkit.prompt_encoding` (a JSON string) records how the LoRA's training embedded prompts: the family
name, `max_sequence_length` and `complex_human_instruction` (SANA's; SD records its text encoder's token
limit and `false`). Sampling embeds prompts the same way even when `train_config.json` is not beside the
file. diffusers' own keys (`format`, `lora_adapter_metadata`) are kept as they are, so
`pipe.load_lora_weights` reads the file unchanged. A LoRA written by another tool has no such key:
`read_prompt_encoding` returns None and the caller says what it assumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from boothkit.errors import BoothkitError, first_line

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
