"""`boothkit sample`: guided sampling of a personalized model (CFG, CFG + AutoGuidance, WIG)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from boothkit.errors import BoothkitError
from boothkit.families import ModelFamily, load_family, weights_dtype
from boothkit.guidance.adapters import text_options
from boothkit.guidance.config import SampleConfig, SamplerOptions
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GeneratedImage, GuidedSampler, SamplerSettings, load_guidance_adapters
from boothkit.io import guard_output_dir, save_image_atomic, write_json_atomic


def read_prompts(config: SampleConfig) -> list[str]:
    prompts = list(config.prompt)
    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            raise BoothkitError(f"prompts file '{path}' does not exist")
        text = path.read_text(encoding="utf-8")
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


def slug(prompt: str, limit: int = 60) -> str:
    """`a sks dog, in the snow!` → `a_sks_dog_in_the_snow` (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:limit].rstrip("_") or "prompt"


def image_name(index: int, prompt: str) -> str:
    return f"{index:04d}_{slug(prompt)}.png"


def sampler_settings(family: ModelFamily, options: SamplerOptions) -> SamplerSettings:
    """The sampler's settings for `sample` and `evaluate`: the user's flags, else the family's defaults."""
    resolution = family.default_resolution
    settings = SamplerSettings(
        num_inference_steps=options.num_inference_steps or family.default_inference_steps,
        height=options.height or resolution, width=options.width or resolution,
        scheduler=options.scheduler or family.default_scheduler, batch_size=options.batch_size,
    )
    if settings.height % family.resolution_multiple or settings.width % family.resolution_multiple:
        raise BoothkitError(f"--height and --width must be multiples of {family.resolution_multiple} for "
                            f"{family.name} models")
    return settings


def run_sample(config: SampleConfig) -> list[Path]:
    prompts = read_prompts(config)
    output_dir = guard_output_dir(config.output_dir, config.overwrite, "is not empty; pass --overwrite to write into it")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = weights_dtype(config.mixed_precision, device)
    family = load_family(config.pretrained_model_name_or_path, config.revision, config.variant, dtype)
    family.configure_text(*text_options(config, config.lora_dir))
    scale = config.guidance_scale if config.guidance_scale is not None else family.default_guidance_scale
    guidance = make_guidance(config.method, scale, config.cfg_scale, config.omega)  # λ = 0 is a valid scale
    adapters = load_guidance_adapters(family, config.lora_dir, config.weak_checkpoint_path, guidance)
    family.pipeline.to(device)
    settings = sampler_settings(family, config)
    images = GuidedSampler(family, guidance, settings, adapters).generate(
        prompts, config.negative_prompt, config.num_images_per_prompt, config.seed)
    return write_samples(output_dir, images, config, guidance, settings)


def write_samples(output_dir: Path, images: list[GeneratedImage], config: SampleConfig, guidance,
                  settings: SamplerSettings) -> list[Path]:
    """`NNNN_<prompt-slug>.png` for each image and `samples.json` describing how each was made."""
    weak = config.weak_checkpoint_path or (str(Path(config.lora_dir) / "weak") if config.lora_dir else None)
    records, paths = [], []
    for index, generated in enumerate(images):
        path = output_dir / image_name(index, generated.prompt)
        save_image_atomic(generated.image, path)
        paths.append(path)
        records.append({
            "file": path.name, "prompt": generated.prompt, "seed": generated.seed, "method": guidance.method,
            "guidance_scale": guidance.guidance_scale, "cfg_scale": guidance.cfg_scale, "omega": guidance.omega,
            "negative_prompt": config.negative_prompt, "steps": settings.num_inference_steps,
            "scheduler": settings.scheduler, "height": settings.height, "width": settings.width,
            "model": config.pretrained_model_name_or_path, "lora_dir": config.lora_dir,
            "weak_lora": weak if guidance.needs_weak else None,
        })
    write_json_atomic(output_dir / "samples.json", records)
    return paths
