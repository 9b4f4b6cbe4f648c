"""Scoring one evaluation's images: per prompt, DINO / CLIP-I / CLIP-T means over the prompt's images and all
reference photos (`boothkit.evaluate.metrics`), and their means over prompts (Ruiz et al. 2022, DreamBooth §4.1).
"""

from __future__ import annotations

from boothkit.evaluate.metrics import ReferenceEmbeddings, SubjectMetrics
from boothkit.evaluate.results import METRICS, PromptScores
from boothkit.guidance.sampler import GeneratedImage
from boothkit.guidance.settings import image_name

SCORING_VERSION = 1
"""Version of the scoring code (metrics, preprocessing, aggregation). Part of every cache key: bump it whenever
a change makes the same images score differently, so that no cached score of the old code is reused."""


def name_images(prompts: tuple[str, ...] | list[str], generated: list[GeneratedImage]
                ) -> list[tuple[int, list[tuple[str, GeneratedImage]]]]:
    """Per prompt index, its images with their file names `NNNN_<prompt-slug>.png`, numbered prompt-major."""
    named, index = [], 0
    for prompt_index, prompt in enumerate(prompts):
        images = [image for image in generated if image.prompt_index == prompt_index]
        named.append((prompt_index, [(image_name(index + i, prompt), image) for i, image in enumerate(images)]))
        index += len(images)
    return named


def score_prompts(metrics: SubjectMetrics, references: ReferenceEmbeddings, prompts: tuple[str, ...] | list[str],
                  generated: list[GeneratedImage], identifier: str, keep_identifier: bool) -> list[PromptScores]:
    """One `PromptScores` per prompt (file names as `name_images` gives them)."""
    rows = []
    for prompt_index, images in name_images(prompts, generated):
        prompt = prompts[prompt_index]
        scores = metrics.score([image.image for _, image in images], prompt, references,
                               identifier=identifier, keep_identifier=keep_identifier)
        rows.append(PromptScores(prompt=prompt, seeds=[image.seed for _, image in images],
                                 files=[name for name, _ in images],
                                 scores={metric: scores.get(metric) for metric in METRICS}))
    return rows


def mean_scores(per_prompt: list[PromptScores]) -> dict[str, float | None]:
    """Each metric's mean over the prompts that have it (None when none has)."""
    means = {}
    for metric in METRICS:
        values = [row.scores[metric] for row in per_prompt if row.scores.get(metric) is not None]
        means[metric] = sum(values) / len(values) if values else None
    return means
