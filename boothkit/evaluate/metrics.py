"""The DreamBooth evaluation metrics: DINO, CLIP-I, CLIP-T, the diversities DINO-D and CLIP-D, and PRES.

* **DINO**: mean cosine similarity, over every (generated, reference) pair, of the CLS embeddings
  (``last_hidden_state[:, 0]``, after the final layer norm) of a self-supervised ViT: DINO (Caron et al. 2021,
  ``ViTModel``, default ``facebook/dino-vits16``) or DINOv2 (Oquab et al. 2023, ``Dinov2Model``, e.g.
  ``facebook/dinov2-small``), chosen by the ``model_type`` of the model's config.json. Images are preprocessed
  here, with Pillow and numpy, as the model's own image processor (preprocessor_config.json) says: resize
  (shorter side, or to a fixed height x width), centre crop, rescale, mean/std normalisation; the result
  equals the transformers image processor's. A model without a processor config gets the DINO evaluation
  protocol scaled to its ``image_size``: shorter side to round(image_size * 256 / 224) (bicubic), a centred
  image_size crop, ImageNet mean and std (256/224 for a 224 px ViT).
* **CLIP-I**: the same mean over pairs with CLIP image embeddings (default ``openai/clip-vit-base-patch32``,
  preprocessed by the model's own PIL image processor).
* **CLIP-T**: mean over generated images of the cosine between the CLIP image embedding and the CLIP text
  embedding of the prompt, with the identifier token removed ("a sks dog" is scored as "a dog") unless
  asked to keep it.
* **DINO-D** and **CLIP-D** (diversity): the mean, over the unordered pairs i < j of images generated for one
  prompt, of the cosine distance 1 - cos(e_i, e_j) of their DINO (resp. CLIP image) embeddings; None for fewer
  than two images. Higher is more diverse. DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning
  Text-to-Image Diffusion Models for Subject-Driven Generation", CVPR, §4.3) defines its diversity DIV with
  LPIPS (Zhang et al. 2018), averaged over pairs of images generated for the same subject and prompt; DINO-D
  and CLIP-D are that pairwise average with DINO and CLIP embedding distances instead of LPIPS (as later
  personalization papers report diversity), so they are not DreamBooth's DIV numbers. The embeddings the other
  metrics compute are reused (no image is embedded twice).
* **PRES** (prior preservation, DreamBooth §4.3: "the average pairwise DINO similarity between generated images
  of random subjects of the prior class and real images of our specific subject"): the mean cosine, over every
  (class-prompt sample, reference photo) pair, of their DINO embeddings. The class-prompt samples are images the
  personalized model generates from the prompt without the identifier ("a dog in the snow"). Lower is better:
  a high PRES means the class collapsed onto the subject (language drift).

All scores are plain cosines in [-1, 1] (CLIP-T is not multiplied by 100 nor clipped at 0).
Reference embeddings are computed once per subject (`SubjectMetrics.references`) and reused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from boothkit.errors import BoothkitError, first_line

DINO_PROTOCOL_RESIZE_RATIO: float = 256 / 224
"""DINO evaluation protocol: the shorter side is resized to 256 before a 224 crop; other sizes keep the ratio."""

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
    return BoothkitError(f"cannot load {what} model '{name}': {first_line(error)}")


def _config_model_type(what: str, name: str) -> str:
    """The ``model_type`` in the config.json of `name` (a folder or hub id), or a one-line `BoothkitError`."""
    from transformers import PretrainedConfig

    if _is_missing_local_path(name):
        raise _load_error(what, name, "no such folder")
    if Path(name).expanduser().is_file():
        raise _load_error(what, name, "is a file; give the model's folder")
    try:
        found = PretrainedConfig.get_config_dict(name)[0].get("model_type")
    except Exception as error:  # transformers raises OSError, ValueError, ... for bad folders and ids
        raise _load_error(what, name, error) from error
    if found is None:
        raise _load_error(what, name, "no model config (config.json with a model_type) found")
    return found


def _load_pretrained(what: str, name: str, classes: dict[str, tuple[Any, dict[str, Any]]], **kwargs: Any) -> Any:
    """``from_pretrained(name)`` of the class that `classes` maps the config's model_type to (with its extra
    keyword arguments), refusing other model types and checkpoints that leave weights uninitialised."""
    found = _config_model_type(what, name)
    if found not in classes:  # checked first: a wrong checkpoint would otherwise build a full random model
        expected = " or ".join(repr(model_type) for model_type in classes)
        raise _load_error(what, name, f"its config is a {found!r} model, not {expected}")
    model_class, extra = classes[found]
    try:
        model, info = model_class.from_pretrained(name, output_loading_info=True, **extra, **kwargs)
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


@dataclass(frozen=True)
class ImagePreprocessing:
    """What turns a PIL image into a ViT's ``pixel_values``: the steps of a transformers PIL image processor.

    In order: convert to RGB; resize (the shorter side to `shortest_edge`, the longer one scaled and floored, or
    to exactly `resize_to` = (height, width); `resample` is a PIL filter); centre crop to `crop` = (height, width),
    offsets floored and zero padding where the image is smaller, as transformers does (torchvision rounds the
    offsets instead); multiply by `rescale_factor`; subtract `mean` and divide by `std` per channel.
    A step whose setting is None is skipped. `source` says where the settings came from.
    """

    shortest_edge: int | None = None
    resize_to: tuple[int, int] | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    crop: tuple[int, int] | None = None
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    source: str = field(default="", compare=False)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the image (no crop, aspect-kept resize)."""
        return self.crop or self.resize_to

    def pixels(self, image: Image.Image) -> np.ndarray:
        """float32 (3, height, width) model input for one image."""
        image = image.convert("RGB")
        width, height = image.size
        if self.shortest_edge is not None:
            short, long = min(width, height), max(width, height)
            new_long = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
            image = image.resize(size, Image.Resampling(self.resample))
        elif self.resize_to is not None:
            image = image.resize(self.resize_to[::-1], Image.Resampling(self.resample))
        array = np.asarray(image)
        if self.crop is not None:
            array = _center_crop(array, *self.crop)
        array = array.astype(np.float64) * self.rescale_factor if self.rescale_factor is not None else array
        array = array.astype(np.float32)
        if self.mean is not None and self.std is not None:
            array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centred (height, width) window of an (H, W, C) array; zero padding centred (extra row/column first)
    where the array is smaller, offsets floored: `transformers.image_transforms.center_crop`."""
    pad_top, pad_left = max(0, -(-(height - array.shape[0]) // 2)), max(0, -(-(width - array.shape[1]) // 2))
    if pad_top or pad_left:
        padded = np.zeros((max(height, array.shape[0]), max(width, array.shape[1]), array.shape[2]), array.dtype)
        padded[pad_top:pad_top + array.shape[0], pad_left:pad_left + array.shape[1]] = array
        array = padded
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    return array[top:top + height, left:left + width]


def dino_protocol(image_size: int | tuple[int, int] = 224) -> ImagePreprocessing:
    """The DINO evaluation preprocessing (Caron et al. 2021: Resize(256, bicubic), CenterCrop(224), ImageNet
    mean/std) scaled to a ViT of `image_size`: shorter side round(image_size * 256 / 224), crop image_size."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return ImagePreprocessing(shortest_edge=round(min(height, width) * DINO_PROTOCOL_RESIZE_RATIO),
                              crop=(int(height), int(width)),
                              source=f"DINO protocol for image_size {image_size} (no image processor config)")


