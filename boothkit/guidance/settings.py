"""The sampler's settings as resolved (the user's flags, else the model family's defaults) and the file names of
generated images; shared by `sample` and `evaluate`.

`sampler_settings` takes a loaded `ModelFamily`, or the `FamilyDefaults` read from a model's configs without
loading any weights (what `evaluate` needs to key its cache on the settings as resolved before it decides
whether to load the model at all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from boothkit.errors import BoothkitError, first_line
from boothkit.guidance.config import SamplerOptions
from boothkit.guidance.sampler import SamplerSettings
from boothkit.guidance.schedulers import MODEL_SCHEDULER, model_scheduler_name


def slug(prompt: str, limit: int = 60) -> str:
    """`a sks dog, in the snow!` → `a_sks_dog_in_the_snow` (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:limit].rstrip("_") or "prompt"


def image_name(index: int, prompt: str) -> str:
    """`NNNN_<prompt-slug>.png`: the name of the index-th generated image."""
    return f"{index:04d}_{slug(prompt)}.png"


@dataclass(frozen=True)
class FamilyDefaults:
    """What resolving sampler settings needs from a model family (the attributes of a loaded `ModelFamily`
    of the same names)."""

    name: str
    default_resolution: int
    default_inference_steps: int
    default_scheduler: str
    default_guidance_scale: float
    resolution_multiple: int
    model_scheduler_class: str  # the class `model_index.json` names for the pipeline's scheduler


def resolve_scheduler(name: str, family) -> str:
    """`name` as the sampler reads it: `model` (`MODEL_SCHEDULER`) becomes the name of the model's own scheduler
    class (`model_scheduler_name`: e.g. `euler` for SDXL base); others stay as they are. `family`: a loaded
    `ModelFamily` (its pipeline's scheduler) or the `FamilyDefaults` read from its configs."""
    if name.lower() != MODEL_SCHEDULER:
        return name
    if isinstance(family, FamilyDefaults):
        return model_scheduler_name(family.model_scheduler_class)
    return model_scheduler_name(type(family.pipeline.scheduler).__name__)


def sampler_settings(family, options: SamplerOptions) -> SamplerSettings:
    """The sampler's settings: the user's flags, else the family's defaults (`family`: a `ModelFamily` or
    `FamilyDefaults`). Refuses a size the family's pipelines do not accept."""
    resolution = family.default_resolution
    settings = SamplerSettings(
        num_inference_steps=options.num_inference_steps or family.default_inference_steps,
        height=options.height or resolution, width=options.width or resolution,
        scheduler=resolve_scheduler(options.scheduler or family.default_scheduler, family),
        batch_size=options.batch_size,
    )
    if settings.height % family.resolution_multiple or settings.width % family.resolution_multiple:
        raise BoothkitError(f"--height and --width must be multiples of {family.resolution_multiple} for "
                            f"{family.name} models")
    return settings


def family_defaults(source: str, revision: str | None = None) -> FamilyDefaults:
    """The sampling defaults of the model at `source`, from its `model_index.json` (the family class) and its
    denoiser's and VAE's `config.json` (the default size: the denoiser's sample size in pixels, as
    `ModelFamily.default_resolution`), and the scheduler class the pipeline loads (`model_index.json`'s
    `scheduler`); no weights are read."""
    from diffusers.configuration_utils import ConfigMixin

    from boothkit.families import family_class_for, read_model_index

    index = read_model_index(source, revision)
    family = family_class_for(index, source)

    class ComponentConfig(ConfigMixin):
        config_name = "config.json"

    try:
        denoiser = ComponentConfig.load_config(source, subfolder=family.denoiser_name, revision=revision)
        vae = ComponentConfig.load_config(source, subfolder="vae", revision=revision)
        # The VAE downsamples once per block but the last (SD: block_out_channels; SANA's DC-AE: encoder_...).
        blocks = vae.get("block_out_channels") or vae["encoder_block_out_channels"]
        resolution = int(denoiser["sample_size"]) * 2 ** (len(blocks) - 1)
        scheduler_class_name = index["scheduler"][1]
    except Exception as error:  # missing or malformed component configs
        raise BoothkitError(f"cannot read the configs of model '{source}': {first_line(error)}") from None
    return FamilyDefaults(name=family.name, default_resolution=resolution,
                          default_inference_steps=family.default_inference_steps,
                          default_scheduler=family.default_scheduler,
                          default_guidance_scale=family.default_guidance_scale,
                          resolution_multiple=family.resolution_multiple,
                          model_scheduler_class=scheduler_class_name)
