"""The DreamBooth evaluation metrics: DINO, CLIP-I and CLIP-T.

* **DINO**: mean cosine similarity, over every (generated, reference) pair, of the CLS embeddings
  (``last_hidden_state[:, 0]``) of a self-supervised ViT (default ``facebook/dino-vits16``). Images are
  preprocessed here, with Pillow and numpy, as in the DINO evaluation protocol: the shorter side resized
  to 256 (bicubic), a centred 224 crop, values in [0, 1] normalised with the ImageNet mean and std.
* **CLIP-I**: the same mean over pairs with CLIP image embeddings (default ``openai/clip-vit-base-patch32``,
  preprocessed by the model's own PIL image processor).
* **CLIP-T**: mean over generated images of the cosine between the CLIP image embedding and the CLIP text
  embedding of the prompt, with the identifier token removed ("a sks dog" is scored as "a dog") unless
  asked to keep it.

All scores are plain cosines in [-1, 1] (CLIP-T is not multiplied by 100 nor clipped at 0).
Reference embeddings are computed once per subject (`SubjectMetrics.references`) and reused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from boothkit.errors import BoothkitError

DINO_RESIZE: int = 256
"""Shorter side of an image after the DINO evaluation resize (bicubic)."""

DINO_CROP: int = 224
"""Side of the centred square crop fed to the DINO ViT."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
BATCH_SIZE = 32
"""Images (or texts) per forward pass."""


def strip_identifier(prompt: str, identifier: str = "sks") -> str:
    """`prompt` without the whole word `identifier`, whitespace collapsed.

    ``strip_identifier("a sks dog in the snow") == "a dog in the snow"``; words that merely contain the
    identifier ("asks", "sksx") are kept.
    """
    if identifier:
        prompt = re.sub(rf"\s*(?<!\w){re.escape(identifier)}(?!\w)", "", prompt)
    return " ".join(prompt.split())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_missing_local_path(name: str) -> bool:
    """A name written as a local path (absolute, ./, ../, ~) that does not exist: no reason to ask the hub."""
    looks_local = Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
    return looks_local and not Path(name).expanduser().exists()


def _load_error(what: str, name: str, error: BaseException | str) -> BoothkitError:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    return BoothkitError(f"cannot load {what} model '{name}': {text}")


