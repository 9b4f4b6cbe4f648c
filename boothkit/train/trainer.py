"""DreamBooth-LoRA training (Ruiz et al. 2022; LoRA: Hu et al. 2021) for any `ModelFamily`.

Loss per micro-batch: ‖ε_θ(x_t, c_inst) − target‖² + λ_prior·‖ε_θ(x'_t, c_class) − target'‖² (Ruiz et al. Eq. 2),
the target being ε, v or the flow as the family says. `--snr_gamma` weights the instance term per sample by
min-SNR-γ (`boothkit.train.losses`); the prior-preservation term stays unweighted. Frozen modules run
without gradients; latents and prompt embeddings are computed once when nothing can change them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from boothkit import seeding
from boothkit.data.images import load_image_folder, warn_small_images
from boothkit.errors import BoothkitError
from boothkit.families import FamilyOptions, ModelFamily, family_class_for, load_family, read_model_index, weights_dtype
from boothkit.families.base import Conditioning
from boothkit.layout import (BEST_DIR, LORA_WEIGHT_NAME, TRAIN_LOG_NAME, VALIDATION_PROMPTS_NAME, WEAK_DIR,
                             OutputFolder, check_output_folder, lora_file)
from boothkit.train import checkpoint as ckpt
from boothkit.train.class_images import concept_class_images
from boothkit.train.concepts import Concept, ConceptImages, RowPicker, concepts_of
from boothkit.train.config import TrainConfig
from boothkit.train import full
from boothkit.train.data import ImageOptions, LatentBank, SampleOrder, sample_positions
from boothkit.train.losses import min_snr_weights
from boothkit.train.lora import (attach_adapters, lora_targets, prompt_encoding_settings, save_lora,
                                 trainable_parameters, trainable_state, training_description)
from boothkit.train.pdm import captured_queries
from boothkit.train.regularizers import Regularizers, per_sample_loss, prepare_regularizers
from boothkit.train.optim import make_optimizer, parameter_groups, restore, text_encoder_lr
from boothkit.train.outputs import WEAK_LORA, TrainLog, claim_output_dir, resolved_settings, write_train_config
from boothkit.train import reporting, scoring
from boothkit.train.run_identity import check_same_run, run_identity
from boothkit.train.validation import (record_validation_prompts, save_validation_images, validation_folder,
                                       validation_image_names)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    lora_path: Path  # the LoRA file, or with --train_mode full the pipeline folder
    weak_path: Path | None
    final_loss: float
    is_main_process: bool
    train_mode: str = "lora"


@dataclass
class Run:
    """Everything the loop needs; built once by `_prepare`."""

    config: TrainConfig
    accelerator: Accelerator
    family: ModelFamily
    folder: OutputFolder | None  # the locked output folder (main process only: the others write nothing there)
    resolution: int
    denoiser: torch.nn.Module  # as prepared by accelerate (DDP-wrapped on several GPUs)
    trainable: dict[str, torch.nn.Module]
    parameters: list[torch.nn.Parameter]  # the trainable ones, listed once (walking the modules costs ms)
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    instance: LatentBank
    classes: LatentBank | None
    prompts: dict[tuple[str, int], Conditioning]  # cached embeddings by (instance|class, concept); empty when TE trains
    order: SampleOrder
    start_step: int
    identity: dict | None  # what each checkpoint records, and a resume must match (`run_identity`)
    images: ConceptImages  # the concepts, their photos and class images
    picker: RowPicker  # which photo each row of a batch uses
    ema: EMAModel | None = None  # --use_ema (full fine-tuning)
    regularizers: Regularizers | None = None  # PDMBooth's masks and PDM targets
    reporter: reporting.Reporter | None = None  # --report_to (main process only)
    scorer: scoring.Scorer | None = None  # --validation_every (main process only)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training; returns where the LoRA files are.

    Every process checks the output folder before any writes there; the main process then holds it (lock and
    manifest, `boothkit.layout`) for the whole run and is the only one that writes into it.
    """
    reporting.check_available(config.report_to)  # before the output folder is touched
    accelerator = _accelerator(config)
    resume_path = ckpt.resolve_resume(config.output_dir, config.resume_from_checkpoint)
    own_checkpoint = resume_path is not None and ckpt.is_own_checkpoint(config.output_dir, resume_path)
    output_dir = check_output_folder(config.output_dir, "train", overwrite=config.overwrite, reuse=own_checkpoint,
                                     hint=_output_dir_hint(config, resume_path))
    images = _check_inputs(config)
    main = accelerator.is_main_process
    metrics = scoring.load_metrics(config) if main else None  # a bad --dino_model fails before the folder is used
    accelerator.wait_for_everyone()
    with OutputFolder(output_dir, "train") if main else contextlib.nullcontext() as folder:
        run = _prepare(config, accelerator, folder, resume_path, images)
        if metrics is not None:
            run.scorer = scoring.Scorer(run.config, metrics, folder, images, run.start_step, accelerator.device)
        run.reporter = reporting.Reporter.start(config, accelerator, folder, run.start_step)
        try:
            loss = _train_steps(run)
            lora_path = lora_file(output_dir)
            full.release_optimizer_state(run.optimizer)
            if main:
                _save_model(run, weak=False)
                _validate(run, config.max_train_steps)
                if run.scorer is not None:
                    run.scorer.finish()
        finally:
            if run.reporter is not None:
                run.reporter.finish()
        accelerator.wait_for_everyone()
    if config.train_mode == "full":
        weak = output_dir / WEAK_DIR
        return TrainResult(output_dir, output_dir, weak if weak.exists() else None, loss, main, "full")
    weak = output_dir / WEAK_LORA
    return TrainResult(output_dir, lora_path, weak if weak.exists() else None, loss, main)


