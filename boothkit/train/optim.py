"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW) with one learning rate for the denoiser's LoRA and one
for the text encoders' (`--text_encoder_lr`), its learning-rate schedule, and restoring both on resume."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from boothkit.errors import BoothkitError
from boothkit.train import checkpoint as ckpt
from boothkit.train.config import TrainConfig
from boothkit.train.lora import load_trainable_state


def text_encoder_lr(config: TrainConfig, family_default: float | None) -> float:
    """`--text_encoder_lr`, else the family's default (SDXL: 5e-6, as the diffusers SDXL example), else
    `--learning_rate` (as the diffusers SD example, which has one learning rate)."""
    if config.text_encoder_lr is not None:
        return config.text_encoder_lr
    return family_default if family_default is not None else config.learning_rate


def parameter_groups(trainable: dict[str, torch.nn.Module], denoiser_name: str, lr: float,
                     text_lr: float) -> list[dict]:
    """One group per trained module, in `trainable`'s order: the denoiser at `lr`, each text encoder at `text_lr`."""
    groups = []
    for name, module in trainable.items():
        params = [param for param in module.parameters() if param.requires_grad]
        groups.append({"params": params, "lr": lr if name == denoiser_name else text_lr})
    return groups


def make_optimizer(config: TrainConfig, groups: list[dict]) -> tuple[torch.optim.Optimizer, object]:
    optimizer_class, options = torch.optim.AdamW, {"fused": True}  # one kernel for all tensors (CPU and CUDA)
    if config.use_8bit_adam:
        if not torch.cuda.is_available():
            raise BoothkitError("--use_8bit_adam needs a GPU (bitsandbytes' 8-bit AdamW runs on CUDA): leave it out "
                                "on a CPU")
        try:
            import bitsandbytes
        except ImportError:
            raise BoothkitError("--use_8bit_adam needs bitsandbytes: pip install 'boothkit[bnb]'") from None
        optimizer_class, options = bitsandbytes.optim.AdamW8bit, {}
    optimizer = optimizer_class(
        groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, **options,
    )
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_train_steps)
    return optimizer, lr_scheduler


def restore(resumed: ckpt.Checkpoint, trainable: dict, optimizer, lr_scheduler, accelerator: Accelerator) -> None:
    """Load a checkpoint's LoRA weights, optimizer, schedule and grad-scaler states (one line when they do not fit)."""
    saved_optimizer = resumed.info.get("optimizer", type(optimizer).__name__)
    if saved_optimizer != type(optimizer).__name__:
        raise BoothkitError(f"cannot resume: the checkpoint was trained with {saved_optimizer}, this run uses "
                            f"{type(optimizer).__name__} (keep --use_8bit_adam as it was)")
    try:
        load_trainable_state(trainable, resumed.trainable)
        optimizer.load_state_dict(resumed.optimizer)
        lr_scheduler.load_state_dict(resumed.lr_scheduler)
    except (ValueError, KeyError, RuntimeError) as error:
        raise BoothkitError(f"cannot resume: {str(error).splitlines()[0]}") from None
    if resumed.grad_scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resumed.grad_scaler)
