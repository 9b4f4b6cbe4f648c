"""`boothkit sample`: guided sampling of a personalized model (CFG, CFG + AutoGuidance, WIG)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterable, Iterator

import torch

from boothkit.errors import BoothkitError
from boothkit.families import FamilyOptions, load_family, weights_dtype
from boothkit.guidance.adapters import existing_lora_file, text_options
from boothkit.guidance.config import SampleConfig
from boothkit.guidance.full_model import load_weight_variants
from boothkit.guidance.rules import default_guidance_scale, make_guidance
from boothkit.guidance.sampler import GeneratedImage, GuidedSampler, SamplerSettings, load_guidance_adapters
from boothkit.guidance.settings import image_name, sampler_settings
from boothkit.io import save_image_atomic, write_json_atomic
from boothkit.layout import SAMPLES_NAME, OutputFolder, check_output_folder, weak_dir


def read_prompts(config: SampleConfig) -> list[str]:
    prompts = list(config.prompt)
    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            raise BoothkitError(f"prompts file '{path}' does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise BoothkitError(f"prompts file '{path}' is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise BoothkitError(f"prompts file '{path}' is malformed JSON: {error}") from None
            if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
                raise BoothkitError(f"prompts file '{path}' must hold a JSON list of strings")
            prompts += data
        else:
            prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise BoothkitError("no prompts: the prompts file is empty")
    return prompts


def run_sample(config: SampleConfig, models: dict | None = None) -> list[Path]:
    """`boothkit sample`. `models`: a dict kept by a caller that samples again and again (`boothkit ui`): the
    loaded model and its LoRAs stay there, and are reused while only the rule, prompts or seeds change."""
    return list(iter_sample(config, models))


def iter_sample(config: SampleConfig, models: dict | None = None,
                stop: threading.Event | None = None) -> Iterator[Path]:
    """`run_sample`, yielding each image's path as soon as it (and the samples.json that lists it) is written.
    Once `stop` is set the image in progress is dropped and the run ends: the folder holds the images made so
    far and a samples.json that lists exactly them."""
    prompts = read_prompts(config)
    output_dir = check_output_folder(config.output_dir, "sample", overwrite=config.overwrite,
                                     hint="pass --overwrite to replace the images of the earlier run")
    with OutputFolder(output_dir, "sample") as folder:  # one writer per folder, from here on
        family, guidance, adapters, variants = _load(config, models)
        settings = sampler_settings(family, config)
        images = GuidedSampler(family, guidance, settings, adapters, variants).iterate(
            prompts, config.negative_prompt, config.num_images_per_prompt, config.seed, stop)
        folder.clear()  # an earlier run's images would disagree with the new samples.json
        names = [image_name(index, prompt) for index, prompt in
                 enumerate(p for p in prompts for _ in range(config.num_images_per_prompt))]
        folder.check_writable(*names, SAMPLES_NAME)  # a user's file in the way: refused before any sampling
        yield from write_samples(folder, images, config, guidance, settings)


def subject_and_extras(config: SampleConfig) -> tuple[tuple[str, float] | None, list[tuple[str, float]]]:
    """The subject LoRA (path, weight) guidance acts on and the other LoRAs, each checked to exist (one clear
    line before the model loads)."""
    stack = config.lora_stack()
    for path, _ in stack:
        existing_lora_file(path, "LoRA folder" if path == config.lora_dir else "--lora")
    return (stack[0] if stack else None), stack[1:]


# What a sample's settings may change without loading the model and its LoRAs again.
_NOT_LOADED = {"guidance_scale", "cfg_scale", "omega", "guidance_rescale", "prompt", "prompts_file", "negative_prompt",
               "num_inference_steps", "num_images_per_prompt", "seed", "height", "width", "scheduler", "batch_size",
               "output_dir", "overwrite"}


def _load(config: SampleConfig, models: dict | None = None):
    """The family on its device, the guidance rule, the LoRA adapters it needs and, for guidance on a fully
    fine-tuned model (no LoRA), its weak and interpolated weights (`guidance.full_model`); from `models` when
    what they were loaded for is unchanged."""
    key = json.dumps(config.model_dump(exclude=_NOT_LOADED), sort_keys=True, default=str)
    if models is not None and models.get("key") == key:
        family, adapters, variants = models["loaded"]
        return family, _rule(config, family), adapters, variants
    if models is not None:
        models.clear()  # the previous model goes before the next one loads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = weights_dtype(config.mixed_precision, device)
    subject, extras = subject_and_extras(config)
    subject_path, subject_weight = subject if subject else (None, 1.0)
    options = FamilyOptions.from_config(config).with_text(*text_options(config, subject_path))
    family = load_family(config.pretrained_model_name_or_path, config.revision, config.variant, dtype, options)
    guidance = _rule(config, family)
    full_model = subject_path is None and guidance.method in ("ag", "wig")
    variants = load_weight_variants(family, config.base_model, config.weak_checkpoint_path, guidance.method == "wig",
                                    guidance.needs_weak, config.revision) if full_model else None
    adapters = load_guidance_adapters(family, subject_path, config.weak_checkpoint_path, guidance,
                                      lora_weight=subject_weight, extras=extras, full_model=full_model)
    family.pipeline.to(device)
    if models is not None:
        models.update(key=key, loaded=(family, adapters, variants))
    return family, guidance, adapters, variants


def _rule(config: SampleConfig, family):
    scale = config.guidance_scale if config.guidance_scale is not None else \
        default_guidance_scale(config.method, family.default_guidance_scale)
    return make_guidance(config.method, scale, config.cfg_scale, config.omega,  # λ = 0 is a valid scale
                         config.guidance_rescale)


def write_samples(folder: OutputFolder, images: Iterable[GeneratedImage], config: SampleConfig, guidance,
                  settings: SamplerSettings) -> Iterator[Path]:
    """`NNNN_<prompt-slug>.png` for each image as soon as it is made, and `samples.json` describing how each
    was made, rewritten after every image: if the run stops, the folder and samples.json still agree. Yields
    each image's path once both are written."""
    loras = [{"path": path, "weight": weight} for path, weight in config.lora_stack()]  # the subject first
    own_weak = weak_dir(loras[0]["path"]) if loras else weak_dir(config.pretrained_model_name_or_path)
    weak = config.weak_checkpoint_path or str(own_weak)
    records = []
    for index, generated in enumerate(images):
        path = folder.path(image_name(index, generated.prompt))
        records.append({
            "file": path.name, "prompt": generated.prompt, "seed": generated.seed, "method": guidance.method,
            "guidance_scale": guidance.guidance_scale, "cfg_scale": guidance.cfg_scale, "omega": guidance.omega,
            "guidance_rescale": guidance.guidance_rescale, "negative_prompt": config.negative_prompt,
            "steps": settings.num_inference_steps,
            "scheduler": settings.scheduler, "height": settings.height, "width": settings.width,
            "model": config.pretrained_model_name_or_path, "lora_dir": config.lora_dir,
            "weak_lora": weak if guidance.needs_weak else None,
            "base_model": config.base_model if guidance.method == "wig" and not loras else None, "loras": loras,
        })
        save_image_atomic(generated.image, path, {"parameters": a1111_parameters(records[-1])})
        write_json_atomic(folder.path(SAMPLES_NAME), records)
        yield path


