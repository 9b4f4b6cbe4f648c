"""Reading users' photos robustly, and turning them into training tensors.

Users point boothkit at a folder with a handful of photos taken with phones, cameras or editors,
so anything Pillow can open is accepted and normalised to 8-bit RGB:

* EXIF orientation is applied (phone photos are often stored sideways);
* CMYK is converted to RGB (through the embedded ICC profile when there is one; Pillow undoes the
  inversion of Adobe CMYK JPEGs itself);
* transparency (alpha channels, palette or colour-key transparency) is composited over white;
* palette, grayscale and 1-bit images are expanded to RGB;
* 16-bit and 32-bit images are scaled down to 8 bits by their bit depth (never clipped);
* animated or multi-page files contribute their first frame.

Problems the user can cause end in a one-line `BoothkitError`; a single unreadable photo in a
folder is skipped with a one-line warning on the ``boothkit.data.images`` logger.

`prepare_image` and `to_tensor` reproduce the diffusers DreamBooth example transforms
(``Resize(resolution, BILINEAR)``, ``CenterCrop``/``RandomCrop``, ``ToTensor``,
``Normalize([0.5], [0.5])``) with Pillow and numpy only.
"""

from __future__ import annotations

import importlib.resources
import io
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from boothkit.errors import BoothkitError, first_line

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""File suffixes (compared case-insensitively) that count as images."""

UNSUPPORTED_IMAGE_SUFFIXES: tuple[str, ...] = (".heic", ".heif", ".raw", ".dng", ".cr2", ".nef", ".arw", ".svg")
"""Photo formats users commonly have that are not read; named in messages so users know to convert them."""

DEFAULT_MAX_PIXELS: int = 178_956_970
"""Largest image (width x height) decoded; larger ones are refused as possible decompression bombs.

Equal to Pillow's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS`` by default): about 179 MP, enough
for any camera photo, while a bomb would need gigabytes of memory."""

_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class UnreadableImageError(BoothkitError):
    """An image file that cannot be decoded: corrupt, truncated, not an image, or too large."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {_quote(self.path)}: {reason}")


def _quote(path: Path | str) -> str:
    """`path` in single quotes, with control characters (a newline in a file name) escaped."""
    text = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(path))
    return f"'{text}'"


def _suffix_list(suffixes: Iterable[str]) -> str:
    return ", ".join(suffixes)


# --------------------------------------------------------------------------------------------
# Listing


def _check_folder(folder: Path, what: str) -> None:
    """Raise `BoothkitError` unless `folder` is an existing folder."""
    if not folder.exists():
        raise BoothkitError(f"{what} {_quote(folder)} does not exist")
    if not folder.is_dir():
        raise BoothkitError(f"{what} {_quote(folder)} is not a folder")


def _unsupported_hint(files: list[Path]) -> str:
    """A short note naming photo files of formats boothkit does not read, or '' if there are none."""
    unsupported = sorted({p.suffix.lower() for p in files if p.suffix.lower() in UNSUPPORTED_IMAGE_SUFFIXES})
    if not unsupported:
        return ""
    count = sum(p.suffix.lower() in UNSUPPORTED_IMAGE_SUFFIXES for p in files)
    return f"{count} {_suffix_list(unsupported)} file(s) are not supported: convert them to JPEG or PNG"


