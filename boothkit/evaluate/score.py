"""`boothkit score`: DINO, CLIP-I and (with a prompt) CLIP-T of a folder of generated images against a
folder of the subject's reference photos, their diversities DINO-D and CLIP-D (the folder taken as the samples
of one prompt) and, given a folder of class-prompt samples, PRES."""

from __future__ import annotations

from pydantic import Field

from boothkit.config import CommandConfig

# Light on purpose: the CLI builds `boothkit score --help` from ScoreConfig without importing torch, so the
# metric modules are imported by run_score. The same ids as boothkit.evaluate.metrics's (tests/test_cli.py checks).
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


class ScoreConfig(CommandConfig):
    images: str = Field(description="Folder of generated images to score.")
    references: str = Field(description="Folder of the subject's reference photos.")
    prompt: str | None = Field(None, description="Prompt of the generated images; gives CLIP-T.")
    class_images: str | None = Field(None, description="Folder of images the personalized model generated from the "
                                                       "class prompt (no identifier); gives PRES, their DINO "
                                                       "similarity to --references (lower: less collapse).")
    identifier: str = Field("sks", pattern=r"^\S+$", description="Identifier word removed from the prompt for CLIP-T.")
    keep_identifier: bool = Field(False, description="Score CLIP-T against the prompt as written, identifier kept.")
    dino_model: str = Field(DEFAULT_DINO_MODEL, description="Hub id or local folder of the DINO ViT or DINOv2 model.")
    clip_model: str = Field(DEFAULT_CLIP_MODEL, description="Hub id or local folder of the CLIP model.")


def run_score(config: ScoreConfig) -> dict:
    """{"DINO", "CLIP-I", "CLIP-T" (only with a prompt), "DINO-D", "CLIP-D" (None for a single image), "PRES" and
    "n_class_images" (only with class images), "n_images", "n_references"}; folders are read first."""
    from boothkit.data.images import load_image_folder
    from boothkit.evaluate.metrics import SubjectMetrics

    generated = [image for _, image in load_image_folder(config.images, "generated image folder")]
    references = [image for _, image in load_image_folder(config.references, "reference image folder")]
    class_images = [image for _, image in load_image_folder(config.class_images, "class image folder")] \
        if config.class_images is not None else None
    metrics = SubjectMetrics(config.dino_model, config.clip_model)
    embedded = metrics.references(references)
    scores = metrics.score(generated, config.prompt, embedded, identifier=config.identifier,
                           keep_identifier=config.keep_identifier)
    if class_images is not None:
        scores["PRES"] = metrics.preservation(class_images, embedded)
        scores["n_class_images"] = len(class_images)
    return scores
