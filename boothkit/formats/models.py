"""Which base model a LoRA belongs to, read from the model's configs (never a fixed table).

`BaseModel` names a model version — SD 1.x, SD 2.x (512 or 768-v), SDXL or SANA — as the other tools do
(kohya's `ss_base_model_version`, the SAI model spec's `modelspec.architecture`), and carries the denoiser's
config, from which the kohya/LDM module names are derived (`boothkit.formats.ldm`). `model_modules` lists a
model's LoRA-able modules by building each component from its config on the meta device (no weights are read,
so a real SDXL costs a second), for reading kohya files whose names only the model's module tree can resolve.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from boothkit.errors import BoothkitError, first_line

# version: (label, ss_base_model_version, modelspec architecture, family)
_VERSIONS = {
    "sd1": ("SD 1.x", "sd_v1", "stable-diffusion-v1", "sd"),
    "sd2": ("SD 2.x", "sd_v2", "stable-diffusion-v2-512", "sd"),
    "sd2-v": ("SD 2.x (768-v)", "sd_v2", "stable-diffusion-v2-768-v", "sd"),
    "sdxl": ("SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "sdxl"),
    "sana": ("SANA", "sana", "sana", "sana"),
}
# Width of the text embeddings a UNet's cross-attention reads: the release models' tell-tale.
_CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
CLIP_TEXT_MODEL = "text_model."  # the level transformers >= 5.6 drops from CLIPTextModel's module paths


@dataclass(frozen=True)
class BaseModel:
    """A model version, the model it was read from (None when only guessed from a LoRA) and its denoiser config."""

    version: str
    source: str | None = None
    denoiser_config: dict = field(default_factory=dict, compare=False, hash=False)
    resolution: int | None = None

    @property
    def label(self) -> str:
        return _VERSIONS[self.version][0]

    @property
    def ss_base_model_version(self) -> str:
        return _VERSIONS[self.version][1]

    @property
    def architecture(self) -> str:
        """The SAI model spec architecture of a LoRA for this model, e.g. `stable-diffusion-v1/lora`."""
        return _VERSIONS[self.version][2] + "/lora"

    @property
    def family(self) -> str:
        return _VERSIONS[self.version][3]

    def describe(self) -> str:
        return f"{self.label} ('{self.source}')" if self.source else self.label

    def same_kind(self, other: "BaseModel") -> bool:
        """Whether a LoRA for one fits the other (SD 2.x 512 and 768-v share their layers)."""
        return self.family == other.family and self.version.split("-")[0] == other.version.split("-")[0]


def version_from_metadata(metadata: dict[str, str]) -> str | None:
    """The model version a LoRA's metadata names: `ss_base_model_version` (kohya: `sd_v1`, `sd_v2` with
    `ss_v_parameterization`, `sdxl_base_v1-0`), else `modelspec.architecture`; None when it names none."""
    ss = metadata.get("ss_base_model_version", "")
    if ss.startswith("sdxl"):
        return "sdxl"
    if ss.startswith("sd_v2"):
        return "sd2-v" if metadata.get("ss_v_parameterization", "").lower() == "true" else "sd2"
    if ss.startswith(("sd_v1", "sana")):
        return "sana" if ss.startswith("sana") else "sd1"
    architecture = metadata.get("modelspec.architecture", "").split("/")[0]
    return next((version for version, spec in _VERSIONS.items() if spec[2] == architecture), None)


def version_from_cross_attention(width: int) -> str | None:
    return _CROSS_ATTENTION_WIDTH.get(width)


def base_model(source: str, revision: str | None = None) -> BaseModel:
    """The version of the pipeline at `source` (hub id or folder), from `model_index.json` and its configs:
    SDXL and SANA by pipeline class; SD 2.x by its UNet's linear projections (OpenCLIP-H), 768-v by the
    scheduler's v-prediction."""
    from boothkit.families import family_class_for, read_model_index

    index = read_model_index(source, revision)
    family = family_class_for(index, source)
    config = component_config(source, family.denoiser_name, revision)
    scheduler = component_config(source, "scheduler", revision, "scheduler_config.json") if family.name == "sd" else {}
    return base_model_from_configs(family.name, source, config, scheduler.get("prediction_type"))


def base_model_from_configs(family: str, source: str | None, denoiser_config: dict,
                            prediction_type: str | None = None) -> BaseModel:
    """The `BaseModel` of a model of boothkit family `family` with this denoiser config (and, for SD, the
    scheduler's prediction type); also for a model already loaded (`family.base_model`)."""
    config = dict(denoiser_config)
    if family == "sd":
        version = "sd1" if not config.get("use_linear_projection") else "sd2-v" if prediction_type == "v_prediction" else "sd2"
    else:
        version = family
    sample_size = config.get("sample_size")
    factor = 32 if family == "sana" else 8
    return BaseModel(version, source, config, int(sample_size) * factor if isinstance(sample_size, int) else None)


def component_config(source: str, component: str, revision: str | None = None, name: str = "config.json") -> dict:
    from diffusers.configuration_utils import ConfigMixin

    class _Reader(ConfigMixin):
        config_name = name

    try:
        return dict(_Reader.load_config(source, subfolder=component, revision=revision))
    except Exception as error:  # missing files, hub errors
        raise BoothkitError(f"cannot read the {component} config of model '{source}': {first_line(error)}") from None


def model_modules(source: str, components: list[str], revision: str | None = None) -> dict[str, list[str]]:
    """{component: names of its Linear and Conv2d modules} for `components` of the pipeline at `source`, each
    built from its config on the meta device; CLIP text models' names always start with `text_model.`."""
    from accelerate import init_empty_weights

    from boothkit.families import read_model_index

    index = read_model_index(source, revision)
    modules = {}
    for component in components:
        spec = index.get(component)
        if not isinstance(spec, (list, tuple)) or None in spec:
            raise BoothkitError(f"model '{source}' has no {component}")
        library, class_name = spec
        model_class = getattr(importlib.import_module(library), class_name)
        with init_empty_weights():
            if library == "transformers":
                model = model_class._from_config(model_class.config_class.from_pretrained(
                    source, subfolder=component, revision=revision))
            else:
                model = model_class.from_config(component_config(source, component, revision))
        names = [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
        if class_name.startswith("CLIPText"):
            names = [name if name.startswith(CLIP_TEXT_MODEL) else CLIP_TEXT_MODEL + name for name in names]
        modules[component] = names
    return modules
