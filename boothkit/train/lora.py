"""LoRA adapters (Hu et al. 2021) on the family's modules, and LoRA files diffusers loads as they are."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from boothkit.families.base import ModelFamily

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def attach_lora(module: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float, seed: int) -> None:
    """Freeze `module` and add a trainable LoRA: W + (α/r)·B·A with B = 0, so training starts at the base model."""
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # A's Gaussian initialisation draws from the global generator
        module.add_adapter(config)


def trainable_parameters(modules: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for module in modules.values() for p in module.parameters() if p.requires_grad]


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every trainable tensor by `component.parameter` name, in float32 on the CPU (for checkpoints)."""
    return {
        f"{component}.{name}": param.detach().to("cpu", torch.float32).contiguous()
        for component, module in modules.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    expected = {name: tuple(value.shape) for name, value in trainable_state(modules).items()}
    if expected != {name: tuple(value.shape) for name, value in state.items()}:
        raise ValueError("the checkpoint's LoRA layout differs from this run's (--rank, --train_text_encoder "
                         "or the model changed)")
    with torch.no_grad():
        for component, module in modules.items():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    param.copy_(state[f"{component}.{name}"])


def _adapter_metadata(module: torch.nn.Module) -> dict:
    config = module.peft_config["default"].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def save_lora(family: ModelFamily, modules: dict[str, torch.nn.Module], directory: str | Path) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` atomically (saved aside, then renamed in place)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {name: convert_state_dict_to_diffusers(get_peft_model_state_dict(module)) for name, module in modules.items()}
    layers = {name: {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}
              for name, state in layers.items()}
    metadata = {name: _adapter_metadata(module) for name, module in modules.items()}
    with tempfile.TemporaryDirectory(dir=directory, prefix=".lora-") as staging:
        family.save_lora_weights(staging, layers, metadata)
        target = directory / LORA_WEIGHT_NAME
        os.replace(Path(staging) / LORA_WEIGHT_NAME, target)
    return target