def _check_inputs(config: TrainConfig) -> ConceptImages:
    """What can be checked cheaply fails before the output folder is touched; returns the concepts and their
    instance photos."""
    concepts = concepts_of(config)
    several = len(concepts) > 1
    instance_files = [load_image_folder(c.instance_data_dir, f"instance data folder{f' of concept {k}' if several else ''}")
                      for k, c in enumerate(concepts)]
    family_class = family_class_for(read_model_index(config.pretrained_model_name_or_path, config.revision),
                                    config.pretrained_model_name_or_path)
    if config.snr_gamma is not None and not hasattr(family_class, "timestep_snr"):
        raise BoothkitError(f"--snr_gamma applies to DDPM models (SD); {family_class.name} trains with flow "
                            "matching: use --weighting_scheme")
    for concept in concepts if config.with_prior_preservation else ():
        class_dir = Path(concept.class_data_dir)
        if class_dir.exists() and not class_dir.is_dir():
            raise BoothkitError(f"class data folder '{class_dir}' is not a folder")
    return ConceptImages(concepts, instance_files)


def _output_dir_hint(config: TrainConfig, resume_path: Path | None) -> str:
    if resume_path is not None:
        return (f"checkpoint '{resume_path}' was not written by the run in this folder: resume it into a new or "
                "empty --output_dir, or pass --overwrite to remove the earlier run's files here first")
    if config.resume_from_checkpoint:
        return "it has no checkpoint to resume; pass --overwrite to start a new run there"
    return "pass --overwrite to replace its outputs or --resume_from_checkpoint latest to continue the run"


def _train_steps(run: Run) -> float:
    """The optimizer steps from the start (or resumed) step to the end; returns the last loss."""
    config, main = run.config, run.accelerator.is_main_process
    train_log = TrainLog(run.folder.path(TRAIN_LOG_NAME), keep_until_step=run.start_step) if main else None
    bar = tqdm(total=config.max_train_steps, initial=run.start_step, desc="training", unit="step", disable=not main)
    loss = float("nan")
    try:
        for step in range(run.start_step + 1, config.max_train_steps + 1):
            loss = _optimizer_step(run, step - 1)
            if not math.isfinite(loss):  # the same (reduced) value on every process: all stop here
                raise BoothkitError(f"training stopped at step {step}: the loss became {loss} (try a lower "
                                    "--learning_rate); nothing of this step or later was saved")
            lr = run.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if main:
                train_log.append(step, loss, lr)
                if run.reporter is not None:
                    run.reporter.log_step(step, loss, lr)
                _after_step(run, step)
    finally:
        bar.close()
        if train_log is not None:
            train_log.close()
    return loss


