"""One evaluation: a setting (λ, ω) for a subject, answered by the cache or sampled and scored.

The parts, one job each: `EvaluationKeys` (the content key), `CacheStore` (entries by key), `Models` (lazily
loaded pipeline, LoRAs and metric models), the sampler step (`Evaluator.sample`: images of every prompt) and
the scorer (`scoring.score_prompts`). A fully cached run therefore loads no model at all.
"""

from __future__ import annotations

from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.keys import EvaluationKeys
from boothkit.evaluate.models import Models
from boothkit.evaluate.results import Evaluation, Setting
from boothkit.evaluate.scoring import mean_scores, name_images, score_prompts
from boothkit.evaluate.store import CacheStore
from boothkit.evaluate.subjects import Subject
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GeneratedImage, GuidedSampler


class Evaluator:
    def __init__(self, config: EvaluateConfig, keys: EvaluationKeys, cache: CacheStore, models: Models):
        self.config = config
        self.keys = keys
        self.cache = cache
        self.models = models

    def evaluate(self, subject: Subject, setting: Setting) -> Evaluation:
        key = self.keys.key(subject, setting)
        cached = self.cache.load(subject.folder, key)
        if cached is not None:
            return cached
        generated = self.sample(subject, setting)
        evaluation = self.score(subject, setting, key, generated)
        self.cache.store(subject.folder, evaluation, {name: image.image for _, images in
                                                      name_images(subject.prompts, generated) for name, image in images})
        return evaluation

    def sample(self, subject: Subject, setting: Setting) -> list[GeneratedImage]:
        """`--num_images_per_prompt` images of each of the subject's prompts; image i of a prompt uses seed + i."""
        config = self.config
        guidance = make_guidance(config.method, setting.guidance_scale, config.cfg_scale,
                                 setting.omega if setting.omega is not None else 1.0, config.guidance_rescale)
        family, adapters, variants = self.models.family_for(subject, guidance)
        sampler = GuidedSampler(family, guidance, self.models.settings, adapters, variants)
        return sampler.generate(list(subject.prompts), config.negative_prompt, config.num_images_per_prompt,
                                config.seed)

    def score(self, subject: Subject, setting: Setting, key: str, generated: list[GeneratedImage]) -> Evaluation:
        config = self.config
        per_prompt = score_prompts(self.models.metrics, self.models.references(subject), subject.prompts, generated,
                                   subject.identifier, config.keep_identifier)
        settings = self.models.settings
        return Evaluation(setting=setting, key=key, scores=mean_scores(per_prompt), per_prompt=per_prompt,
                          sampler={"steps": settings.num_inference_steps, "scheduler": settings.scheduler,
                                   "height": settings.height, "width": settings.width})
