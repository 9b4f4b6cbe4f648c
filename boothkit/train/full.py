"""Full DreamBooth fine-tuning (`--train_mode full`, Ruiz et al. 2022): every weight of the denoiser (and, with
`--train_text_encoder`, of the text encoders) trains, in float32 master weights whatever the frozen modules'
dtype (mixed precision computes in fp16/bf16 under autocast, as the diffusers DreamBooth example).

What the run writes: the output folder is a diffusers pipeline (`DiffusionPipeline.from_pretrained` loads it):
the trained modules as trained (or their EMA average with `--use_ema`), every other component as the base
model stores it (loaded afresh from the base, so a run in fp16 does not round the VAE). `weak/` holds only the
trained modules at the weak step (`weak/unet/`, `weak/text_encoder/`), not a second copy of the VAE and tokenizer.
`best/` (`--keep_best`) is a pipeline folder like the output folder, so that it samples and evaluates as the run's
model does: its untrained components are written with the first best, each later best rewrites only the trained
modules.

EMA (`--use_ema`): θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step, with diffusers' `EMAModel` (its
warm-up: d_t = min(decay, (1 + t)/(10 + t))); its state is part of every checkpoint, so a resume is exact.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from boothkit.families.base import ModelFamily
from boothkit.layout import BEST_DIR, TMP_PREFIX, OutputFolder, WEAK_DIR
from boothkit.train.config import TrainConfig
from boothkit.train.lora import enable_gradient_checkpointing


def full_targets(config: TrainConfig, family: ModelFamily) -> dict[str, tuple[str, ...]]:
    """The trained modules of a full run ({name: ()}: every weight of each)."""
    targets = {family.denoiser_name: ()}
    if config.train_text_encoder:
        targets.update({name: () for name in family.named_text_encoders})
    return targets


def prepare_full(config: TrainConfig, family: ModelFamily, targets: dict[str, tuple[str, ...]]
                 ) -> dict[str, torch.nn.Module]:
    """Make the target modules trainable in float32 (the master weights), with gradient checkpointing if asked."""
    modules = {family.denoiser_name: family.denoiser, **family.named_text_encoders}
    trainable = {name: modules[name] for name in targets}
    for module in trainable.values():
        torch.nn.Module.to(module, torch.float32)  # (diffusers' own `to` warns about keep-in-fp32 modules)
        module.requires_grad_(True)
        module.train()
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(module)
    return trainable


def make_ema(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> EMAModel | None:
    return EMAModel(parameters, decay=config.ema_decay) if config.use_ema else None


def parameter_names(trainable: dict[str, torch.nn.Module]) -> list[str]:
    """`component.parameter` of each trained parameter, in the order of `trainable_parameters` (and EMA's)."""
    return [f"{component}.{name}" for component, module in trainable.items()
            for name, param in module.named_parameters() if param.requires_grad]


def ema_state(ema: EMAModel, names: list[str]) -> dict[str, torch.Tensor]:
    """The EMA's state as named tensors (for a checkpoint's safetensors): each average under its parameter's
    name, and the number of updates (which sets the warm-up decay)."""
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous()
             for name, tensor in zip(names, ema.shadow_params, strict=True)}
    state["optimization_step"] = torch.tensor(ema.optimization_step, dtype=torch.int64)
    return state


def load_ema_state(ema: EMAModel, names: list[str], state: dict[str, torch.Tensor] | None) -> None:
    from boothkit.errors import BoothkitError

    if state is None or any(name not in state for name in names):
        raise BoothkitError("cannot resume with --use_ema: the checkpoint holds no matching EMA state")
    for target, name in zip(ema.shadow_params, names, strict=True):
        target.data.copy_(state[name].to(target.device, target.dtype))
    ema.optimization_step = int(state["optimization_step"])


@contextlib.contextmanager
def averaged_weights(ema: EMAModel | None, parameters: list[torch.nn.Parameter]):
    """Within the block the trained parameters hold the EMA average (then their own values again)."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def save_trained_modules(folder: OutputFolder, trainable: dict[str, torch.nn.Module], prefix: str) -> None:
    """`prefix/<module name>/` for each trained module (`save_pretrained`, safetensors), e.g. `weak/unet/`."""
    for name, module in trainable.items():
        with tempfile.TemporaryDirectory(dir=folder.root, prefix=TMP_PREFIX) as staging:
            module.save_pretrained(staging, safe_serialization=True)
            folder.adopt(Path(staging), f"{prefix}/{name}" if prefix else name)


def save_full_pipeline(folder: OutputFolder, config: TrainConfig, family: ModelFamily,
                       trainable: dict[str, torch.nn.Module], prefix: str = "") -> None:
    """The output folder (or its folder `prefix`, e.g. `best`) as a diffusers pipeline: the trained modules, and
    the other components as the base model stores them — the ones in memory when they are float32 (exact
    whatever the stored dtype), a frozen module held in fp16/bf16 for the run loaded again from its source (no
    second copy of the rest)."""
    pipeline = family.pipeline
    held = {}
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and name not in trainable and \
                any(p.dtype != torch.float32 for p in component.parameters()):
            held[name] = component
            pipeline.register_modules(**{name: _stored_component(config, name, component)})
    try:
        with tempfile.TemporaryDirectory(dir=folder.root, prefix=TMP_PREFIX) as staging:
            pipeline.save_pretrained(staging, safe_serialization=True)
            folder.adopt(Path(staging), prefix)
    finally:
        pipeline.register_modules(**held)


def _stored_component(config: TrainConfig, name: str, component: torch.nn.Module) -> torch.nn.Module:
    if name == "vae" and config.pretrained_vae_model_name_or_path:
        from boothkit.families import load_vae

        return load_vae(config.pretrained_vae_model_name_or_path)
    return type(component).from_pretrained(config.pretrained_model_name_or_path, subfolder=name,
                                           revision=config.revision, variant=config.variant)


def release_optimizer_state(optimizer) -> None:
    """The optimizer's moments (twice the trained weights) are not needed once training ends: free them before
    the final save, which is the run's memory peak otherwise."""
    getattr(optimizer, "optimizer", optimizer).state.clear()


def save_best(folder: OutputFolder, config: TrainConfig, family: ModelFamily,
              trainable: dict[str, torch.nn.Module]) -> None:
    """`best/` as a pipeline folder (`--keep_best`): whole the first time, then only the trained modules (the
    other components are the base model's and do not change)."""
    if folder.owns(f"{BEST_DIR}/model_index.json"):
        save_trained_modules(folder, trainable, BEST_DIR)
    else:
        save_full_pipeline(folder, config, family, trainable, BEST_DIR)


def pipeline_parts(config: TrainConfig, family: ModelFamily) -> list[str]:
    """The names a full run's models occupy in the output folder (for refusing a user's files up front)."""
    index_components = [name for name, spec in family.pipeline.config.items()
                        if not name.startswith("_") and isinstance(spec, (list, tuple)) and None not in spec]
    return ["model_index.json", *index_components, WEAK_DIR, *([BEST_DIR] if config.keep_best else [])]
