"""One evaluation: a setting (λ, ω) for a subject, answered by the cache or sampled and scored.

The parts, one job each: `EvaluationKeys` (the content key), `CacheStore` (entries by key), `Models` (lazily
loaded pipeline, LoRAs and metric models), the sampler step (`Evaluator.sample`: images of every prompt), the
scorer (`scoring.score_prompts`) and, with `--class_prompt_samples`, PRES (`Evaluator.preservation`: class-prompt
samples of the same personalized model and setting). A fully cached run therefore loads no model at all.
"""

from __future__ import annotations

from PIL import Image

from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.keys import EvaluationKeys
from boothkit.evaluate.models import Models
from boothkit.evaluate.results import Evaluation, Setting
from boothkit.evaluate.scoring import (CLASS_PREFIX, class_prompts, mean_scores, name_images,
                                       score_class_samples, score_prompts)
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
        images = {name: image.image for _, images in name_images(subject.prompts, generated) for name, image in images}
        if self.config.class_prompt_samples:
            images.update(self.preservation(subject, setting, evaluation))
        self.cache.store(subject.folder, evaluation, images)
        return evaluation

    def sampler(self, subject: Subject, setting: Setting) -> GuidedSampler:
        """The personalized model (the subject's LoRAs, or its fully fine-tuned weights) guided as `setting` says."""
        config = self.config
        guidance = make_guidance(config.method, setting.guidance_scale, config.cfg_scale,
                                 setting.omega if setting.omega is not None else 1.0, config.guidance_rescale)
        family, adapters, variants = self.models.family_for(subject, guidance)
        return GuidedSampler(family, guidance, self.models.settings, adapters, variants)

    def sample(self, subject: Subject, setting: Setting) -> list[GeneratedImage]:
        """`--num_images_per_prompt` images of each of the subject's prompts; image i of a prompt uses seed + i."""
        config = self.config
        return self.sampler(subject, setting).generate(list(subject.prompts), config.negative_prompt,
                                                       config.num_images_per_prompt, config.seed)

    def score(self, subject: Subject, setting: Setting, key: str, generated: list[GeneratedImage]) -> Evaluation:
        config = self.config
        per_prompt = score_prompts(self.models.metrics, self.models.references(subject), subject.prompts, generated,
                                   subject.identifier, config.keep_identifier)
        settings = self.models.settings
        return Evaluation(setting=setting, key=key, scores=mean_scores(per_prompt), per_prompt=per_prompt,
                          sampler={"steps": settings.num_inference_steps, "scheduler": settings.scheduler,
                                   "height": settings.height, "width": settings.width})

    def preservation(self, subject: Subject, setting: Setting, evaluation: Evaluation) -> dict[str, Image.Image]:
        """PRES: `--class_prompt_samples` images of each class prompt (the prompt without the identifier) from the
        personalized model at `setting`, the same seeds as the prompts' images, in a sampling call of their own
        (the prompts' images do not depend on it). Fills `evaluation`'s PRES and class samples; returns the
        images by file name."""
        prompts = class_prompts(subject.prompts, subject.identifier)
        generated = self.sampler(subject, setting).generate(prompts, self.config.negative_prompt,
                                                            self.config.class_prompt_samples, self.config.seed)
        rows, pres = score_class_samples(self.models.metrics, self.models.references(subject), prompts, generated)
        evaluation.class_samples, evaluation.scores["PRES"] = rows, pres
        return {name: image.image for _, images in name_images(prompts, generated, CLASS_PREFIX)
                for name, image in images}