def list_image_files(folder: str | os.PathLike[str], what: str = "image folder") -> list[Path]:
    """The image files directly inside `folder`, sorted by name.

    Files whose suffix is in `IMAGE_SUFFIXES` (any case) count; hidden files (name starting with
    '.', e.g. macOS '._photo.jpg' resource forks) and sub-folders are skipped. `what` names the
    folder in messages ("instance data folder", "class data folder").

    Raises:
        BoothkitError: the folder does not exist, is not a folder, cannot be listed, or holds no image.
    """
    folder = Path(folder).expanduser()
    _check_folder(folder, what)
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()]
    except OSError as exc:
        reason = first_line(exc.strerror or exc)
        raise BoothkitError(f"cannot list {what} {_quote(folder)}: {reason}") from exc
    images = sorted((p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
    hint = _unsupported_hint(entries)
    if not images:
        extra = f"; {hint}" if hint else ""
        raise BoothkitError(
            f"{what} {_quote(folder)} contains no images (looked for {_suffix_list(IMAGE_SUFFIXES)}){extra}"
        )
    if hint:
        logger.warning("ignoring files in %s %s: %s", what, _quote(folder), hint)
    return images


# --------------------------------------------------------------------------------------------
# Decoding


def _reason(exc: BaseException) -> str:
    """A short, one-line explanation of why Pillow could not decode a file."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or in a format Pillow cannot read"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file does not exist"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode it"
    detail = first_line(exc)
    return f"corrupt or truncated image data ({detail})"


def _check_pixel_count(image: Image.Image, path: Path, max_pixels: int | None) -> None:
    """Refuse images with more than `max_pixels` pixels before decoding them."""
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise UnreadableImageError(
            path,
            f"image is too large ({width}x{height} = {width * height} pixels, limit {max_pixels}); "
            "possible decompression bomb",
        )


def _open_image(path: Path, max_pixels: int | None) -> Image.Image:
    """Open `path` with Pillow, checking its size first; the caller must close it."""
    if path.is_dir():
        raise UnreadableImageError(path, "is a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise UnreadableImageError(path, "file is empty")
        with warnings.catch_warnings():
            # Our own limit (below) decides; Pillow's hard limit still raises DecompressionBombError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        reason = f"image is too large; possible decompression bomb ({first_line(exc)})"
        raise UnreadableImageError(path, reason) from exc
    except UnreadableImageError:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, struct.error...)
        raise UnreadableImageError(path, _reason(exc)) from exc
    try:
        _check_pixel_count(image, path, max_pixels)
    except UnreadableImageError:
        image.close()
        raise
    return image


def _decode_first_frame(image: Image.Image, path: Path) -> None:
    """Fully decode the first frame of `image`, so that corrupt or truncated data fails here.

    Pillow opens animated and multi-page files at their first frame; later frames are never read
    (asking for ``n_frames`` would scan, and could fail on, the whole file).
    """
    try:
        image.load()
    except Exception as exc:
        raise UnreadableImageError(path, _reason(exc)) from exc


def _apply_exif_orientation(image: Image.Image, path: Path) -> Image.Image:
    """Rotate/flip `image` as its EXIF orientation tag says; a broken EXIF block is ignored with a warning."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF must not make a good photo unusable
        logger.warning("ignoring unreadable EXIF orientation of %s: %s", _quote(path), first_line(exc))
        return image


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16-bit ('I;16*'), 32-bit integer ('I') or float ('F') grayscale image to 8-bit 'L'.

    'I;16*' uses the full 0..65535 range. 'I' and 'F' do not record their bit depth, so the values
    decide: 0..1 (float only) -> x255, 0..255 -> as is, 0..65535 -> 16-bit, otherwise min-max.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale_max, offset = 65535.0, 0.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        offset = 0.0
        if low >= 0 and high <= 1 and image.mode == "F":
            scale_max = 1.0
        elif low >= 0 and high <= 255:
            scale_max = 255.0
        elif low >= 0 and high <= 65535:
            scale_max = 65535.0
        else:
            offset, scale_max = low, max(high - low, 1e-12)
    values = np.nan_to_num(values, nan=offset, posinf=offset + scale_max, neginf=offset)
    scaled = np.clip(np.rint((values - offset) * (255.0 / scale_max)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK -> RGB through the embedded ICC profile if there is one (truer colours), else Pillow's formula."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
            if converted is not None:
                return converted
        except Exception as exc:  # no littlecms, or a broken profile: fall back to the plain formula
            logger.debug("ICC conversion failed (%s); using the plain CMYK formula", exc)
    return image.convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten an image with transparency (alpha band, palette or colour-key) onto a white background."""
    if image.mode == "La":  # premultiplied; Pillow cannot convert it to RGBA directly
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """Convert a decoded image of any Pillow mode to a new 8-bit 'RGB' image."""
    try:
        if image.mode in _HIGH_BIT_DEPTH_MODES:
            image = _high_bit_depth_to_l(image)
        if image.mode == "CMYK":
            return _cmyk_to_rgb(image)
        if image.has_transparency_data:
            return _composite_on_white(image)
        return image.convert("RGB")  # also copies an RGB image, detaching it from the open file
    except ValueError as exc:  # Pillow has no conversion for this mode
        reason = f"unsupported colour mode {image.mode} ({first_line(exc)})"
        raise UnreadableImageError(path, reason) from exc


def load_rgb_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Read one photo as a fully decoded 8-bit 'RGB' image, upright, with transparency made white.

    See the module docstring for how each colour mode is converted. The file is closed on return.
    `max_pixels` (None: no limit of ours; Pillow's own hard limit still applies) refuses huge images
    before they are decoded.

    Raises:
        UnreadableImageError: the file is missing, empty, not an image, corrupt, truncated or too large.
    """
    path = Path(path)
    with _open_image(path, max_pixels) as image:
        _decode_first_frame(image, path)
        upright = _apply_exif_orientation(image, path)
        rgb = _to_rgb(upright, path)
    rgb.info.pop("exif", None)  # orientation is applied; stale EXIF would make it apply twice elsewhere
    return rgb


def load_image_folder(
    folder: str | os.PathLike[str],
    what: str = "image folder",
    min_size: int | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[tuple[Path, Image.Image]]:
    """Load every image of `folder` (see `list_image_files`) with `load_rgb_image`, in name order.

    An unreadable file is skipped with one warning naming it, as long as one image remains. With
    `min_size`, each image whose shorter side is below it gets one warning that it will be upscaled.

    Raises:
        BoothkitError: the folder is missing or has no image files, or none of them could be read.
    """
    folder = Path(folder).expanduser()
    loaded: list[tuple[Path, Image.Image]] = []
    failures: list[UnreadableImageError] = []
    for path in list_image_files(folder, what):
        try:
            image = load_rgb_image(path, max_pixels=max_pixels)
        except UnreadableImageError as exc:
            failures.append(exc)
            continue
        loaded.append((path, image))
    if not loaded:
        first = failures[0]
        raise BoothkitError(
            f"no readable image in {what} {_quote(folder)}: {len(failures)} file(s) failed, "
            f"e.g. {_quote(first.path.name)}: {first.reason}"
        )
    for exc in failures:
        logger.warning(
            "skipping unreadable image %s in %s %s: %s", _quote(exc.path.name), what, _quote(folder), exc.reason
        )
    if min_size is not None:
        warn_small_images(loaded, min_size)
    return loaded


def warn_small_images(images: list[tuple[Path, Image.Image]], min_size: int) -> None:
    """Warn once per image whose shorter side is below `min_size` (it will be upscaled, hence blurry)."""
    for path, image in images:
        width, height = image.size
        if min(width, height) < min_size:
            logger.warning(
                "image %s is only %dx%d: its shorter side will be upscaled to %d, which blurs it",
                _quote(path.name),
                width,
                height,
                min_size,
            )


# --------------------------------------------------------------------------------------------
# Resizing, cropping, tensors


def resized_size(image_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after resizing so that the shorter side equals `resolution`.

    Same rounding as torchvision's ``Resize(resolution)``: the longer side is truncated, not rounded.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def crop_is_fixed(image_size: tuple[int, int], resolution: int) -> bool:
    """Whether a `resolution` square crop has only one position once the image is resized.

    True when the resized image is exactly square (e.g. 512x513 at 256 becomes 256x256), so random
    cropping cannot change the result and callers may cache the prepared image.
    """
    width, height = resized_size(image_size, resolution)
    return width == height


def _crop_start(free: int, fraction: float) -> int:
    """First pixel of the crop along an axis with `free` spare pixels; uniform `fraction`, uniform starts."""
    return min(int(math.floor(fraction * (free + 1))), free)


def crop_top_left(image_size: tuple[int, int], resolution: int, center_crop: bool,
                  crop_offset: tuple[float, float] | None = None) -> tuple[int, int]:
    """(top, left) of the `resolution` square that `prepare_image` crops from the image once resized.

    With `center_crop` the crop is centred (torchvision's rounding). Otherwise `crop_offset` = (fy, fx) in
    [0, 1] places it: 0 = top/left, 1 = bottom/right; drawing fy, fx uniformly in [0, 1) from the caller's
    generator makes every position equally likely, like ``RandomCrop``.
    """
    width, height = resized_size(image_size, resolution)
    free_y, free_x = height - resolution, width - resolution
    if center_crop:
        return int(round(free_y / 2.0)), int(round(free_x / 2.0))
    if crop_offset is None:
        raise ValueError("crop_offset=(fy, fx) is required when center_crop is False")
    fy, fx = crop_offset
    if not (0.0 <= fy <= 1.0 and 0.0 <= fx <= 1.0):
        raise ValueError(f"crop_offset values must be in [0, 1], got {crop_offset}")
    return _crop_start(free_y, fy), _crop_start(free_x, fx)


def prepare_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    crop_offset: tuple[float, float] | None = None,
) -> Image.Image:
    """Resize (bilinear) so the shorter side is `resolution`, then crop a `resolution` square at
    `crop_top_left(image.size, resolution, center_crop, crop_offset)`.

    Matches diffusers' DreamBooth ``Resize(resolution, BILINEAR)`` then ``CenterCrop``/``RandomCrop``.
    """
    top, left = crop_top_left(image.size, resolution, center_crop, crop_offset)
    width, height = resized_size(image.size, resolution)
    resized = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
    return resized.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit 'RGB' (or 'L') image as a float32 CHW tensor in [-1, 1].

    Same values as torchvision ``ToTensor()`` followed by ``Normalize([0.5], [0.5])``: (x / 255 - 0.5) / 0.5.
    """
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"to_tensor expects an 'RGB' or 'L' image, got mode {image.mode!r}")
    array = np.array(image, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return tensor.sub(0.5).div(0.5)


def hflip(tensor: torch.Tensor) -> torch.Tensor:
    """Mirror an image tensor (..., H, W) left-right."""
    return tensor.flip(-1)


# --------------------------------------------------------------------------------------------
# Sample subject shipped with the package


def sample_subject_dir() -> Path:
    """The folder of the sample subject's photos (5 photos of a dog from the DreamBooth dataset, 128x128).

    See ``boothkit/assets/sample_subject/ATTRIBUTION.md`` for credits and licence (CC BY 4.0).
    """
    folder = importlib.resources.files("boothkit") / "assets" / "sample_subject" / "dog"
    if not isinstance(folder, Path) or not folder.is_dir():
        raise BoothkitError(f"the sample subject photos are missing from this boothkit installation ({folder})")
    return folder


def sample_subject_class() -> str:
    """The class noun of the sample subject (its prior-preservation class), as in the DreamBooth dataset."""
    return "dog"