def preprocessing_of(processor: Any, source: str = "") -> ImagePreprocessing:
    """The `ImagePreprocessing` of a loaded transformers image processor (its resolved settings and defaults).

    Raises ValueError for steps not reproduced here (other resize rules, padding).
    """
    shortest_edge = resize_to = crop = None
    size = processor.size
    if processor.do_resize:
        if size.shortest_edge and not (size.longest_edge or size.height or size.width):
            shortest_edge = int(size.shortest_edge)
        elif size.height and size.width and not size.shortest_edge:
            resize_to = (int(size.height), int(size.width))
        else:
            rule = ", ".join(f"{key} {value}" for key, value in vars(size).items() if value)
            raise ValueError(f"resize rule '{rule}' is not supported (only shortest_edge, or height and width)")
    if getattr(processor, "do_center_crop", None):
        crop = (int(processor.crop_size.height), int(processor.crop_size.width))
    if getattr(processor, "do_pad", None):
        raise ValueError("padding is not supported")
    normalize = bool(processor.do_normalize)
    return ImagePreprocessing(
        shortest_edge=shortest_edge, resize_to=resize_to,
        resample=int(processor.resample if processor.resample is not None else Image.Resampling.BILINEAR),
        crop=crop, rescale_factor=float(processor.rescale_factor) if processor.do_rescale else None,
        mean=_channels(processor.image_mean) if normalize else None,
        std=_channels(processor.image_std) if normalize else None, source=source,
    )


