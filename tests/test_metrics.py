"""DINO, CLIP-I, CLIP-T: equal to their definitions computed by hand with transformers, and to torchmetrics' CLIPScore.

The hand computations below are written independently of `boothkit.evaluate.metrics`: images go through the
transformers image processors (boothkit has its own Pillow/numpy preprocessing), embeddings come from the models'
forward passes rather than `get_*_features`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit.data.images import load_image_folder, sample_subject_dir
from boothkit.errors import BoothkitError
from boothkit.evaluate.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    ImagePreprocessing,
    SubjectMetrics,
    mean_cosine,
    model_preprocessing,
    strip_identifier,
)
from boothkit.evaluate.score import ScoreConfig, run_score
from boothkit.testing.tiny import build_tiny

PROMPT = "a photo of sks dog in the snow"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric-models")
    return {kind: build_tiny(kind, root / kind, 0) for kind in ("dino", "dinov2", "clip")}


@pytest.fixture(scope="module")
def metrics(models) -> SubjectMetrics:
    return SubjectMetrics(str(models["dino"]), str(models["clip"]), device="cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Generated images of several sizes and aspect ratios (PNG, so they read back identical) and the sample dog."""
    generated = tmp_path_factory.mktemp("generated")
    rng = np.random.default_rng(0)
    # 160 x 90 (16:9) resized to 455 x 256 leaves an odd margin of 231 around a 224 crop: transformers floors the
    # offset (115), torchvision rounds it (116).
    for index, (width, height) in enumerate([(64, 48), (100, 100), (48, 80), (300, 257), (160, 90)]):
        base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        smooth = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
        noisy = np.clip(np.asarray(smooth, dtype=np.int16) + rng.integers(-20, 21, (height, width, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(generated / f"{index:02d}.png")
    return generated, sample_subject_dir()


def _images(folder) -> list[Image.Image]:
    return [image for _, image in load_image_folder(folder)]


# ---------------------------------------------------------------------------------------------------------------
# Hand computations


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.double() / a.double().norm(dim=-1, keepdim=True)
    b = b.double() / b.double().norm(dim=-1, keepdim=True)
    return a @ b.T


def _dino_by_hand(model_dir, generated, references, processor=None) -> float:
    """Mean cosine of CLS embeddings: ViT's last_hidden_state[:, 0], DINOv2's pooler output (its CLS token after
    the final layer norm); pixels from `processor`, by default the model's own transformers image processor."""
    from transformers import AutoConfig, AutoImageProcessor, Dinov2Model, ViTModel

    if AutoConfig.from_pretrained(model_dir).model_type == "dinov2":
        model = Dinov2Model.from_pretrained(model_dir).eval()

        def cls_token(output):
            return output.pooler_output
    else:
        model = ViTModel.from_pretrained(model_dir, add_pooling_layer=False).eval()

        def cls_token(output):
            return output.last_hidden_state[:, 0]
    processor = processor or AutoImageProcessor.from_pretrained(model_dir, backend="pil")

    def cls(images):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return cls_token(model(pixel_values=pixels))

    return float(_cosines(cls(generated), cls(references)).mean())


def _protocol_processor(shortest_edge: int, crop: int):
    """The DINO evaluation preprocessing as a transformers image processor: bicubic, centre crop, ImageNet."""
    from transformers import BitImageProcessorPil
    from transformers.image_utils import PILImageResampling

    return BitImageProcessorPil(size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop},
                                resample=PILImageResampling.BICUBIC, image_mean=[0.485, 0.456, 0.406],
                                image_std=[0.229, 0.224, 0.225])


def _tiny_vit(folder: Path, image_size: int, processor=None) -> Path:
    """A random 2-layer DINO-like ViT of `image_size` (8 px patches), with `processor` saved beside it if given."""
    from transformers import ViTConfig, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(image_size)
        model = ViTModel(ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=37), add_pooling_layer=False)
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def _clip_by_hand(model_dir, generated, references, text: str) -> tuple[float, float, torch.Tensor]:
    """CLIP-I, CLIP-T and the per-image text cosines, from the towers and projections of `CLIPModel`."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)

    def image_embeds(images):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)

    with torch.no_grad():
        generated_embeds, reference_embeds = image_embeds(generated), image_embeds(references)
        tokens = processor(text=[text], return_tensors="pt")
        text_embeds = model.text_projection(model.text_model(**tokens).pooler_output)
    per_image = _cosines(generated_embeds, text_embeds)[:, 0]
    return float(_cosines(generated_embeds, reference_embeds).mean()), float(per_image.mean()), per_image


# ---------------------------------------------------------------------------------------------------------------
# strip_identifier


@pytest.mark.parametrize("prompt, identifier, expected", [
    ("a sks dog in the snow", "sks", "a dog in the snow"),
    ("sks dog", "sks", "dog"),
    ("a photo of sks", "sks", "a photo of"),
    ("a  sks   dog\tin the snow ", "sks", "a dog in the snow"),
    ("she asks the sks dog", "sks", "she asks the dog"),
    ("a sksx dog, sks_dog and xsks", "sks", "a sksx dog, sks_dog and xsks"),
    ("a photo of sks, in the snow", "sks", "a photo of, in the snow"),
    ("a sks sks dog", "sks", "a dog"),
    ("a <v> dog", "<v>", "a dog"),
    ("a zwx cat", "sks", "a zwx cat"),
])
def test_strip_identifier(prompt, identifier, expected):
    assert strip_identifier(prompt, identifier) == expected


def test_strip_identifier_default_is_sks():
    assert strip_identifier("a sks dog") == "a dog"


# ---------------------------------------------------------------------------------------------------------------
# The metrics against their definitions


# The legacy preprocessor_config.json that facebook/dino-vits16 ships (a ViTFeatureExtractor: a square 224 px
# bilinear resize, no crop, ImageNet mean/std).
DINO_VITS16_PROCESSOR = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                         "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2,
                         "size": 224}


def _processor_folder(folder: Path, settings: dict) -> Path:
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="module")
def processor_folders(models, tmp_path_factory):
    """Folders whose image processor config boothkit must follow: the tiny DINO (ViTImageProcessor, 256/224
    bicubic), the tiny DINOv2 (BitImageProcessor as facebook/dinov2-small), facebook/dino-vits16's legacy file,
    the tiny CLIP (nested in processor_config.json, OpenAI mean/std) and a shorter side below the crop (padding)."""
    root = tmp_path_factory.mktemp("processors")
    padded = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 40},
              "crop_size": {"height": 48, "width": 44}, "resample": 1, "do_normalize": False}
    return {"dino": models["dino"], "dinov2": models["dinov2"], "clip": models["clip"],
            "dino-vits16": _processor_folder(root / "dino-vits16", DINO_VITS16_PROCESSOR),
            "padded": _processor_folder(root / "padded", padded)}


@pytest.mark.parametrize("source", ["dino", "dinov2", "dino-vits16", "clip", "padded"])
def test_preprocessing_equals_the_transformers_image_processor(processor_folders, folders, source):
    from transformers import AutoImageProcessor

    folder = str(processor_folders[source])
    ours = model_preprocessing("DINO", folder, model_config=None)
    reference = AutoImageProcessor.from_pretrained(folder, backend="pil")
    for image in _images(folders[0]) + _images(folders[1]):
        expected = reference(images=[image], return_tensors="np")["pixel_values"][0]
        pixels = ours.pixels(image)
        assert pixels.dtype == np.float32 and pixels.shape == expected.shape == (3, *ours.output_size)
        np.testing.assert_allclose(pixels, expected, atol=1e-5, rtol=0)


def test_processor_settings_are_read(processor_folders):
    bicubic, bilinear = int(Image.Resampling.BICUBIC), int(Image.Resampling.BILINEAR)
    dinov2 = model_preprocessing("DINO", str(processor_folders["dinov2"]), model_config=None)
    assert dinov2 == ImagePreprocessing(shortest_edge=256, resample=bicubic, crop=(224, 224))
    vits16 = model_preprocessing("DINO", str(processor_folders["dino-vits16"]), model_config=None)
    assert vits16 == ImagePreprocessing(resize_to=(224, 224), resample=bilinear, crop=None)
    clip = model_preprocessing("DINO", str(processor_folders["clip"]), model_config=None)
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and clip.crop == (32, 32)


@pytest.mark.parametrize(("image_size", "shortest_edge"), [(224, 256), (32, 37), (518, 592)])
def test_without_processor_config_the_dino_protocol_scales_to_image_size(tmp_path, folders, image_size,
                                                                         shortest_edge):
    from transformers import ViTConfig

    (tmp_path / "config.json").write_text(ViTConfig(image_size=image_size).to_json_string())
    ours = model_preprocessing("DINO", str(tmp_path), ViTConfig(image_size=image_size))
    assert ours == ImagePreprocessing(shortest_edge=shortest_edge, crop=(image_size, image_size))
    reference = _protocol_processor(shortest_edge, image_size)
    for image in _images(folders[0]):
        expected = reference(images=[image], return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours.pixels(image), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dino", "dinov2"])
def test_dino_equals_definition(models, folders, kind):
    metrics = SubjectMetrics(str(models[kind]), str(models["clip"]), device="cpu")
    generated, references = _images(folders[0]), _images(folders[1])
    scores = metrics.score(generated, None, metrics.references(references))
    assert scores["DINO"] == pytest.approx(_dino_by_hand(models[kind], generated, references), abs=1e-5)


def test_dinov2_is_loaded_as_dinov2(models):
    from transformers import Dinov2Model

    embedder = DinoEmbedder(str(models["dinov2"]), device="cpu")
    assert isinstance(embedder.model, Dinov2Model) and embedder.preprocessing.output_size == (224, 224)


def test_dino_of_another_image_size_scores(models, folders, tmp_path):
    """A 32 px ViT scores: with its own processor config (shorter side 36, crop 32, bilinear) and without one
    (DINO protocol at 32 px: shorter side 37, crop 32, bicubic, ImageNet)."""
    from transformers import ViTImageProcessorPil

    own = ViTImageProcessorPil(size={"shortest_edge": 36}, do_center_crop=True, crop_size={"height": 32, "width": 32})
    cases = [(_tiny_vit(tmp_path / "vit32-own", 32, own), None),
             (_tiny_vit(tmp_path / "vit32-bare", 32), _protocol_processor(37, 32))]
    generated, references = _images(folders[0]), _images(folders[1])
    for folder, processor in cases:
        result = run_score(_config(models, folders, dino_model=str(folder)))
        assert result["DINO"] == pytest.approx(_dino_by_hand(folder, generated, references, processor), abs=1e-5)


def test_dino_preprocessing_errors_are_one_line(tmp_path):
    from transformers import ViTImageProcessorPil

    crop224 = ViTImageProcessorPil(size={"shortest_edge": 256}, do_center_crop=True,
                                   crop_size={"height": 224, "width": 224})
    no_crop = ViTImageProcessorPil(size={"shortest_edge": 32}, do_center_crop=False)
    longest = ViTImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 64}, do_center_crop=True,
                                   crop_size={"height": 32, "width": 32})
    cases = [
        (crop224, "gives 224x224 images but the model's image_size is 32x32"),
        (no_crop, "gives images of varying size"),
        (longest, "unusable image processor config .*not supported"),
    ]
    for index, (processor, pattern) in enumerate(cases):
        folder = _tiny_vit(tmp_path / str(index), 32, processor)
        with pytest.raises(BoothkitError, match=pattern) as info:
            DinoEmbedder(str(folder), device="cpu")
        assert "\n" not in str(info.value)


def test_clip_i_and_clip_t_equal_definition(models, metrics, folders):
    generated, references = _images(folders[0]), _images(folders[1])
    scores = metrics.score(generated, PROMPT, metrics.references(references))
    clip_i, clip_t, _ = _clip_by_hand(models["clip"], generated, references, "a photo of dog in the snow")
    assert scores["CLIP-I"] == pytest.approx(clip_i, abs=1e-5)
    assert scores["CLIP-T"] == pytest.approx(clip_t, abs=1e-5)
    assert (scores["n_images"], scores["n_references"]) == (5, 5)


def test_keep_identifier_scores_the_prompt_as_written(models, metrics, folders):
    generated, references = _images(folders[0]), _images(folders[1])
    refs = metrics.references(references)
    kept = metrics.score(generated, PROMPT, refs, keep_identifier=True)["CLIP-T"]
    stripped = metrics.score(generated, PROMPT, refs)["CLIP-T"]
    assert kept == pytest.approx(_clip_by_hand(models["clip"], generated, references, PROMPT)[1], abs=1e-5)
    assert kept != pytest.approx(stripped, abs=1e-6)
    other = metrics.score(generated, "a photo of zwx dog in the snow", refs, identifier="zwx")["CLIP-T"]
    assert other == pytest.approx(stripped, abs=1e-6)


def test_clip_t_agrees_with_torchmetrics(models, metrics, folders):
    """torchmetrics 1.9 calls `get_*_features` and expects tensors; transformers 5 returns output objects whose
    `pooler_output` is the projected embedding, so its model is wrapped to return that tensor. Its per-call score
    is max(100 * mean cos, 0), hence one call per image (per-image clip) and one call over all images."""
    pytest.importorskip("torchmetrics")
    from torchmetrics.functional.multimodal import clip_score
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class TensorFeatures(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            output = self.model.get_image_features(*args, **kwargs)
            return output if isinstance(output, torch.Tensor) else output.pooler_output

        def get_text_features(self, *args, **kwargs):
            output = self.model.get_text_features(*args, **kwargs)
            return output if isinstance(output, torch.Tensor) else output.pooler_output

    def load():
        return TensorFeatures(CLIPModel.from_pretrained(models["clip"]).eval()), CLIPProcessor.from_pretrained(
            models["clip"])

    generated = _images(folders[0])
    tensors = [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in generated]
    text = strip_identifier(PROMPT)
    ours = metrics.clip.embed_images(generated) @ metrics.clip.embed_texts([text]).T
    assert (ours > 0).any()  # the clipping at 0 does not make the comparison vacuous
    for tensor, cosine in zip(tensors, ours[:, 0].tolist()):
        expected = 100 * max(cosine, 0.0)
        assert float(clip_score(tensor, text, model_name_or_path=load).detach()) == pytest.approx(expected, abs=1e-3)
    metric = CLIPScore(model_name_or_path=load)
    metric.update(tensors, [text] * len(tensors))
    clip_t = metrics.score(generated, PROMPT, metrics.references(generated[:1]))["CLIP-T"]
    assert clip_t > 0  # torchmetrics clips the mean at 0
    assert float(metric.compute().detach()) == pytest.approx(100 * max(clip_t, 0.0), abs=1e-3)


def test_embeddings_are_unit_norm_and_batched(models, metrics, folders, monkeypatch):
    import boothkit.evaluate.metrics as module

    generated = _images(folders[0])
    whole = metrics.dino.embed(generated)
    monkeypatch.setattr(module, "BATCH_SIZE", 3)
    chunked = metrics.dino.embed(generated)
    assert whole.dtype == torch.float32 and whole.shape == (5, 32)
    torch.testing.assert_close(whole.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(whole, chunked, atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics.clip.embed_images(generated).norm(dim=-1), torch.ones(5))


def test_long_texts_are_truncated(metrics):
    long_text = " ".join(["a sks dog in the snow"] * 60)  # far more than 77 tokens
    embeds = metrics.clip.embed_texts([long_text, "a dog"])
    assert embeds.shape == (2, 16) and torch.isfinite(embeds).all()
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(2))


def test_mean_cosine():
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    b = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]), dim=-1)
    expected = (2 ** -0.5 + 1 - 1 + 2 ** -0.5 + 0 + 0) / 6
    assert mean_cosine(a, b) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------------
# boothkit score


def _config(models, folders, **overrides) -> ScoreConfig:
    values = {"images": str(folders[0]), "references": str(folders[1]), "dino_model": str(models["dino"]),
              "clip_model": str(models["clip"])}
    return ScoreConfig(**{**values, **overrides})


def test_run_score_matches_subject_metrics(models, metrics, folders):
    result = run_score(_config(models, folders, prompt=PROMPT))
    generated, references = _images(folders[0]), _images(folders[1])
    expected = metrics.score(generated, PROMPT, metrics.references(references))
    assert set(result) == {"DINO", "CLIP-I", "CLIP-T", "DINO-D", "CLIP-D", "n_images", "n_references"}
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6)
    json.dumps(result)  # printable as JSON


def test_no_prompt_no_clip_t(models, folders):
    result = run_score(_config(models, folders))
    assert set(result) == {"DINO", "CLIP-I", "DINO-D", "CLIP-D", "n_images", "n_references"}
    assert all(np.isfinite(value) for value in result.values())


def test_missing_or_empty_folders(models, folders, tmp_path):
    with pytest.raises(BoothkitError, match="generated image folder .* does not exist"):
        run_score(_config(models, folders, images=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BoothkitError, match="reference image folder .* contains no images"):
        run_score(_config(models, folders, references=str(tmp_path / "empty")))


def test_bad_model_paths(models, tmp_path):
    from safetensors.torch import load_file, save_file

    (tmp_path / "empty").mkdir()
    partial = tmp_path / "partial"
    shutil.copytree(models["dino"], partial)
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layer.1." not in k}, partial / "model.safetensors")
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["clip"] / name, no_processor / name)
    cases = [
        (DinoEmbedder, tmp_path / "missing", "cannot load DINO model .*: no such folder"),
        (DinoEmbedder, tmp_path / "empty", "cannot load DINO model .*: no model config"),
        (DinoEmbedder, models["dino"] / "config.json", "cannot load DINO model .*: is a file"),
        (DinoEmbedder, models["clip"], "cannot load DINO model .*'clip' model, not 'vit' or 'dinov2'"),
        (DinoEmbedder, partial, "cannot load DINO model .*not a ViTModel checkpoint .*missing"),
        (ClipEmbedder, tmp_path / "missing", "cannot load CLIP model .*: no such folder"),
        (ClipEmbedder, models["dino"], "cannot load CLIP model .*'vit' model, not 'clip'"),
        (ClipEmbedder, models["dinov2"], "cannot load CLIP model .*'dinov2' model, not 'clip'"),
        (ClipEmbedder, no_processor, "cannot load CLIP model .*no usable processor"),
    ]
    for embedder, path, pattern in cases:
        with pytest.raises(BoothkitError, match=pattern) as info:
            embedder(str(path), device="cpu")
        assert "\n" not in str(info.value)


def test_config_is_validated(models, folders):
    with pytest.raises(ValueError):
        _config(models, folders, identifier="two words")
    with pytest.raises(ValueError):
        _config(models, folders, promt="typo")


@pytest.mark.parametrize("dino", ["dino", "dinov2"])
def test_score_cli(run_cli, models, folders, dino):
    """`boothkit score` is a registered command (an unknown one exits 2) and prints run_score's JSON."""
    result = run_cli("score", "--images", folders[0], "--references", folders[1], "--prompt", PROMPT,
                     "--dino_model", models[dino], "--clip_model", models["clip"])
    assert result.code == 0, result.err
    scores = json.loads(result.out.strip().splitlines()[-1])
    expected = run_score(_config(models, folders, prompt=PROMPT, dino_model=str(models[dino])))
    assert scores == pytest.approx(expected, abs=1e-6)