def _save_model(run: Run, weak: bool) -> None:
    """The LoRA (or with --train_mode full the pipeline folder; weak: the trained modules only) of this step."""
    if run.config.train_mode == "full":
        with full.averaged_weights(run.ema, run.parameters):
            if weak:
                full.save_trained_modules(run.folder, run.trainable, WEAK_DIR)
            else:
                full.save_full_pipeline(run.folder, run.config, run.family, run.trainable)
        return
    _save_lora(run, LORA_WEIGHT_NAME if not weak else lora_file(WEAK_DIR))


def _save_best(run: Run) -> None:
    """best/ (`--keep_best`): the LoRA of this step, or with --train_mode full a pipeline folder like the run's
    own (with `--use_ema`: the average), which `boothkit sample` and `evaluate` take as they take the run's."""
    if run.config.train_mode == "full":
        with full.averaged_weights(run.ema, run.parameters):
            full.save_best(run.folder, run.config, run.family, run.trainable)
        return
    _save_lora(run, lora_file(BEST_DIR))


def _save_lora(run: Run, name: str | Path) -> None:
    description = training_description(run.config, run.family, run.images.concepts, len(run.instance))
    save_lora(run.family, run.trainable, run.folder.path(name).parent, description)


def _after_step(run: Run, step: int) -> None:
    config = run.config
    if step == config.resolved_weak_step:
        _save_model(run, weak=True)
    if step % config.checkpointing_steps == 0 and step < config.max_train_steps:
        _save_checkpoint(run, step)
    if (step % config.validation_steps == 0 or run.scorer and run.scorer.due(step)) and step < config.max_train_steps:
        _validate(run, step)


def _validate(run: Run, step: int) -> None:
    """Validation images of every validation prompt of every concept (with `--use_ema`: of the average); with
    several prompts, `validation/prompts.json` says which folder shows which. A scored step (`--validation_every`)
    also scores them (without validation prompts: images of the instance prompt) and may keep best/."""
    scored = run.scorer is not None and run.scorer.due(step)
    validations = run.scorer.prompts if scored else run.images.validations()
    images = {}
    for validation in validations:
        concept, index, prompt = validation
        paths = run.folder.claim(*validation_image_names(step, run.config.num_validation_images, concept, index))
        with run.accelerator.autocast(), full.averaged_weights(run.ema, run.parameters):
            images[validation] = save_validation_images(run.family, prompt, run.config.seed, run.resolution, paths)
        if run.reporter is not None:
            run.reporter.log_validation(step, validation_folder(concept, index), prompt, paths)
    if len(validations) > 1:
        record_validation_prompts(run.folder.path(VALIDATION_PROMPTS_NAME), validations, step)
    if scored:
        run.scorer.record(step, images, lambda: _save_best(run), run.reporter)


def _save_checkpoint(run: Run, step: int) -> None:
    scaler = run.accelerator.scaler
    state = ckpt.Checkpoint(
        step=step, trainable=trainable_state(run.trainable), optimizer=run.optimizer.state_dict(),
        lr_scheduler=run.lr_scheduler.state_dict(), grad_scaler=scaler.state_dict() if scaler else None,
        info={"seed": run.config.seed, "max_train_steps": run.config.max_train_steps, "rank": run.config.rank,
              "optimizer": type(run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer).__name__,
              "run": run.identity},
        ema=full.ema_state(run.ema, full.parameter_names(run.trainable)) if run.ema is not None else None,
    )
    ckpt.save_checkpoint(run.folder, state, run.config.checkpoints_total_limit,
                         optimizer_in_latest_only=run.config.train_mode == "full")


# The step ------------------------------------------------------------------------------------------