def _channels(value: float | list[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def model_preprocessing(what: str, name: str, model_config: Any) -> ImagePreprocessing:
    """The preprocessing of model `name`: its image processor config (preprocessor_config.json, or the
    image_processor part of processor_config.json), else the DINO protocol at the config's ``image_size``."""
    from transformers import AutoImageProcessor
    from transformers.models.auto.image_processing_auto import get_image_processor_config

    try:
        if get_image_processor_config(name):
            processor = AutoImageProcessor.from_pretrained(name, backend="pil")
            return preprocessing_of(processor, f"image processor of {name}")
    except Exception as error:  # malformed JSON, unknown processor class, unsupported steps
        raise _load_error(what, name, f"unusable image processor config ({first_line(error)})") from error
    return dino_protocol(model_config.image_size)


# model_type in config.json -> (transformers class name, from_pretrained keyword arguments, whether the input
# must be exactly `image_size` square: ViT raises otherwise, DINOv2 interpolates its position embeddings).
DINO_ARCHITECTURES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "vit": ("ViTModel", {"add_pooling_layer": False}, True),
    "dinov2": ("Dinov2Model", {}, False),
}


class DinoEmbedder:
    """CLS embeddings of a DINO ViT (`ViTModel`) or DINOv2 (`Dinov2Model`), L2-normalised; images preprocessed
    as `model_preprocessing` says."""

    def __init__(self, model_name_or_path: str = DEFAULT_DINO_MODEL, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        import transformers

        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        classes = {model_type: (getattr(transformers, class_name), kwargs)
                   for model_type, (class_name, kwargs, _) in DINO_ARCHITECTURES.items()}
        model = _load_pretrained("DINO", model_name_or_path, classes, dtype=dtype)
        self.preprocessing = model_preprocessing("DINO", model_name_or_path, model.config)
        _check_input_size(model_name_or_path, model.config, self.preprocessing)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of unit-norm CLS embeddings."""
        chunks = []
        for start in range(0, len(images), BATCH_SIZE):
            pixels = np.stack([self.preprocessing.pixels(image) for image in images[start:start + BATCH_SIZE]])
            batch = torch.from_numpy(pixels).to(self.device, self.dtype)
            chunks.append(_normalized(self.model(pixel_values=batch).last_hidden_state[:, 0]))
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.config.hidden_size)


def _check_input_size(name: str, config: Any, preprocessing: ImagePreprocessing) -> None:
    """One line instead of the model's traceback when preprocessed images cannot be batched or fed to it."""
    size = preprocessing.output_size
    if size is None:
        raise _load_error("DINO", name, f"its {preprocessing.source} gives images of varying size (no centre "
                                        "crop or fixed resize)")
    image_size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    if DINO_ARCHITECTURES[config.model_type][2] and tuple(size) != tuple(image_size):
        raise _load_error("DINO", name, f"its {preprocessing.source} gives {size[0]}x{size[1]} images but the "
                                        f"model's image_size is {image_size[0]}x{image_size[1]}")


class ClipEmbedder:
    """CLIP image and text embeddings (`transformers.CLIPModel` and its PIL processor), L2-normalised."""

    def __init__(self, model_name_or_path: str = DEFAULT_CLIP_MODEL, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        model = _load_pretrained("CLIP", model_name_or_path, {"clip": (CLIPModel, {})}, dtype=dtype)
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


def mean_pairwise_distance(embeddings: torch.Tensor) -> float | None:
    """Mean cosine distance 1 - cos(e_i, e_j) over the unordered pairs i < j of unit-norm rows (N, D) (the
    diversity of N images, DINO-D / CLIP-D); None when N < 2 (no pair)."""
    count = embeddings.shape[0]
    if count < 2:
        return None
    rows = embeddings.double()
    i, j = torch.triu_indices(count, count, offset=1)
    return float((1.0 - (rows[i] * rows[j]).sum(dim=-1)).mean())


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
              identifier: str = "sks", keep_identifier: bool = False) -> dict[str, float | None]:
        """{"DINO", "CLIP-I", "CLIP-T" (only with a prompt), "DINO-D", "CLIP-D" (the images taken as the samples
        of one prompt; None for a single image), "n_images", "n_references"}. Each image is embedded once."""
        if not images:
            raise BoothkitError("no generated images to score")
        dino_images, clip_images = self.dino.embed(images), self.clip.embed_images(images)
        scores: dict[str, float | None] = {
            "DINO": mean_cosine(dino_images, references.dino),
            "CLIP-I": mean_cosine(clip_images, references.clip),
        }
        if prompt is not None:
            text = prompt if keep_identifier else strip_identifier(prompt, identifier)
            scores["CLIP-T"] = mean_cosine(clip_images, self.clip.embed_texts([text]))
        scores["DINO-D"] = mean_pairwise_distance(dino_images)
        scores["CLIP-D"] = mean_pairwise_distance(clip_images)
        scores["n_images"] = len(images)
        scores["n_references"] = references.count
        return scores

    def preservation(self, class_images: list[Image.Image], references: ReferenceEmbeddings) -> float:
        """PRES: the mean DINO cosine over every (class-prompt sample, reference photo) pair (lower: less collapse)."""
        if not class_images:
            raise BoothkitError("no class-prompt images to score")
        return mean_cosine(self.dino.embed(class_images), references.dino)
