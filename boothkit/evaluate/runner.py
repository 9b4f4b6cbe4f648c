"""`boothkit evaluate`: every subject × prompt, scored with DINO / CLIP-I / CLIP-T, λ (and ω) tuned for DINO.

Each evaluation (subject, method, λ, ω and every setting that changes images) is cached under
`output_dir/cache/<folder>/<key>/` (images + scores.json, written atomically), so a re-run generates
nothing and an interrupted run resumes. Models are loaded only when an evaluation is not cached: a fully
cached re-run runs no model at all. Under `accelerate launch`, subjects are split across processes and the
main process merges their results.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from boothkit.data.images import load_image_folder
from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.dataset import SubjectEntry, load_evaluation_prompts
from boothkit.evaluate.metrics import SubjectMetrics
from boothkit.families import family_class_for, load_family, read_model_index, weights_dtype
from boothkit.guidance.adapters import text_options
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GuidedSampler, load_guidance_adapters
from boothkit.io import atomic_path
from boothkit.sample import image_name, sampler_settings

log = logging.getLogger(__name__)
METRICS = ("DINO", "CLIP-I", "CLIP-T")


@dataclass(frozen=True)
class Setting:
    """One point of a search: λ, and ω for WIG."""

    guidance_scale: float
    omega: float | None = None


@dataclass
class Evaluation:
    setting: Setting
    key: str
    scores: dict[str, float]
    per_prompt: list[dict]
    images: list[str]  # file names in the cache folder, in prompt-major order
    sampler: dict = field(default_factory=dict)


class Evaluator:
    """Evaluates settings for subjects, with a cache and lazily loaded models."""

    def __init__(self, config: EvaluateConfig, device: torch.device):
        self.config = config
        self.device = device
        self.family_class = family_class_for(read_model_index(config.pretrained_model_path, config.revision),
                                             config.pretrained_model_path)
        self.prompts = load_evaluation_prompts(config.evaluation_prompts_path)
        self._loaded_subject: str | None = None
        self._references: dict[str, object] = {}

    @cached_property
    def family(self):
        dtype = weights_dtype(self.config.mixed_precision, self.device)
        family = load_family(self.config.pretrained_model_path, self.config.revision, self.config.variant, dtype)
        family.pipeline.to(self.device)
        return family

    @cached_property
    def metrics(self) -> SubjectMetrics:
        return SubjectMetrics(self.config.dino_model, self.config.clip_model, device=self.device)

    def prompts_for(self, entry: SubjectEntry) -> list[str]:
        prompts = self.prompts.prompts_for(entry.subject, self.config.identifier)
        return prompts[: self.config.max_prompts] if self.config.max_prompts else prompts

    def default_guidance_scale(self) -> float:
        return self.config.guidance_scale if self.config.guidance_scale is not None else \
            self.family_class.default_guidance_scale

    def evaluate(self, entry: SubjectEntry, setting: Setting) -> Evaluation:
        key = self.cache_key(entry, setting)
        folder = self.cache_dir(entry.folder) / key
        if (folder / "scores.json").is_file():
            return Evaluation(setting=setting, **json.loads((folder / "scores.json").read_text()))
        evaluation, images = self._run(entry, setting, key)
        with atomic_path(folder) as staging:
            staging.mkdir()
            for name, image in images:
                image.save(staging / name)
            record = {k: v for k, v in asdict(evaluation).items() if k != "setting"}
            (staging / "scores.json").write_text(json.dumps(record, indent=2))
        return evaluation

    def cache_dir(self, folder: str) -> Path:
        return Path(self.config.output_dir) / "cache" / folder

    def cache_key(self, entry: SubjectEntry, setting: Setting) -> str:
        """Everything that changes the images or the scores of one evaluation."""
        config = self.config
        lora_files = sorted(p for p in entry.lora_dir.rglob("*.safetensors"))
        identity = {
            "model": config.pretrained_model_path, "revision": config.revision, "variant": config.variant,
            "lora": [(str(p.relative_to(entry.lora_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in lora_files],
            "references": sorted((p.name, p.stat().st_size) for p in entry.images_dir.iterdir() if p.is_file()),
            "method": config.method, "guidance_scale": repr(float(setting.guidance_scale)),
            "omega": None if setting.omega is None else repr(float(setting.omega)),
            "cfg_scale": config.cfg_scale if config.method == "ag" else None,
            "prompts": self.prompts_for(entry), "images_per_prompt": config.num_images_per_prompt,
            "seed": config.seed, "steps": config.num_inference_steps, "scheduler": config.scheduler,
            "size": (config.height, config.width), "negative": config.negative_prompt,
            "precision": config.mixed_precision, "dino": config.dino_model, "clip": config.clip_model,
            "identifier": config.identifier, "keep_identifier": config.keep_identifier,
            "text": text_options(config, entry.lora_dir),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def _subject_ready(self, entry: SubjectEntry) -> None:
        """Load this subject's adapters (once per subject; never inside a sampling loop)."""
        if self._loaded_subject == entry.folder:
            return
        if self._loaded_subject is not None:
            self.family.pipeline.unload_lora_weights()
        guidance = make_guidance(self.config.method, 1.0, self.config.cfg_scale, 1.0)
        self.adapters = load_guidance_adapters(self.family, str(entry.lora_dir), None, guidance)
        self.family.configure_text(*text_options(self.config, entry.lora_dir))  # as this LoRA was trained
        self._loaded_subject = entry.folder

    def _references_for(self, entry: SubjectEntry):
        if entry.folder not in self._references:
            images = [image for _, image in load_image_folder(entry.images_dir, f"subject folder '{entry.folder}'")]
            self._references[entry.folder] = self.metrics.references(images)
        return self._references[entry.folder]

    def _run(self, entry: SubjectEntry, setting: Setting, key: str) -> tuple[Evaluation, list]:
        config = self.config
        self._subject_ready(entry)
        references = self._references_for(entry)
        family = self.family
        guidance = make_guidance(config.method, setting.guidance_scale, config.cfg_scale,
                                 setting.omega if setting.omega is not None else 1.0)
        settings = sampler_settings(family, config)
        prompts = self.prompts_for(entry)
        generated = GuidedSampler(family, guidance, settings, self.adapters).generate(
            prompts, config.negative_prompt, config.num_images_per_prompt, config.seed)
        return _score(self, entry, setting, key, prompts, generated, references, settings)


def _score(evaluator: Evaluator, entry, setting, key, prompts, generated, references, settings
           ) -> tuple[Evaluation, list]:
    """Per-prompt scores (means over the prompt's images and all references) and their subject means."""
    config = evaluator.config
    per_prompt, names, data = [], [], []
    for prompt_index, prompt in enumerate(prompts):
        images = [g for g in generated if g.prompt_index == prompt_index]
        scores = evaluator.metrics.score([g.image for g in images], prompt, references,
                                         identifier=config.identifier, keep_identifier=config.keep_identifier)
        files = [image_name(len(names) + i, prompt) for i in range(len(images))]
        names += files
        data += [(name, g.image) for name, g in zip(files, images)]
        per_prompt.append({"prompt": prompt, "seeds": [g.seed for g in images], "files": files,
                           **{metric: scores.get(metric) for metric in METRICS}})
    means = {metric: _mean([row[metric] for row in per_prompt]) for metric in METRICS}
    sampler = {"steps": settings.num_inference_steps, "scheduler": settings.scheduler,
               "height": settings.height, "width": settings.width}
    return Evaluation(setting, key, means, per_prompt, names, sampler), data


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
