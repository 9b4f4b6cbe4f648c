"""Scoring one evaluation's images: per prompt, DINO / CLIP-I / CLIP-T means over the prompt's images and all
reference photos and DINO-D / CLIP-D over the pairs of the prompt's images (`boothkit.evaluate.metrics`), and
their means over prompts (Ruiz et al. 2022, DreamBooth §4.1); PRES over the class-prompt samples (§4.3).
"""

from __future__ import annotations

from boothkit.evaluate.metrics import ReferenceEmbeddings, SubjectMetrics, mean_cosine, strip_identifier
from boothkit.evaluate.results import METRICS, PROMPT_METRICS, PromptScores
from boothkit.guidance.sampler import GeneratedImage
from boothkit.guidance.settings import image_name

SCORING_VERSION = 2
"""Version of the scoring code (metrics, preprocessing, aggregation). Part of every cache key: bump it whenever
a change makes the same images score differently, so that no cached score of the old code is reused.
2: DINO-D, CLIP-D and PRES added (entries of version 1 lack them)."""

CLASS_PREFIX = "class_"
"""File names of class-prompt samples: `class_NNNN_<class-prompt-slug>.png` (never a prompt image's name)."""


def class_prompts(prompts: tuple[str, ...] | list[str], identifier: str) -> list[str]:
    """The class prompt of each prompt: the prompt without the identifier, as CLIP-T scores it
    ("a sks dog in the snow" → "a dog in the snow")."""
    return [strip_identifier(prompt, identifier) for prompt in prompts]


def name_images(prompts: tuple[str, ...] | list[str], generated: list[GeneratedImage], prefix: str = ""
                ) -> list[tuple[int, list[tuple[str, GeneratedImage]]]]:
    """Per prompt index, its images with their file names `<prefix>NNNN_<prompt-slug>.png`, numbered
    prompt-major."""
    named, index = [], 0
    for prompt_index, prompt in enumerate(prompts):
        images = [image for image in generated if image.prompt_index == prompt_index]
        named.append((prompt_index, [(prefix + image_name(index + i, prompt), image)
                                     for i, image in enumerate(images)]))
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
                                 scores={metric: scores.get(metric) for metric in PROMPT_METRICS}))
    return rows


def score_class_samples(metrics: SubjectMetrics, references: ReferenceEmbeddings, prompts: list[str],
                        generated: list[GeneratedImage]) -> tuple[list[PromptScores], float]:
    """(one `PromptScores` per class prompt, with the PRES of its samples; PRES of every class sample: the mean
    DINO cosine over all (class sample, reference photo) pairs). Each image is embedded once."""
    named = name_images(prompts, generated, CLASS_PREFIX)
    embeddings = metrics.dino.embed([image.image for _, images in named for _, image in images])
    rows, start = [], 0
    for prompt_index, images in named:
        stop = start + len(images)
        pres = mean_cosine(embeddings[start:stop], references.dino) if images else None
        rows.append(PromptScores(prompt=prompts[prompt_index], seeds=[image.seed for _, image in images],
                                 files=[name for name, _ in images], scores={"PRES": pres}))
        start = stop
    return rows, mean_cosine(embeddings, references.dino)


def mean_scores(per_prompt: list[PromptScores]) -> dict[str, float | None]:
    """Each metric's mean over the prompts that have it (None when none has: DINO-D and CLIP-D of prompts with
    a single image, PRES, which `score_class_samples` gives)."""
    means = {}
    for metric in METRICS:
        values = [row.scores[metric] for row in per_prompt if row.scores.get(metric) is not None]
        means[metric] = sum(values) / len(values) if values else None
    return means