def _load_pretrained(what: str, model_class: Any, name: str, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(name)`, refusing checkpoints that leave weights uninitialised."""
    if _is_missing_local_path(name):
        raise _load_error(what, name, "no such folder")
    if Path(name).expanduser().is_file():
        raise _load_error(what, name, "is a file; give the model's folder")
    expected = model_class.config_class.model_type
    try:
        found = model_class.config_class.get_config_dict(name)[0].get("model_type")
        if found is None:
            raise _load_error(what, name, "no model config (config.json with a model_type) found")
        if found != expected:  # checked first: a wrong checkpoint would otherwise build a full random model
            raise _load_error(what, name, f"its config is a {found!r} model, not {expected!r}")
        model, info = model_class.from_pretrained(name, output_loading_info=True, **kwargs)
    except BoothkitError:
        raise
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... for bad folders
        raise _load_error(what, name, error) from error
    missing = list(info.get("missing_keys") or [])
    if missing:
        reason = f"not a {model_class.__name__} checkpoint ({len(missing)} weight(s) missing, e.g. {missing[0]})"
        raise _load_error(what, name, reason)
    return model


def _as_rgb(images: list[Image.Image]) -> list[Image.Image]:
    return [image if image.mode == "RGB" else image.convert("RGB") for image in images]


def _features(output: Any) -> torch.Tensor:
    """The embedding tensor from `get_image_features`/`get_text_features` (a tensor or, in transformers 5,
    an output object whose `pooler_output` is the projected embedding)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find the embedding in a {type(output).__name__}")


def _normalized(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def dino_pixels(image: Image.Image) -> np.ndarray:
    """One image as the DINO evaluation protocol feeds it: float32 (3, 224, 224), ImageNet-normalised.

    Same as torchvision ``Resize(256, BICUBIC)``, ``CenterCrop(224)``, ``ToTensor()``, ``Normalize``.
    """
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        size = (DINO_RESIZE, int(DINO_RESIZE * height / width))
    else:
        size = (int(DINO_RESIZE * width / height), DINO_RESIZE)
    resized = image.resize(size, Image.Resampling.BICUBIC)
    left = int(round((size[0] - DINO_CROP) / 2.0))
    top = int(round((size[1] - DINO_CROP) / 2.0))
    cropped = resized.crop((left, top, left + DINO_CROP, top + DINO_CROP))
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    array = (array - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class DinoEmbedder:
    """CLS embeddings of a DINO ViT (`transformers.ViTModel`), L2-normalised."""

    def __init__(self, model_name_or_path: str = DEFAULT_DINO_MODEL, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import ViTModel

        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        model = _load_pretrained("DINO", ViTModel, model_name_or_path, add_pooling_layer=False, dtype=dtype)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of unit-norm CLS embeddings."""
        chunks = []
        for start in range(0, len(images), BATCH_SIZE):
            pixels = np.stack([dino_pixels(image) for image in images[start:start + BATCH_SIZE]])
            batch = torch.from_numpy(pixels).to(self.device, self.dtype)
            chunks.append(_normalized(self.model(pixel_values=batch).last_hidden_state[:, 0]))
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.config.hidden_size)


class ClipEmbedder:
    """CLIP image and text embeddings (`transformers.CLIPModel` and its PIL processor), L2-normalised."""

    def __init__(self, model_name_or_path: str = DEFAULT_CLIP_MODEL, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        model = _load_pretrained("CLIP", CLIPModel, model_name_or_path, dtype=dtype)
        self.model = model.to(self.device).eval()
        try:
            self.processor = AutoProcessor.from_pretrained(model_name_or_path, backend="pil")
        except Exception as error:
            raise _load_error("CLIP", model_name_or_path, f"no usable processor ({error})") from error
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of unit-norm projected image embeddings."""
        chunks = []
        for start in range(0, len(images), BATCH_SIZE):
            inputs = self.processor(images=_as_rgb(images[start:start + BATCH_SIZE]), return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            chunks.append(_normalized(_features(self.model.get_image_features(pixel_values=pixels))))
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of unit-norm projected text embeddings; long texts are truncated."""
        chunks = []
        for start in range(0, len(texts), BATCH_SIZE):
            inputs = self.processor(text=list(texts[start:start + BATCH_SIZE]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            output = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                                  attention_mask=inputs["attention_mask"].to(self.device))
            chunks.append(_normalized(_features(output)))
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.config.projection_dim)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of ``a @ b.T`` for unit-norm rows a (N, D) and b (M, D): the mean cosine over all N x M pairs."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("mean_cosine needs at least one row on each side")
    return float((a.float() @ b.float().to(a.device).T).mean())


@dataclass
class ReferenceEmbeddings:
    """A subject's reference photos, embedded once: DINO (N, D) and CLIP (N, D'), unit-norm rows."""

    dino: torch.Tensor
    clip: torch.Tensor
    count: int


class SubjectMetrics:
    """DINO, CLIP-I and CLIP-T of generated images against one subject's reference photos."""

    def __init__(self, dino_model: str = DEFAULT_DINO_MODEL, clip_model: str = DEFAULT_CLIP_MODEL,
                 device: torch.device | str | None = None) -> None:
        self.dino = DinoEmbedder(dino_model, device=device)
        self.clip = ClipEmbedder(clip_model, device=device)

    def references(self, images: list[Image.Image]) -> ReferenceEmbeddings:
        if not images:
            raise BoothkitError("no reference images to compare with")
        return ReferenceEmbeddings(self.dino.embed(images), self.clip.embed_images(images), len(images))

    def score(self, images: list[Image.Image], prompt: str | None, references: ReferenceEmbeddings,
              identifier: str = "sks", keep_identifier: bool = False) -> dict[str, float]:
        """{"DINO", "CLIP-I", "CLIP-T" (only with a prompt), "n_images", "n_references"}."""
        if not images:
            raise BoothkitError("no generated images to score")
        clip_images = self.clip.embed_images(images)
        scores: dict[str, float] = {
            "DINO": mean_cosine(self.dino.embed(images), references.dino),
            "CLIP-I": mean_cosine(clip_images, references.clip),
        }
        if prompt is not None:
            text = prompt if keep_identifier else strip_identifier(prompt, identifier)
            scores["CLIP-T"] = mean_cosine(clip_images, self.clip.embed_texts([text]))
        scores["n_images"] = len(images)
        scores["n_references"] = references.count
        return scores
