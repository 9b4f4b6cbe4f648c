"""The models an evaluation runs, loaded when first needed: a fully cached run loads none of them.

`Models` holds the base pipeline (once per run), the subject whose LoRAs are loaded into it (once per
subject, never inside a sampling loop), the metric models, and each subject's reference embeddings.
"""

from __future__ import annotations

from functools import cached_property

import torch

from boothkit.data.images import load_image_folder
from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.metrics import ReferenceEmbeddings, SubjectMetrics
from boothkit.evaluate.subjects import Subject
from boothkit.families import FamilyOptions, ModelFamily, load_family, weights_dtype
from boothkit.guidance.full_model import WeightVariants, load_weight_variants
from boothkit.guidance.rules import Guidance
from boothkit.guidance.sampler import SamplerSettings, load_guidance_adapters
from boothkit.guidance.settings import sampler_settings


class Models:
    def __init__(self, config: EvaluateConfig, device: torch.device, settings: SamplerSettings):
        self.config = config
        self.device = device
        self.settings = settings  # as resolved from the model's configs (the cache keys use them)
        self._subject: str | None = None
        self._family: ModelFamily | None = None  # the base family with the current subject's text options
        self.adapters: list[str] = []
        self._full_key: tuple[str, str] | None = None  # the fully fine-tuned subject loaded (folder, method)
        self._full: ModelFamily | None = None
        self._variants: WeightVariants | None = None  # its weak/interpolated weights
        self._references: dict[str, ReferenceEmbeddings] = {}

    @cached_property
    def base(self) -> ModelFamily:
        """The base pipeline on the device."""
        config = self.config
        family = load_family(config.pretrained_model_name_or_path, config.revision, config.variant,
                             weights_dtype(config.mixed_precision, self.device), FamilyOptions.from_config(config))
        family.pipeline.to(self.device)
        loaded = sampler_settings(family, config)
        if loaded != self.settings:  # the configs read without weights must describe the loaded model
            raise RuntimeError(f"sampler settings resolved from the configs ({self.settings}) differ from the "
                               f"loaded model's ({loaded})")
        return family

    @cached_property
    def metrics(self) -> SubjectMetrics:
        return SubjectMetrics(self.config.dino_model, self.config.clip_model, device=self.device)

    def family_for(self, subject: Subject, guidance: Guidance) -> tuple[ModelFamily, list[str], WeightVariants | None]:
        """The family with `subject`'s LoRAs loaded (fine, and weak when `guidance` needs it) and its prompts
        embedded as that LoRA was trained; the names of the active adapters; for a fully fine-tuned subject, its
        own pipeline and the weight variants the rule needs (`guidance.full_model`)."""
        if subject.full_model:
            return self._full_model(subject, guidance)
        if self._subject != subject.folder:
            base = self.base
            if self._subject is not None:
                base.pipeline.unload_lora_weights()
            weak = str(subject.weak) if subject.weak is not None else None
            self.adapters = load_guidance_adapters(base, str(subject.lora), weak, guidance)
            self._family = base.with_options(base.options.with_text(*subject.text))
            self._subject = subject.folder
        return self._family, self.adapters, None

    def _full_model(self, subject: Subject, guidance: Guidance):
        key = (subject.folder, guidance.method)
        if self._full_key != key:
            config = self.config
            family = load_family(str(subject.lora), None, None, weights_dtype(config.mixed_precision, self.device),
                                 FamilyOptions.from_config(config))
            variants = load_weight_variants(family, config.pretrained_model_name_or_path,
                                            str(subject.weak) if subject.weak else None, guidance.method == "wig",
                                            guidance.needs_weak, config.revision) \
                if guidance.method in ("wig", "ag") else None
            family.pipeline.to(self.device)
            self._full, self._variants, self._full_key = family, variants, key
        return self._full, [], self._variants

    def references(self, subject: Subject) -> ReferenceEmbeddings:
        """The subject's reference photos, embedded once."""
        if subject.folder not in self._references:
            entry = subject.entry  # the files of `subject.references` (an unreadable one skipped, with a warning)
            images = [image for _, image in load_image_folder(entry.images_dir, f"subject folder '{entry.folder}'")]
            self._references[subject.folder] = self.metrics.references(images)
        return self._references[subject.folder]
