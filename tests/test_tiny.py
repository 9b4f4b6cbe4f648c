"""The tiny-model factory: every kind loads with the standard class offline and runs; builds are deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit.errors import BoothkitError
from boothkit.testing.tiny import TINY_KINDS, build_sd_bench, build_tiny

MAIN_WEIGHTS = {
    "sd15": "unet/diffusion_pytorch_model.safetensors",
    "sd21": "unet/diffusion_pytorch_model.safetensors",
    "sdxl": "unet/diffusion_pytorch_model.safetensors",
    "sana": "transformer/diffusion_pytorch_model.safetensors",
    "dino": "model.safetensors",
    "dinov2": "model.safetensors",
    "clip": "model.safetensors",
    "clipseg": "model.safetensors",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: build_tiny(kind, root / kind) for kind in TINY_KINDS}


def _generator():
    return torch.Generator("cpu").manual_seed(0)


def _photo(width: int = 40, height: int = 30) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run_pipeline(folder) -> np.ndarray:
    """Load a diffusers folder with `DiffusionPipeline` (every component of model_index.json with the class it
    names) and generate one image with one step."""
    import inspect

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    for name, spec in json.loads((folder / "model_index.json").read_text()).items():
        if not name.startswith("_") and isinstance(spec, list) and spec[1] is not None:
            assert type(getattr(pipe, name)).__name__ == spec[1], name
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    size = denoiser.config.sample_size * pipe.vae_scale_factor
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in inspect.signature(pipe).parameters else {}
    pipe.set_progress_bar_config(disable=True)
    return pipe("a sks dog", num_inference_steps=1, height=size, width=size, output_type="np",
                generator=_generator(), **extra).images


def _run_transformers_model(folder) -> list[torch.Tensor]:
    """Load a transformers folder with `AutoModel` (no weight left random) and its image processor (and tokenizer
    when the model has a text tower), and embed a photo (and a text)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    pixels = AutoImageProcessor.from_pretrained(folder)(images=[_photo()], return_tensors="pt").pixel_values
    with torch.no_grad():
        if hasattr(model, "get_text_features"):
            tokens = AutoTokenizer.from_pretrained(folder)(["a sks dog"], return_tensors="pt")
            return [model.get_image_features(pixel_values=pixels).pooler_output,
                    model.get_text_features(**tokens).pooler_output]
        return [model.eval()(pixel_values=pixels).last_hidden_state]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_every_listed_kind_builds_loads_and_runs(tiny, kind):
    """Each kind `boothkit tiny` offers builds, loads with the standard `from_pretrained` and produces finite
    output: a kind listed without a builder, or whose folder lacks a file its loader needs, fails here."""
    folder = tiny[kind]
    manifest = json.loads((folder / ".boothkit-manifest.json").read_text())
    assert manifest["command"] == "tiny" and manifest["files"] == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if (folder / "model_index.json").is_file():
        outputs = [_run_pipeline(folder)]
    else:
        outputs = _run_transformers_model(folder)
    for output in outputs:
        assert output.size != 0 if isinstance(output, np.ndarray) else output.numel() != 0
        assert np.isfinite(np.asarray(output)).all()


def test_unknown_kind_raises(tmp_path):
    with pytest.raises(BoothkitError) as info:
        build_tiny("sd3", tmp_path / "x")
    message = str(info.value)
    assert "\n" not in message
    assert all(kind in message for kind in TINY_KINDS)
    assert not (tmp_path / "x").exists()


def test_replaces_only_empty_folders_and_earlier_builds(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_tiny("dino", empty) == empty
    (empty / "notes.txt").write_text("mine")
    assert build_tiny("clip", empty, seed=3) == empty  # the earlier build's files are replaced, not merged
    assert not (empty / "preprocessor_config.json").exists() and (empty / "processor_config.json").exists()
    assert (empty / "notes.txt").read_text() == "mine"
    assert build_tiny("sd15", empty) == empty and build_tiny("dino", empty) == empty
    assert sorted(p.name for p in empty.iterdir()) == sorted(
        [".boothkit-manifest.json", "config.json", "model.safetensors", "notes.txt", "preprocessor_config.json"])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BoothkitError):
        build_tiny("clip", foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_folder_is_small(tiny, kind):
    assert _folder_bytes(tiny[kind]) < 5 * 1024 * 1024


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_deterministic_per_seed(tiny, tmp_path, kind):
    state = torch.get_rng_state()
    again = build_tiny(kind, tmp_path / "again", seed=0)
    other = build_tiny(kind, tmp_path / "other", seed=1)
    assert torch.equal(state, torch.get_rng_state()), "building must not disturb the global RNG"
    weights = MAIN_WEIGHTS[kind]
    reference = (tiny[kind] / weights).read_bytes()
    assert (again / weights).read_bytes() == reference
    assert (other / weights).read_bytes() != reference


@pytest.mark.parametrize(
    ("kind", "prediction_type"), [("sd15", "epsilon"), ("sd21", "v_prediction"), ("sdxl", "epsilon")]
)
def test_sd_family_pipeline_runs(tiny, kind, prediction_type):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny[kind])
    assert isinstance(pipe, StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline)
    assert pipe.scheduler.config.prediction_type == prediction_type
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert resolution == 32
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of sks dog", num_inference_steps=2, output_type="np", generator=_generator()).images
    assert images.shape == (1, resolution, resolution, 3)
    assert np.isfinite(images).all()


