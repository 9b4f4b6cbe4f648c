"""Counter-based seeding: every random draw is keyed by (seed, purpose, indices).

Training draws its noise, timesteps, crops, flips and data order from generators keyed by the step, so a
run resumed at step N makes exactly the draws an uninterrupted run makes — no RNG state has to be saved.
Sampling follows the diffusers convention instead: image i starts from `Generator("cpu").manual_seed(seed+i)`.
"""

from __future__ import annotations

import hashlib

import torch

_PURPOSES = {"data": 1, "noise": 2, "timesteps": 3, "crop": 4, "flip": 5, "latents": 6, "lora_init": 7, "pdm": 8}


def derived_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed that depends on every argument; stable across processes and Python versions."""
    key = ",".join(str(part) for part in (seed, _PURPOSES[purpose], *indices))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, purpose: str, *indices: int) -> torch.Generator:
    """A CPU generator for one purpose at one position (draw on CPU, then move: same on every device)."""
    return torch.Generator("cpu").manual_seed(derived_seed(seed, purpose, *indices))


def image_generators(seed: int, count: int, start: int = 0) -> list[torch.Generator]:
    """One generator per image, `seed + i`, exactly as diffusers pipelines take a list of generators."""
    return [torch.Generator("cpu").manual_seed(seed + index) for index in range(start, start + count)]