def _optimizer_step(run: Run, step_index: int) -> float:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss."""
    config, accelerator = run.config, run.accelerator
    losses = []
    for micro in range(config.gradient_accumulation_steps):
        micro_step = step_index * config.gradient_accumulation_steps + micro
        last = micro == config.gradient_accumulation_steps - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(run.denoiser)
        with sync, accelerator.autocast():
            loss = _micro_batch_loss(run, micro_step)
        accelerator.backward(loss / config.gradient_accumulation_steps)
        losses.append(loss.detach())
    _average_text_encoder_gradients(run)
    accelerator.clip_grad_norm_(run.parameters, config.max_grad_norm)
    run.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # an fp16 overflow skips the update: keep the schedule
        run.lr_scheduler.step()
        if run.ema is not None:
            run.ema.step(run.parameters)
    run.optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()


def _micro_batch_loss(run: Run, micro_step: int) -> torch.Tensor:
    """Loss of one micro-batch. Each row's draws are keyed by its position, so splitting a batch into
    accumulation steps (or across processes) changes nothing but float rounding."""
    config, accelerator, family = run.config, run.accelerator, run.family
    positions = sample_positions(micro_step, accelerator.process_index, accelerator.num_processes,
                                 config.train_batch_size)
    picked = [run.picker.instance(run.order[p]) for p in positions]  # (instance image, concept) of each row
    rows = [(run.instance, 0, p, index, ("instance", k)) for p, (index, k) in zip(positions, picked)]
    if run.classes is not None:  # each prior row: a class image of its instance row's concept
        rows += [(run.classes, 1, p, run.picker.class_image(k, run.order[p]), ("class", k))
                 for p, (_, k) in zip(positions, picked)]
    drawn = [bank.draw(index, config.seed, p) for bank, _, p, index, _ in rows]
    latents = torch.cat([latent for latent, _ in drawn])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=seeding.generator(config.seed, "noise", stream, p))
                         for _, stream, p, _, _ in rows]).to(latents.device)
    timestep_generators = [seeding.generator(config.seed, "timesteps", stream, p) for _, stream, p, _, _ in rows]
    prompts = {key: _prompt(run, *key) for key in dict.fromkeys(key for *_, key in rows)}  # each encoded once
    conditioning = Conditioning.cat([prompts[key] for *_, key in rows])
    conditioning.tensors.update(family.image_conditioning([geometry for _, geometry in drawn], run.resolution,
                                                          latents.device))
    noisy, timesteps, target, weights = family.training_sample(latents, noise, timestep_generators)
    pdm_batch = _pdm_batch(run, positions, picked, latents.device) if config.use_pdm else None
    if pdm_batch is not None:  # PDMBooth's rows (one per instance row) join the batch: one UNet call for all
        noisy = torch.cat([noisy, pdm_batch.latents.to(noisy.dtype)])
        conditioning = Conditioning.cat([conditioning, pdm_batch.conditioning])
    hook = captured_queries(run.regularizers.query_module(family)) if pdm_batch else contextlib.nullcontext([])
    with hook as queries:
        every_timestep = torch.cat([timesteps, pdm_batch.timesteps]) if pdm_batch else timesteps
        prediction = family.predict(noisy, every_timestep, conditioning, denoiser=run.denoiser)[:len(rows)]
    per_sample = per_sample_loss(run.regularizers, prediction.float(), target.float(), len(positions),
                                 [(index, geometry) for (_, _, _, index, _), (_, geometry) in zip(rows, drawn)]) * weights
    if config.snr_gamma is not None:  # the instance rows come first; the prior loss stays unweighted
        snr_weights = torch.ones_like(per_sample)
        snr_weights[:len(positions)] = min_snr_weights(family.timestep_snr(timesteps[:len(positions)]),
                                                       config.snr_gamma, family.prediction_type)
        per_sample = per_sample * snr_weights
    instance_loss = per_sample[:len(positions)].mean() * (1.0 if config.use_inst_loss else 0.0)
    loss = instance_loss
    if run.classes is not None:
        loss = loss + config.prior_loss_weight * per_sample[len(positions):].mean()
    if pdm_batch is not None:  # PDMBooth's semantic term, over the last rows of the batch
        loss = loss + config.pdm_loss_weight * pdm_batch.distance(queries[0][len(rows):]).mean()
    return loss


def _pdm_batch(run: Run, positions: range, picked: list[tuple[int, int]], device: torch.device):
    """The PDM rows of a micro-batch, one per instance row (`regularizers.Regularizers.pdm_batch`)."""
    return run.regularizers.pdm_batch(run.family, [(index, k, p) for p, (index, k) in zip(positions, picked)],
                                      run.config.seed, lambda k: _prompt(run, "class", k), run.resolution, device)


def _prompt(run: Run, which: str, concept: int) -> Conditioning:
    if (which, concept) in run.prompts:
        return run.prompts[(which, concept)]
    text = run.images.concepts[concept].prompt(which)
    return run.family.encode_prompts([text], run.accelerator.device)  # with gradients into the text LoRA


def _average_text_encoder_gradients(run: Run) -> None:
    """The text encoders are not DDP-wrapped (the pipeline calls them directly): average their LoRA grads here."""
    if run.accelerator.num_processes == 1:
        return
    for name, module in run.trainable.items():
        if name == run.family.denoiser_name:
            continue
        for param in module.parameters():
            if param.requires_grad and param.grad is not None:
                param.grad = run.accelerator.reduce(param.grad, reduction="mean")


# Set-up ---------------------------------------------------------------------------------------------

def _prepare(config: TrainConfig, accelerator: Accelerator, folder: OutputFolder | None, resume_path: Path | None,
             images: ConceptImages) -> Run:
    resumed = ckpt.load_checkpoint(resume_path) if resume_path else None
    if resumed is not None:
        config = _with_the_runs_weak_step(config, resumed)
    weight_dtype = weights_dtype(accelerator.mixed_precision, accelerator.device)  # LoRA weights stay float32
    family = load_family(config.pretrained_model_name_or_path, config.revision, config.variant, weight_dtype,
                         FamilyOptions.from_config(config), vae=config.pretrained_vae_model_name_or_path)
    family.pipeline.to(accelerator.device)
    family.warn_about_training_precision(accelerator.mixed_precision)
    resolution = config.resolution or family.default_resolution
    if resolution % family.resolution_multiple:
        raise BoothkitError(f"--resolution {resolution} must be a multiple of {family.resolution_multiple} for "
                            f"{family.name} models")
    warn_small_images(images.all_instance_files, resolution)
    images.class_files = concept_class_images(config, family, accelerator, resolution, images.concepts)
    instance_files, class_files = images.all_instance_files, images.all_class_files
    targets = full.full_targets(config, family) if config.train_mode == "full" else lora_targets(config, family)
    identity = None
    if resumed is not None or (folder is not None and config.checkpointing_steps < config.max_train_steps):
        identity = run_identity(config, images, [path for path, _ in instance_files], [path for path, _ in class_files],
                                resolution, targets, prompt_encoding_settings(family))
    if resumed is not None:
        _check_resumable(resumed, identity, config.resume_from_checkpoint)
    start_step = resumed.step if resumed else 0
    _on_main_process(accelerator, lambda: claim_output_dir(config, family, folder, resumed, resume_path,
                                                            images.validations()))
    for module in family.frozen_modules():
        module.requires_grad_(False)
    options = ImageOptions(resolution, config.center_crop, config.random_flip, config.cache_latents)
    instance = LatentBank(family, [image for _, image in instance_files], options, "instance", stream=0)
    classes = LatentBank(family, [image for _, image in class_files], options, "class", stream=1) if class_files else None
    regularizers = prepare_regularizers(config, family, images, options, folder, accelerator.device)  # frozen model
    prompts = _cached_prompts(config, family, accelerator.device, images.concepts)
    if prompts and not images.validations() and accelerator.device.type == "cuda":
        # Nothing needs the text encoder any more (SANA's Gemma-2 is ~5 GB in bf16): free its GPU memory.
        for text_encoder in family.text_encoders:
            text_encoder.to("cpu")
        torch.cuda.empty_cache()
    if config.train_mode == "full":
        trainable = full.prepare_full(config, family, targets)
    else:
        trainable = attach_adapters(config, family, weight_dtype, targets)
    parameters = trainable_parameters(trainable)
    ema = full.make_ema(config, parameters)
    groups = parameter_groups(trainable, family.denoiser_name, config.learning_rate,
                              text_encoder_lr(config, family.default_text_encoder_lr))
    optimizer, lr_scheduler = make_optimizer(config, groups)
    if resumed is not None:
        restore(resumed, trainable, optimizer, lr_scheduler, accelerator)
        if ema is not None:
            full.load_ema_state(ema, full.parameter_names(trainable), resumed.ema)
        log.info("resuming from %s (step %d)", resume_path, resumed.step)
    denoiser, optimizer = accelerator.prepare(family.denoiser, optimizer)
    if folder is not None:
        write_train_config(folder, config, resolved_settings(config, family, resolution, accelerator))
    accelerator.wait_for_everyone()
    picker = RowPicker(images)
    dataset_length = max(len(picker.slots), len(classes) if classes else 0)
    return Run(config, accelerator, family, folder, resolution, denoiser, trainable, parameters, optimizer,
               lr_scheduler, instance, classes, prompts, SampleOrder(dataset_length, config.seed), start_step, identity,
               images, picker, ema, regularizers)


def _check_resumable(resumed: ckpt.Checkpoint, identity: dict, spec: str) -> None:
    recorded = resumed.info.get("run")
    if recorded is None:
        log.warning("checkpoint step %d records no run identity (an older boothkit wrote it): boothkit cannot "
                    "check that it comes from a run with these photos, prompts, model and seed", resumed.step)
    check_same_run(recorded, identity, spec)


def _with_the_runs_weak_step(config: TrainConfig, resumed: ckpt.Checkpoint) -> TrainConfig:
    """The weak LoRA belongs to the run: without --weak_checkpoint_step a resume keeps the step the run recorded
    (the default, 20% of --max_train_steps, would move with a longer schedule, leaving weak/ at the old step)."""
    recorded = (resumed.info.get("run") or {}).get("weak_checkpoint_step")
    if config.weak_checkpoint_step is not None or recorded is None:
        return config
    if resumed.step < recorded >= config.max_train_steps:
        raise BoothkitError(f"cannot resume: the run's weak checkpoint step ({recorded}) is not below "
                            f"--max_train_steps ({config.max_train_steps}); keep --max_train_steps above it")
    return config.model_copy(update={"weak_checkpoint_step": recorded})


def _on_main_process(accelerator: Accelerator, action) -> None:
    """Run `action` on the main process; a `BoothkitError` there stops every process with the same line (the
    others would otherwise wait forever at the next barrier)."""
    error = None
    if accelerator.is_main_process:
        try:
            action()
        except BoothkitError as raised:
            error = str(raised)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error], from_process=0)[0]
    if error is not None:
        raise BoothkitError(error)


def _accelerator(config: TrainConfig) -> Accelerator:
    """The flag wins; without it, `accelerate launch --mixed_precision` / the accelerate config decide."""
    # The precision lives in a process-wide singleton: reset it so that each run in a process sets its own
    # (the distributed part, PartialState, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    precision = config.mixed_precision
    if precision is None and not os.environ.get("ACCELERATE_MIXED_PRECISION") and torch.cuda.is_available():
        family = family_class_for(read_model_index(config.pretrained_model_name_or_path, config.revision),
                                  config.pretrained_model_name_or_path)
        precision = family.default_gpu_precision  # SANA: bf16 (fp16 gives NaNs)
    return Accelerator(mixed_precision=precision, log_with=reporting.log_with(config.report_to),
                       project_dir=str(Path(config.output_dir).expanduser()))


@torch.no_grad()
def _cached_prompts(config: TrainConfig, family: ModelFamily, device: torch.device,
                    concepts: list[Concept]) -> dict[tuple[str, int], Conditioning]:
    """Prompt embeddings never change while the text encoder is frozen: compute them once per concept."""
    if config.train_text_encoder:
        return {}
    kinds = ("instance", "class") if config.with_prior_preservation or config.use_pdm else ("instance",)
    return {(kind, k): family.encode_prompts([concept.prompt(kind)], device).detach()
            for k, concept in enumerate(concepts) for kind in kinds}