def test_sana_pipeline_runs(tiny):
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    pipe = SanaPipeline.from_pretrained(tiny["sana"])
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.prediction_type == "flow_prediction"
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    # The default call prepends SANA's long "complex human instruction" and keeps 300 text tokens.
    images = pipe(
        prompt="a sks dog",
        num_inference_steps=2,
        height=size,
        width=size,
        use_resolution_binning=False,
        output_type="np",
        generator=_generator(),
    ).images
    assert images.shape == (1, size, size, 3)
    assert np.isfinite(images).all()


def test_dino_embeds_images(tiny):
    from transformers import AutoImageProcessor, ViTModel

    processor = AutoImageProcessor.from_pretrained(tiny["dino"])
    model = ViTModel.from_pretrained(tiny["dino"]).eval()
    pixels = processor(images=[_photo(), _photo(30, 50)], return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 224, 224)
    with torch.no_grad():
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    assert cls.shape == (2, model.config.hidden_size)
    assert torch.isfinite(cls).all()


def test_dinov2_is_shaped_like_dinov2_small(tiny):
    """facebook/dinov2-small: 14 px patches, position embeddings for 518 px, BitImageProcessor with shorter side
    256 (bicubic), 224 crop, ImageNet mean/std; 224 px inputs give 16 x 16 patches + the CLS token."""
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(tiny["dinov2"]).eval()
    assert (model.config.patch_size, model.config.image_size) == (14, 518)
    processor = AutoImageProcessor.from_pretrained(tiny["dinov2"])
    assert type(processor).__name__.startswith("BitImageProcessor")
    assert (processor.size.shortest_edge, processor.crop_size.height, processor.crop_size.width) == (256, 224, 224)
    assert int(processor.resample) == int(Image.Resampling.BICUBIC)
    assert tuple(processor.image_mean) == (0.485, 0.456, 0.406) and tuple(processor.image_std) == (0.229, 0.224, 0.225)
    pixels = processor(images=[_photo(), _photo(30, 50)], return_tensors="pt").pixel_values
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (2, 16 * 16 + 1, model.config.hidden_size) and torch.isfinite(hidden).all()


def test_clip_embeds_text_and_images(tiny):
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(tiny["clip"])
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    inputs = processor(
        text=["a photo of sks dog", "a cat"], images=[_photo()], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
        text = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output
    assert image.shape == (1, 16) and text.shape == (2, 16)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()
    assert not torch.allclose(text[0], text[1])


def test_clip_tokenizer_covers_text_and_round_trips(tiny):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny["sd15"] / "tokenizer")
    assert tokenizer.model_max_length == 77
    dog = tokenizer("a photo of sks dog").input_ids
    assert dog != tokenizer("a photo of sks cat").input_ids
    assert "sks</w>" in tokenizer.convert_ids_to_tokens(dog)
    text = "Naïve café, 日本 😀!"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True).replace(" ", "") == (
        text.lower().replace(" ", "")
    )
    assert tokenizer.unk_token_id not in tokenizer(text).input_ids[1:-1]


def test_gemma_tokenizer_covers_text(tiny):
    from transformers import GemmaTokenizer

    tokenizer = GemmaTokenizer.from_pretrained(tiny["sana"] / "tokenizer")
    assert tokenizer.padding_side == "right"
    ids = tokenizer("Héllo\nworld 日本").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Héllo\nworld 日本"
    assert tokenizer("a sks dog").input_ids != tokenizer("a sks cat").input_ids


def test_sd_bench_shape(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    out = build_sd_bench(tmp_path / "bench")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    params = sum(p.numel() for p in unet.parameters())
    assert 30e6 < params < 40e6, params
    vae = AutoencoderKL.load_config(out / "vae")
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    assert scale == 8 and unet.config.sample_size * scale == 512
    text = CLIPTextConfig.from_pretrained(out / "text_encoder")
    assert text.hidden_size == unet.config.cross_attention_dim == 256
