"""Subject masks of the instance photos (PDMBooth's `--mask_dm` / `--mask_pdm`): white = subject.

Two sources: a folder with one mask per photo (`--mask_dir`, same stem, any image format; grey levels are kept
as soft weights), or a text-prompted segmentation model from transformers (`--mask_model`, CLIPSeg by default:
Lüddecke & Ecker 2022, "Image Segmentation Using Text and Image Prompts"), prompted with the class word. The
PDMBooth code segments with SAM from a point at the image centre; a text prompt needs no point and finds
off-centre subjects, so boothkit uses CLIPSeg (its choice, documented in docs/pdmbooth.md). A computed mask is
the model's probability thresholded at 0.5 and resized to the photo (bilinear), cached under
`BOOTHKIT_CACHE_DIR/masks/` keyed by the photo's bytes, the model's content and the prompt, so a changed photo,
model or prompt is never answered from the cache.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from PIL import Image

from boothkit.data.images import IMAGE_SUFFIXES, load_rgb_image
from boothkit.errors import BoothkitError
from boothkit.identity import file_digest, model_identity, value_digest

log = logging.getLogger(__name__)
DEFAULT_MASK_MODEL = "CIDAS/clipseg-rd64-refined"
THRESHOLD = 0.5


def cache_dir() -> Path:
    from boothkit.identity import cache_root

    return cache_root() / "masks"


def masks_from_folder(mask_dir: str | os.PathLike, photos: list[Path]) -> list[Image.Image]:
    """The mask of each photo from `mask_dir` (same stem), as 'L' images of the photo's size."""
    folder = Path(mask_dir).expanduser()
    if not folder.is_dir():
        raise BoothkitError(f"--mask_dir '{folder}' is not a folder")
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            by_stem.setdefault(path.stem, path)
    masks = []
    for photo in photos:
        if photo.stem not in by_stem:
            raise BoothkitError(f"--mask_dir '{folder}' has no mask for photo '{photo.name}' (a file named "
                                f"'{photo.stem}.png', white = subject)")
        masks.append(_fit(_as_mask(by_stem[photo.stem]), photo))
    return masks


def _as_mask(path: Path) -> Image.Image:
    return load_rgb_image(path).convert("L")


def _fit(mask: Image.Image, photo: Path) -> Image.Image:
    """The mask at the photo's size (EXIF orientation applied to both, as training reads photos)."""
    size = load_rgb_image(photo).size
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def segmentation_masks(photos: list[Path], prompt: str, model: str = DEFAULT_MASK_MODEL,
                       device: torch.device | None = None) -> list[Image.Image]:
    """Each photo's mask from the text-prompted segmentation model `model` (computed once, then cached)."""
    model_key = value_digest(model_identity(model, config_name="config.json"))
    keys = [value_digest({"photo": file_digest(photo), "model": model_key, "prompt": prompt,
                          "threshold": THRESHOLD}) for photo in photos]
    cached = {key: cache_dir() / f"{key}.png" for key in keys}
    missing = [(photo, key) for photo, key in zip(photos, keys) if not cached[key].is_file()]
    if missing:
        started = time.perf_counter()
        segmenter = _Segmenter(model, device or torch.device("cpu"))
        for photo, key in missing:
            _save_png(segmenter.mask(load_rgb_image(photo), prompt), cached[key])
        log.info("masks: %d computed with %s in %.1f s, cached in %s", len(missing), model,
                 time.perf_counter() - started, cache_dir())
    return [Image.open(cached[key]).convert("L") for key in keys]


class _Segmenter:
    def __init__(self, model: str, device: torch.device):
        from transformers import AutoProcessor, CLIPSegForImageSegmentation

        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = CLIPSegForImageSegmentation.from_pretrained(model).to(device).eval()
        except (OSError, ValueError) as error:
            raise BoothkitError(f"cannot load the mask model '{model}': {str(error).splitlines()[0]} (pass a "
                                "local CLIPSeg folder with --mask_model, or masks with --mask_dir)") from None
        self.device = device

    @torch.no_grad()
    def mask(self, image: Image.Image, prompt: str) -> Image.Image:
        inputs = self.processor(text=[prompt], images=[image], padding=True, return_tensors="pt").to(self.device)
        logits = self.model(**inputs).logits
        probability = torch.sigmoid(logits.reshape(1, 1, *logits.shape[-2:]).float())
        resized = torch.nn.functional.interpolate(probability, size=(image.height, image.width), mode="bilinear",
                                                  align_corners=False)[0, 0]
        return Image.fromarray(((resized > THRESHOLD).to(torch.uint8) * 255).cpu().numpy(), mode="L")


def _save_png(image: Image.Image, path: Path) -> None:
    from boothkit.io import save_image_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(image, path)


def mask_overlay(photo: Image.Image, mask: Image.Image) -> Image.Image:
    """The photo with its background dimmed and tinted: what a user checks before trusting a masked run."""
    background = Image.blend(photo, Image.new("RGB", photo.size, (40, 0, 60)), 0.7)
    return Image.composite(photo, background, mask.resize(photo.size))


def describe(masks: list[Image.Image]) -> str:
    """Each mask's subject fraction, for the log (an empty or full mask is usually a wrong prompt)."""
    import numpy as np

    return json.dumps([round(float(np.asarray(mask, dtype=np.float32).mean() / 255), 3) for mask in masks])
