"""Scheduler names for `--scheduler`: short names of the usual diffusers schedulers, a class name, or `model`: the
model's own scheduler class (what its pipeline samples with; SDXL's default)."""

from __future__ import annotations

import diffusers

from boothkit.errors import BoothkitError

SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm_single": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "flow_dpm": "DPMSolverMultistepScheduler",  # FlowDPM-Solver: DPM-Solver++ on flow sigmas (SANA)
}

MODEL_SCHEDULER = "model"
"""The name of the model's own scheduler class, resolved per model by `model_scheduler_name`."""


def model_scheduler_name(class_name: str) -> str:
    """The `--scheduler` name of the model's own scheduler class `class_name`: the first short name of that class
    in `SCHEDULERS` (`dpm` before `flow_dpm`: a plain name, configured from the model's config unchanged, which
    is the model's own scheduler), else the class name itself."""
    for name, known in SCHEDULERS.items():
        if known == class_name:
            return name
    scheduler_class(class_name)  # a class diffusers does not have: the usual one-line error
    return class_name


def scheduler_class(name: str) -> type:
    """`ddim` or `DDIMScheduler` → the diffusers class; a clear error for anything else."""
    class_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None) if class_name.endswith("Scheduler") else None
    if cls is None:
        raise BoothkitError(f"unknown scheduler '{name}'; choose from {', '.join(SCHEDULERS)}, a diffusers class name "
                           f"or {MODEL_SCHEDULER} (the model's own)")
    return cls


def make_scheduler(name: str, model_scheduler_config: dict, **overrides):
    """A fresh scheduler of `name` configured from the model's own scheduler config (betas, prediction type).

    Flow-matching schedulers take the model's time shift: SANA's config names it `flow_shift` (a DPM-Solver
    option), FlowMatchEulerDiscreteScheduler calls it `shift`; without the mapping `flow_euler` would sample a
    SANA model with shift 1.0 instead of its own (3.0 for the 1024 px models).
    """
    shift = model_scheduler_config.get("flow_shift") or model_scheduler_config.get("shift") or 1.0
    if name.lower() == "flow_dpm":
        overrides = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift, **overrides}
    elif scheduler_class(name).__name__ == "FlowMatchEulerDiscreteScheduler":
        overrides = {"shift": shift, **overrides}
    return scheduler_class(name).from_config(model_scheduler_config, **overrides)
