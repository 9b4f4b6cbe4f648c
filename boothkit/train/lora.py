"""LoRA adapters (Hu et al. 2021) on the family's modules, and LoRA files diffusers loads as they are."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from boothkit import seeding
from boothkit.errors import BoothkitError
from boothkit.families.base import ModelFamily
from boothkit.formats.lora import DIVERGED, Lora, LoraLayerWeights, canonical_name, diffusers_tensors, save_lora_file
from boothkit.formats.metadata import LoraDescription, encode_prompt_encoding, lora_metadata, trigger_phrase
from boothkit.layout import lora_file
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


def prompt_encoding_settings(family: ModelFamily) -> dict:
    """How `family` embeds prompts, for the LoRA file's metadata (`boothkit.formats.metadata`): SANA's
    `max_sequence_length` and complex human instruction as configured; otherwise the text encoder's token
    limit and no instruction."""
    length = getattr(family, "max_sequence_length", None)
    if length is None:
        length = getattr(getattr(family.pipeline, "tokenizer", None), "model_max_length", None)
    return {"family": family.name, "max_sequence_length": None if length is None else int(length),
            "complex_human_instruction": bool(getattr(family, "complex_human_instruction", None))}


def lora_layers_of(modules: dict[str, torch.nn.Module]) -> dict[str, LoraLayerWeights]:
    """The trained LoRA layers of `modules` ({component: module}), by `component.module`, in float32 on the CPU,
    each with its alpha (peft keeps α/r per layer in `scaling`)."""
    layers = {}
    for component, module in modules.items():
        for path, layer in module.named_modules():
            if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
                down = layer.lora_A["default"].weight.detach().to("cpu", torch.float32)
                up = layer.lora_B["default"].weight.detach().to("cpu", torch.float32)
                layers[canonical_name(component, path)] = LoraLayerWeights(
                    down, up, float(layer.scaling["default"]) * down.shape[0])
    return layers


def training_description(config: TrainConfig, family: ModelFamily, concepts: list, images: int | None = None
                         ) -> LoraDescription:
    """The metadata of a trained LoRA: trigger(s), base model, resolution and the training settings that made it
    (`concepts`: `boothkit.train.concepts.Concept`s; several give several triggers)."""
    prompts = [concept.instance_prompt for concept in concepts]
    settings = {"instance_prompt": prompts[0] if len(prompts) == 1 else prompts,
                "class_prompt": concepts[0].class_prompt if len(concepts) == 1 else [c.class_prompt for c in concepts],
                "base_model": config.pretrained_model_name_or_path, "family": family.name, "rank": config.rank,
                "lora_alpha": config.resolved_lora_alpha, "max_train_steps": config.max_train_steps,
                "learning_rate": config.learning_rate, "seed": config.seed,
                "train_text_encoder": config.train_text_encoder, "with_prior_preservation": config.with_prior_preservation,
                "resolution": config.resolution or family.default_resolution, "instance_images": images}
    if family.name == "sana":
        settings.update(max_sequence_length=config.max_sequence_length,
                        complex_human_instruction=config.complex_human_instruction)
    title = Path(config.output_dir).expanduser().resolve().name
    trigger = ", ".join(trigger_phrase(prompt) for prompt in prompts)
    return LoraDescription(family.base_model, title, trigger, settings["resolution"], settings, images)


def save_lora(family: ModelFamily, modules: dict[str, torch.nn.Module], directory: str | Path,
              description: LoraDescription, prompt_encoding: dict | None = None) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` in the diffusers layout (PEFT keys, adapter metadata
    peft 0.13+ reads) with `description`'s metadata (`formats.metadata.lora_metadata`) and
    `boothkit.prompt_encoding` (default: `prompt_encoding_settings(family)`), atomically and with umask
    permissions. Non-finite weights are refused before anything is written."""
    lora = Lora(lora_layers_of(modules))
    tensors, file_metadata = diffusers_tensors(lora.layers)
    file_metadata.update(lora_metadata(description, lora.most_common("rank"), lora.most_common("alpha")))
    file_metadata.update(encode_prompt_encoding(prompt_encoding or prompt_encoding_settings(family)))
    target = lora_file(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_lora_file(tensors, file_metadata, target, DIVERGED)