def a1111_parameters(record: dict) -> str:
    """The image's settings as AUTOMATIC1111 writes them in a PNG's `parameters` text (what A1111's "PNG Info",
    ComfyUI and image browsers read): the prompt, `Negative prompt: …`, then `Key: value` pairs (λ is the "CFG
    scale"; boothkit's own method, s and ω follow as extra keys). LoRAs appear as `<lora:name:weight>`."""
    prompt = record["prompt"] + "".join(f" <lora:{Path(lora['path']).stem}:{lora['weight']:g}>" for lora in record["loras"])
    pairs = {"Steps": record["steps"], "Sampler": record["scheduler"]}
    if record["guidance_scale"] is not None:
        pairs["CFG scale"] = f"{record['guidance_scale']:g}"
    pairs.update({"Seed": record["seed"], "Size": f"{record['width']}x{record['height']}",
                  "Model": Path(str(record["model"])).name, "Guidance": record["method"]})
    if record["method"] == "ag":
        pairs["AG CFG scale"] = f"{record['cfg_scale']:g}"
    if record["method"] == "wig":
        pairs["WIG omega"] = f"{record['omega']:g}"
    if record["guidance_rescale"]:
        pairs["CFG Rescale phi"] = f"{record['guidance_rescale']:g}"
    lines = [prompt]
    if record["negative_prompt"]:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items()))
    return "\n".join(lines)
