"""Tests for boothkit.data.images: robust photo loading, resize/crop, tensors, the sample subject."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit.data.images import (
    IMAGE_SUFFIXES,
    UnreadableImageError,
    crop_is_fixed,
    hflip,
    list_image_files,
    load_image_folder,
    load_rgb_image,
    prepare_image,
    resized_size,
    sample_subject_class,
    sample_subject_dir,
    to_tensor,
)
from boothkit.errors import BoothkitError

LOGGER = "boothkit.data.images"


# ---------------------------------------------------------------------------- helpers


def _noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _good_jpeg(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    _noise_rgb(*size).save(path, quality=95)
    return path


def _truncated_jpeg(path: Path) -> Path:
    _good_jpeg(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_as_jpeg(path: Path) -> Path:
    path.write_text("this is not an image\n")
    return path


def _empty_png(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _stored(path: Path, attribute: str):
    """An attribute of the image as Pillow opens it (file closed afterwards)."""
    with Image.open(path) as image:
        return getattr(image, attribute)


def _assert_one_line(message: str) -> None:
    assert "\n" not in message and "\r" not in message
    assert "Traceback" not in message


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------- colour modes


def test_cmyk_jpeg_becomes_correct_rgb(tmp_path: Path) -> None:
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    image.paste((255, 0, 255, 0), (0, 0, 8, 16))  # pure green on the left half
    path = tmp_path / "cmyk.jpg"
    image.save(path, quality=100)
    assert _stored(path, "mode") == "CMYK"
    rgb = load_rgb_image(path)
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    np.testing.assert_allclose(rgb.getpixel((12, 8)), (255, 0, 0), atol=6)
    np.testing.assert_allclose(rgb.getpixel((3, 8)), (0, 255, 0), atol=6)


def test_cmyk_with_broken_icc_profile_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "cmyk_icc.jpg"
    Image.new("CMYK", (8, 8), (255, 0, 255, 0)).save(path, quality=100, icc_profile=b"not a profile")
    assert _stored(path, "info").get("icc_profile") == b"not a profile"
    np.testing.assert_allclose(load_rgb_image(path).getpixel((4, 4)), (0, 255, 0), atol=6)


def test_rgba_png_transparent_areas_become_white(tmp_path: Path) -> None:
    array = np.zeros((10, 10, 4), dtype=np.uint8)
    array[..., 0] = 200  # red-ish everywhere
    array[:, 5:, 3] = 255  # right half opaque, left half fully transparent
    array[0, 0, 3] = 128  # one half-transparent pixel
    path = tmp_path / "rgba.png"
    Image.fromarray(array, "RGBA").save(path)
    rgb = np.array(load_rgb_image(path))
    assert rgb.shape == (10, 10, 3)
    assert (rgb[1:, :5] == 255).all()  # transparent -> white, not black
    assert (rgb[:, 5:] == (200, 0, 0)).all()
    np.testing.assert_allclose(rgb[0, 0], (227.5, 127.5, 127.5), atol=1.5)  # 50% red over white


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (6, 6), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.paste(1, (3, 0, 6, 6))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    assert _stored(path, "mode") == "P"
    rgb = np.array(load_rgb_image(path))
    assert (rgb[:, :3] == 255).all()  # transparent index (black) -> white
    assert (rgb[:, 3:] == (0, 0, 255)).all()


def test_palette_png_without_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    path = tmp_path / "palette_opaque.png"
    image.save(path)
    rgb = load_rgb_image(path)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (10, 20, 30)


def test_grayscale_with_colour_key_transparency(tmp_path: Path) -> None:
    array = np.full((4, 4), 50, dtype=np.uint8)
    array[:, 2:] = 7
    path = tmp_path / "gray_key.png"
    Image.fromarray(array, "L").save(path, transparency=7)
    rgb = np.array(load_rgb_image(path))
    assert (rgb[:, 2:] == 255).all() and (rgb[:, :2] == 50).all()


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert _stored(path, "mode").startswith("I;16")
    rgb = np.array(load_rgb_image(path))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 4, 128, 255]  # Pillow's own convert("L") would give 0, 255, 255, 255
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()


def test_16bit_big_endian_and_32bit_modes(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    path = tmp_path / "big.tif"
    big.save(path)
    assert np.array(load_rgb_image(path))[0, :, 0].tolist() == [0, 128, 255]
    as_i = Image.fromarray(values.astype(np.int32), "I")
    as_i.save(tmp_path / "i32.tif")
    assert np.array(load_rgb_image(tmp_path / "i32.tif"))[0, :, 0].tolist() == [0, 128, 255]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    as_f.save(tmp_path / "f32.tif")
    assert np.array(load_rgb_image(tmp_path / "f32.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_grayscale_and_one_bit(tmp_path: Path) -> None:
    Image.new("L", (5, 3), 77).save(tmp_path / "gray.png")
    gray = load_rgb_image(tmp_path / "gray.png")
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    bits = Image.new("1", (5, 3), 0)
    bits.putpixel((1, 1), 1)
    bits.save(tmp_path / "bits.png")
    rgb = np.array(load_rgb_image(tmp_path / "bits.png"))
    assert rgb[1, 1].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("orientation", "corner"),
    [(6, "top-right"), (8, "bottom-left"), (3, "bottom-right")],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, corner: str) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # marker block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.jpg"
    stored.save(path, exif=exif, quality=95)
    image = load_rgb_image(path)
    assert image.size == ((40, 20) if orientation == 3 else (20, 40))
    red = np.argwhere(np.array(image)[..., 0] > 200)
    rows, cols = image.height, image.width
    expected = {
        "top-right": ((0, cols - 8), (7, cols - 1)),
        "bottom-left": ((rows - 8, 0), (rows - 1, 7)),
        "bottom-right": ((rows - 8, cols - 8), (rows - 1, cols - 1)),
    }[corner]
    assert tuple(red.min(0)) == expected[0] and tuple(red.max(0)) == expected[1]
    assert 0x0112 not in image.getexif()  # not applied a second time by anyone downstream


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert _stored(path, "n_frames") == 3
    image = load_rgb_image(path)
    assert image.mode == "RGB" and image.getpixel((4, 4)) == (255, 0, 0)


def test_rgb_webp_and_bmp_pass_through(tmp_path: Path) -> None:
    source = _noise_rgb(12, 9)
    source.save(tmp_path / "a.bmp")
    assert np.array_equal(np.array(load_rgb_image(tmp_path / "a.bmp")), np.array(source))
    source.save(tmp_path / "b.webp", lossless=True)
    assert np.array_equal(np.array(load_rgb_image(tmp_path / "b.webp")), np.array(source))


# ---------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize(
    ("make", "name", "reason"),
    [
        (_truncated_jpeg, "trunc.jpg", "truncated"),
        (_text_as_jpeg, "notes.jpg", "not an image"),
        (_empty_png, "empty.png", "empty"),
    ],
)
def test_unreadable_files_raise_clear_error(tmp_path: Path, make, name: str, reason: str) -> None:
    path = make(tmp_path / name)
    with pytest.raises(UnreadableImageError) as info:
        load_rgb_image(path)
    message = str(info.value)
    _assert_one_line(message)
    assert name in message and reason in message
    assert isinstance(info.value, BoothkitError) and info.value.path == path


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError, match="does not exist"):
        load_rgb_image(tmp_path / "nope.png")


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _good_jpeg(tmp_path / "big.jpg", (64, 48))
    with pytest.raises(UnreadableImageError, match="too large.*decompression bomb") as info:
        load_rgb_image(path, max_pixels=1000)
    _assert_one_line(str(info.value))
    # Pillow's own hard limit (2 x MAX_IMAGE_PIXELS) is turned into the same kind of error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UnreadableImageError, match="too large"):
        load_rgb_image(path, max_pixels=None)


# ---------------------------------------------------------------------------- listing and folders


def test_list_image_files_filters_and_sorts(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpg", "c.JpEg", ".hidden.jpg", "._a.jpg", "notes.txt", "d.tiff", "e.heic"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    names = [p.name for p in list_image_files(tmp_path, "instance data folder")]
    assert names == ["a.jpg", "b.PNG", "c.JpEg", "d.tiff"]
    assert set(IMAGE_SUFFIXES) >= {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def test_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    with pytest.raises(BoothkitError) as info:
        load_image_folder(folder, "instance data folder")
    assert str(info.value) == f"instance data folder '{folder}' does not exist"


def test_path_is_a_file_not_a_folder(tmp_path: Path) -> None:
    path = _good_jpeg(tmp_path / "one.jpg")
    with pytest.raises(BoothkitError, match="is not a folder"):
        list_image_files(path, "class data folder")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(BoothkitError) as info:
        list_image_files(tmp_path, "instance data folder")
    message = str(info.value)
    _assert_one_line(message)
    assert message.startswith(f"instance data folder '{tmp_path}' contains no images (looked for .jpg, ")


def test_folder_with_only_unsupported_formats_says_so(tmp_path: Path) -> None:
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"x")
    with pytest.raises(BoothkitError, match=r"contains no images .*1 \.heic file\(s\) are not supported"):
        list_image_files(tmp_path, "instance data folder")


def test_folder_with_only_corrupt_files(tmp_path: Path) -> None:
    _truncated_jpeg(tmp_path / "a.jpg")
    _text_as_jpeg(tmp_path / "b.jpg")
    _empty_png(tmp_path / "c.png")
    with pytest.raises(BoothkitError) as info:
        load_image_folder(tmp_path, "instance data folder")
    message = str(info.value)
    _assert_one_line(message)
    assert message.startswith(f"no readable image in instance data folder '{tmp_path}'")
    assert "3 file(s) failed" in message


def test_mixed_folder_loads_good_images_and_warns_once_per_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _good_jpeg(tmp_path / "01.jpg")
    Image.new("RGBA", (30, 40), (0, 0, 0, 0)).save(tmp_path / "02.png")
    _truncated_jpeg(tmp_path / "03.jpg")
    _text_as_jpeg(tmp_path / "04.jpg")
    _empty_png(tmp_path / "05.png")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    loaded = load_image_folder(tmp_path, "instance data folder")
    assert [p.name for p, _ in loaded] == ["01.jpg", "02.png"]
    assert all(image.mode == "RGB" for _, image in loaded)
    assert loaded[1][1].getpixel((0, 0)) == (255, 255, 255)
    messages = _warnings(caplog)
    assert len(messages) == 3
    for name, message in zip(["03.jpg", "04.jpg", "05.png"], messages):
        _assert_one_line(message)
        assert message.startswith(f"skipping unreadable image '{name}' in instance data folder")


def test_small_image_upscale_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _good_jpeg(tmp_path / "big.jpg", (300, 200))
    _good_jpeg(tmp_path / "small.jpg", (100, 80))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    load_image_folder(tmp_path, "instance data folder", min_size=128)
    messages = _warnings(caplog)
    assert len(messages) == 1
    assert "'small.jpg'" in messages[0] and "100x80" in messages[0] and "128" in messages[0]
    caplog.clear()
    load_image_folder(tmp_path, "instance data folder")
    assert _warnings(caplog) == []


# ---------------------------------------------------------------------------- resize and crop


@pytest.mark.parametrize(
    ("size", "expected"),
    [((640, 480), (682, 512)), ((480, 640), (512, 682)), ((300, 300), (512, 512)), ((512, 513), (512, 513))],
)
def test_resized_size_truncates_like_torchvision(size, expected) -> None:
    assert resized_size(size, 512) == expected


@pytest.mark.parametrize("size", [(97, 61), (61, 97), (80, 80), (33, 200)])
@pytest.mark.parametrize("center_crop", [True, False])
def test_prepare_image_output_size(size, center_crop: bool) -> None:
    out = prepare_image(_noise_rgb(*size), 32, center_crop=center_crop, crop_offset=(0.3, 0.9))
    assert out.size == (32, 32) and out.mode == "RGB"


def _resized_array(image: Image.Image, resolution: int) -> np.ndarray:
    size = resized_size(image.size, resolution)
    return np.array(image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None))


def test_center_crop_matches_numpy_reference() -> None:
    image = _noise_rgb(97, 61)
    full = _resized_array(image, 32)  # 50 x 32 -> 18 spare columns
    assert full.shape == (32, 50, 3)
    out = np.array(prepare_image(image, 32, center_crop=True))
    assert np.array_equal(out, full[:, 9:41])
    portrait = _noise_rgb(61, 98)  # 32 x 51 -> 19 spare rows, round(9.5) = 10 like torchvision
    full = _resized_array(portrait, 32)
    assert np.array_equal(np.array(prepare_image(portrait, 32, center_crop=True)), full[10:42])


@pytest.mark.parametrize(("fx", "left"), [(0.0, 0), (0.5, 9), (0.999, 18), (1.0, 18)])
def test_offset_crop_matches_numpy_reference(fx: float, left: int) -> None:
    image = _noise_rgb(97, 61)
    full = _resized_array(image, 32)
    out = np.array(prepare_image(image, 32, center_crop=False, crop_offset=(0.7, fx)))
    assert np.array_equal(out, full[:, left : left + 32])


def test_offset_crop_positions_are_uniform() -> None:
    image = _noise_rgb(40, 10)  # resized 12 x 3 at resolution 3: spare 9 -> 10 positions
    full = _resized_array(image, 3)
    rng = np.random.default_rng(0)
    seen = set()
    for fx in rng.random(200):
        out = np.array(prepare_image(image, 3, center_crop=False, crop_offset=(0.0, float(fx))))
        matches = [j for j in range(10) if np.array_equal(out, full[:, j : j + 3])]
        seen.add(matches[0])
    assert seen == set(range(10))


def test_prepare_image_rejects_bad_offsets() -> None:
    with pytest.raises(ValueError):
        prepare_image(_noise_rgb(20, 10), 8, center_crop=False)
    with pytest.raises(ValueError):
        prepare_image(_noise_rgb(20, 10), 8, center_crop=False, crop_offset=(0.5, 1.5))


def test_crop_is_fixed() -> None:
    assert crop_is_fixed((300, 300), 64)
    assert crop_is_fixed((512, 513), 256)  # 256.5 truncates to 256: square after resizing
    assert not crop_is_fixed((640, 480), 512)
    assert not crop_is_fixed((480, 640), 512)


# ---------------------------------------------------------------------------- tensors


def test_to_tensor_matches_manual_normalisation() -> None:
    image = _noise_rgb(7, 5)
    image.putpixel((0, 0), (0, 255, 128))
    tensor = to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 5, 7)
    expected = (np.array(image).astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert np.array_equal(tensor.numpy(), expected.transpose(2, 0, 1))
    assert tensor[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert tensor.min() >= -1 and tensor.max() <= 1


def test_hflip() -> None:
    tensor = to_tensor(_noise_rgb(6, 4))
    flipped = hflip(tensor)
    assert torch.equal(flipped[..., 0], tensor[..., -1])
    assert torch.equal(hflip(flipped), tensor)


# ---------------------------------------------------------------------------- sample subject


def test_sample_subject_loads() -> None:
    folder = sample_subject_dir()
    assert folder.is_dir()
    assert sample_subject_class() == "dog"
    files = list_image_files(folder, "sample subject folder")
    assert [p.name for p in files] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    loaded = load_image_folder(folder, "sample subject folder")
    assert len(loaded) == 5
    assert all(image.size == (128, 128) and image.mode == "RGB" for _, image in loaded)
    assert (folder.parent / "ATTRIBUTION.md").is_file()
    assert (folder.parent.parent / "prompts_and_classes.txt").is_file()
