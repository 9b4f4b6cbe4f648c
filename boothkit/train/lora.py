"""LoRA adapters (Hu et al. 2021) on the family's modules, and LoRA files diffusers loads as they are."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from boothkit import seeding
from boothkit.errors import BoothkitError
from boothkit.families.base import ModelFamily
from boothkit.formats.metadata import encode_prompt_encoding
from boothkit.io import atomic_path
from boothkit.layout import LORA_WEIGHT_NAME, TMP_PREFIX, lora_file
from boothkit.train.config import TrainConfig


def attach_lora(module: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float, seed: int) -> None:
    """Freeze `module` and add a trainable LoRA: W + (α/r)·B·A with B = 0, so training starts at the base model."""
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # A's Gaussian initialisation draws from the global generator
        module.add_adapter(config)


def lora_targets(config: TrainConfig, family: ModelFamily) -> dict[str, tuple[str, ...]]:
    """The LoRA target layers of each trained module: {denoiser name: ..., [each text encoder: ...]} (SDXL:
    "text_encoder" and "text_encoder_2")."""
    targets = {family.denoiser_name: denoiser_targets(config, family)}
    if config.train_text_encoder:
        if not family.text_encoder_lora_targets:
            raise BoothkitError(f"--train_text_encoder is not supported for {family.name} models")
        targets.update({name: family.text_encoder_lora_targets for name in family.named_text_encoders})
    return targets


def attach_adapters(config: TrainConfig, family: ModelFamily, weight_dtype: torch.dtype,
                    targets: dict[str, tuple[str, ...]]) -> dict:
    """Freeze the trained modules and attach their LoRAs (each initialised from its own derived seed), with
    gradient checkpointing if asked; LoRA weights train in float32 whatever the frozen weights' dtype."""
    modules = {family.denoiser_name: family.denoiser, **family.named_text_encoders}
    trainable = {name: modules[name] for name in targets}
    for index, (name, module) in enumerate(trainable.items()):
        module.train()  # transformers' checkpointing layers only checkpoint in training mode (dropout is 0)
        attach_lora(module, targets[name], config.rank, config.resolved_lora_alpha,
                    seeding.derived_seed(config.seed, "lora_init", index))
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(module)
    if weight_dtype != torch.float32:
        cast_training_params(list(trainable.values()), dtype=torch.float32)  # LoRA weights train in fp32
    return trainable


def denoiser_targets(config: TrainConfig, family: ModelFamily) -> tuple[str, ...]:
    if not config.lora_layers:
        return family.denoiser_lora_targets
    targets = tuple(name.strip() for name in config.lora_layers.split(",") if name.strip())
    names = {name for name, _ in family.denoiser.named_modules()}
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown or not targets:
        raise BoothkitError(f"--lora_layers: no module of the {family.denoiser_name} is named {', '.join(unknown)}")
    return targets


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
        module.enable_gradient_checkpointing()
    elif hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
        module.activation_checkpointing_enable()
    else:
        module.gradient_checkpointing_enable()


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


def prompt_encoding_settings(family: ModelFamily) -> dict:
    """How `family` embeds prompts, for the LoRA file's metadata (`boothkit.formats.metadata`): SANA's
    `max_sequence_length` and complex human instruction as configured; otherwise the text encoder's token
    limit and no instruction."""
    length = getattr(family, "max_sequence_length", None)
    if length is None:
        length = getattr(getattr(family.pipeline, "tokenizer", None), "model_max_length", None)
    return {"family": family.name, "max_sequence_length": None if length is None else int(length),
            "complex_human_instruction": bool(getattr(family, "complex_human_instruction", None))}


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse (one line) to save tensors holding NaN or ±inf: such weights only ever produce black images."""
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise BoothkitError(f"will not save {what}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[0]}); "
                            "the training diverged (try a lower --learning_rate)")


def save_lora(family: ModelFamily, modules: dict[str, torch.nn.Module], directory: str | Path,
              prompt_encoding: dict | None = None) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` with diffusers' keys and metadata, plus
    `boothkit.prompt_encoding` (default: `prompt_encoding_settings(family)`), atomically and with umask
    permissions. Non-finite weights are refused before anything is written."""
    layers = {name: convert_state_dict_to_diffusers(get_peft_model_state_dict(module)) for name, module in modules.items()}
    layers = {name: {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}
              for name, state in layers.items()}
    check_finite({f"{name}.{key}": value for name, state in layers.items() for key, value in state.items()},
                 f"the LoRA in '{directory}'")
    metadata = {name: _adapter_metadata(module) for name, module in modules.items()}
    target = lora_file(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=TMP_PREFIX) as scratch:
        family.save_lora_weights(scratch, layers, metadata)  # diffusers' key names and metadata
        written = Path(scratch) / LORA_WEIGHT_NAME
        with safe_open(str(written), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            file_metadata = dict(handle.metadata() or {})
    file_metadata.update(encode_prompt_encoding(prompt_encoding or prompt_encoding_settings(family)))
    with atomic_path(target) as staging:
        save_file(tensors, str(staging), metadata=file_metadata)
    return target
