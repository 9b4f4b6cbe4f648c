"""PDMBooth (issue 14): masked instance loss and the PDM term, on tiny models."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boothkit.config import validate_config
from boothkit.data.images import load_image_folder, sample_subject_dir
from boothkit.families import FamilyOptions, load_family
from boothkit.testing.tiny import build_tiny
from boothkit.train.concepts import ConceptImages, concepts_of
from boothkit.train.config import TrainConfig
from boothkit.train.data import ImageGeometry, ImageOptions
from boothkit.train.losses import pdm_distance, weighted_mean
from boothkit.train.regularizers import prepare_regularizers
from test_sdxl import sdxl  # noqa: F401  (fixture)
from test_train import assert_one_line_error

PROMPTS = ["--instance_prompt", "a photo of sks dog", "--class_prompt", "a photo of dog"]


@pytest.fixture(scope="module")
def clipseg(tmp_path_factory) -> Path:
    return build_tiny("clipseg", tmp_path_factory.mktemp("clipseg") / "seg")


def masks_like(photos: Path, folder: Path, value) -> Path:
    """One mask per photo (same stem): `value(width, height)` gives its pixels."""
    folder.mkdir()
    for photo in sorted(photos.iterdir()):
        with Image.open(photo) as image:
            Image.fromarray(value(*image.size)).save(folder / f"{photo.stem}.png")
    return folder


def losses(out: Path) -> list[float]:
    with open(out / "train_log.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def train(run_cli, sd15, out, *extra):
    result = run_cli("train", "--pretrained_model_name_or_path", sd15, "--instance_data_dir", sample_subject_dir(),
                     "--output_dir", out, "--max_train_steps", "3", *PROMPTS, *extra)
    assert result.code == 0, result.err
    return out


def test_weighted_mean_is_the_plain_mean_with_ones_and_zero_without_gradient_with_zeros():
    values = torch.rand(3, 4, 8, 8, requires_grad=True)
    assert torch.equal(weighted_mean(values, torch.ones(3, 1, 8, 8)), values.flatten(1).mean(1))
    zero = weighted_mean(values ** 2, torch.zeros(3, 1, 8, 8))
    zero.sum().backward()
    assert torch.equal(zero, torch.zeros(3)) and torch.equal(values.grad, torch.zeros_like(values))
    weights = torch.rand(3, 1, 8, 8)
    expected = [(values[i] * weights[i]).sum() / (weights[i].sum() * 4) for i in range(3)]
    assert torch.allclose(weighted_mean(values, weights), torch.stack(expected))


def test_an_all_white_mask_trains_exactly_as_no_mask(run_cli, sd15, tmp_path):
    white = masks_like(sample_subject_dir(), tmp_path / "white", lambda w, h: np.full((h, w), 255, np.uint8))
    plain = train(run_cli, sd15, tmp_path / "plain")
    masked = train(run_cli, sd15, tmp_path / "masked", "--mask_dm", "--mask_dir", white)
    assert losses(masked) == losses(plain)
    assert sorted(p.name for p in (masked / "masks").iterdir())[:2] == ["00_00.png", "00_00_overlay.png"]


def test_a_black_mask_without_background_gives_no_instance_gradient(run_cli, sd15, tmp_path):
    from safetensors.torch import load_file

    black = masks_like(sample_subject_dir(), tmp_path / "black", lambda w, h: np.zeros((h, w), np.uint8))
    out = train(run_cli, sd15, tmp_path / "out", "--mask_dm", "--mask_dir", black)
    assert losses(out) == [0.0, 0.0, 0.0]
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    ups = [name for name in lora if "lora_B" in name or "lora.up" in name]
    assert ups and all(not lora[name].any() for name in ups)  # B starts at 0 and never moved
    half = train(run_cli, sd15, tmp_path / "half", "--mask_dm", "--mask_dir", black, "--background_loss_weight", "0.5")
    assert all(loss > 0 for loss in losses(half))


def test_the_mask_follows_the_crop_and_flip_of_the_drawn_sample(tmp_path):
    from boothkit.train.regularizers import Regularizers

    left = Image.fromarray(np.tile((np.arange(64) < 32).astype(np.uint8) * 255, (64, 1)))
    config = validate_config(TrainConfig, {"pretrained_model_name_or_path": "m", "instance_data_dir": "d",
                                           "instance_prompt": "p", "output_dir": "o", "mask_dm": True})
    regularizers = Regularizers(config, ImageOptions(64, True, True, True), masks=[left])
    plain = regularizers.instance_weights(0, ImageGeometry((64, 64), (0, 0)), (8, 8))[0, 0]
    mirrored = regularizers.instance_weights(0, ImageGeometry((64, 64), (0, 0), flip=True), (8, 8))[0, 0]
    assert torch.equal(plain[:, :4], torch.ones(8, 4)) and torch.equal(plain[:, 4:], torch.zeros(8, 4))
    assert torch.equal(mirrored, plain.flip(-1))


def pdm_setup(sd15, photos: Path, out: Path, *extra: str):
    """The tiny model, the run's config and its regularizers, prepared as `boothkit train` prepares them."""
    values = {"pretrained_model_name_or_path": str(sd15), "instance_data_dir": str(photos),
              "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog", "output_dir": str(out),
              "use_pdm": True, "pdm_inversion_steps": 6, "pdm_timesteps": 3}
    values.update(dict(zip(extra[::2], extra[1::2])))
    config = validate_config(TrainConfig, values)
    family = load_family(str(sd15), None, None, torch.float32, FamilyOptions.from_config(config))
    images = ConceptImages(concepts_of(config), [load_image_folder(photos)])
    options = ImageOptions(family.default_resolution, False, False, True)
    return config, family, images, prepare_regularizers(config, family, images, options, None, torch.device("cpu"))


def count_unet_calls(family) -> list:
    calls = []
    family.denoiser.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_pdm_targets_are_cached_by_content(sd15, tmp_path):
    photos = shutil.copytree(sample_subject_dir(), tmp_path / "photos")
    config, family, images, first = pdm_setup(sd15, photos, tmp_path / "o")
    assert len(first.targets) == 5 and first.targets[0].queries.dtype == torch.float16
    assert first.targets[0].timesteps.tolist() == sorted(first.targets[0].timesteps.tolist())
    calls = count_unet_calls(family)
    again = prepare_regularizers(config, family, images, first.options, None, torch.device("cpu"))
    assert calls == [] and all(torch.equal(a.queries, b.queries) for a, b in zip(first.targets, again.targets))
    photo = sorted(photos.iterdir())[2]
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo)  # one photo changes
    changed = ConceptImages(concepts_of(config), [load_image_folder(photos)])
    third = prepare_regularizers(config, family, changed, first.options, None, torch.device("cpu"))
    assert len(calls) == config.pdm_inversion_steps  # that photo only, inverted again
    assert not torch.equal(third.targets[2].queries, first.targets[2].queries)
    assert torch.equal(third.targets[1].queries, first.targets[1].queries)


def test_the_pdm_term_is_zero_before_training_and_grows_after_a_step(sd15, run_cli, tmp_path):
    from boothkit.train.lora import attach_adapters, lora_targets

    config, family, images, regularizers = pdm_setup(sd15, sample_subject_dir(), tmp_path / "o")
    trainable = attach_adapters(config, family, torch.float32, lora_targets(config, family))
    prompt = family.encode_prompts(["a photo of dog"], torch.device("cpu"))
    rows = [(index, 0, position) for index, position in zip(range(5), range(10, 15))]
    for row in rows:  # one row a step (the DreamBooth batch): the very computation the targets came from
        term = regularizers.pdm_term(family, family.denoiser, [row], 0, lambda _: prompt, family.default_resolution)
        assert torch.equal(term, torch.zeros(1))  # the LoRA's B is 0: the trained model is the frozen one
    term = regularizers.pdm_term(family, family.denoiser, rows, 0, lambda _: prompt, family.default_resolution)
    assert term.max() < 1e-8  # a batch of rows reassociates float sums: 0 up to rounding
    with torch.no_grad():  # the LoRA moved (any step moves B away from 0)
        for name, parameter in family.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    term = regularizers.pdm_term(family, family.denoiser, rows, 0, lambda _: prompt, family.default_resolution)
    assert (term > 0).all()
    term.sum().backward()
    trained = {id(p) for module in trainable.values() for p in module.parameters() if p.requires_grad}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in family.denoiser.parameters()
               if id(p) in trained)
    assert all(p.grad is None for p in family.denoiser.parameters() if id(p) not in trained)


def test_a_pdm_run_trains_and_its_loss_differs_from_dreambooth(run_cli, sd15, clipseg, tmp_path):
    plain = train(run_cli, sd15, tmp_path / "plain")
    pdm = train(run_cli, sd15, tmp_path / "pdm", "--use_pdm", "--pdm_inversion_steps", "6", "--pdm_timesteps", "3",
                "--mask_pdm", "--mask_dm", "--mask_model", clipseg, "--pdm_loss_weight", "100")
    assert losses(pdm)[0] != losses(plain)[0] or losses(pdm)[1:] != losses(plain)[1:]
    assert len(list((pdm / "masks").glob("*_overlay.png"))) == 5


def test_segmentation_masks_are_computed_once_then_cached(clipseg, monkeypatch):
    from boothkit.data import masks

    photos = sorted(sample_subject_dir().iterdir())
    first = masks.segmentation_masks(photos, "a photo of dog", str(clipseg))
    assert [m.size for m in first] == [Image.open(p).size for p in photos] and {m.mode for m in first} == {"L"}
    monkeypatch.setattr(masks, "_Segmenter", lambda *a: pytest.fail("the cache should have answered"))
    again = masks.segmentation_masks(photos, "a photo of dog", str(clipseg))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    monkeypatch.undo()
    other = masks.segmentation_masks(photos[:1], "a photo of cat", str(clipseg))  # another prompt: computed
    assert len(other) == 1


def test_pdm_distance_masks_tokens():
    features, targets = torch.rand(2, 16, 4), torch.rand(2, 16, 4).half()
    weights = torch.zeros(2, 16)
    weights[:, :4] = 1
    expected = ((features[:, :4].half().float() - targets[:, :4].float()) ** 2).mean((1, 2))
    assert torch.allclose(pdm_distance(features, targets, weights), expected)


@pytest.mark.parametrize("flags,message", [
    (["--mask_pdm"], "--mask_pdm masks the PDM term: add --use_pdm"),
    (["--background_loss_weight", "0.5"], "add --mask_dm"),
    (["--no_use_inst_loss"], "leaves nothing to train"),
    (["--mask_dm", "--mask_dir", "/nonexistent"], "is not a folder"),
    (["--use_pdm", "--pdm_layer", "down_blocks.0"], "is no attention module"),
])
def test_bad_pdm_flags_end_in_one_line(run_cli, sd15, tmp_path, flags, message):
    assert_one_line_error(run_cli("train", "--pretrained_model_name_or_path", sd15, "--instance_data_dir",
                                  sample_subject_dir(), "--output_dir", tmp_path / "o", *PROMPTS, *flags), message)


def test_a_missing_mask_names_the_photo(run_cli, sd15, tmp_path):
    folder = masks_like(sample_subject_dir(), tmp_path / "masks", lambda w, h: np.zeros((h, w), np.uint8))
    (folder / "03.png").unlink()
    assert_one_line_error(run_cli("train", "--pretrained_model_name_or_path", sd15, "--instance_data_dir",
                                  sample_subject_dir(), "--output_dir", tmp_path / "o", *PROMPTS, "--mask_dm",
                                  "--mask_dir", folder), "no mask for photo '03.jpg'")


def test_pdm_in_a_full_fine_tuning_run(run_cli, sd15, tmp_path):
    out = train(run_cli, sd15, tmp_path / "full", "--train_mode", "full", "--use_pdm", "--pdm_inversion_steps", "4",
                "--pdm_timesteps", "2")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and len(losses(out)) == 3


def test_pdm_on_sdxl_uses_its_last_up_block_with_attention(run_cli, sdxl, tmp_path):
    from diffusers import UNet2DConditionModel

    from boothkit.train.pdm import default_pdm_layer

    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    layer = default_pdm_layer(unet)
    assert unet.get_submodule(layer).is_cross_attention is False and layer.endswith("transformer_blocks.0.attn1")
    out = train(run_cli, sdxl, tmp_path / "sdxl", "--use_pdm", "--pdm_inversion_steps", "4", "--pdm_timesteps", "2",
                "--mask_dm", "--mask_dir", masks_like(sample_subject_dir(), tmp_path / "m",
                                                      lambda w, h: np.full((h, w), 255, np.uint8)), "--mask_pdm")
    assert len(losses(out)) == 3


def test_pdm_on_a_flow_matching_model_is_refused(run_cli, sana, tmp_path):
    assert_one_line_error(run_cli("train", "--pretrained_model_name_or_path", sana, "--instance_data_dir",
                                  sample_subject_dir(), "--output_dir", tmp_path / "o", *PROMPTS, "--use_pdm"),
                          "--use_pdm needs a DDPM model")


def test_a_checkpoint_resumes_only_with_the_same_pdmbooth_terms(run_cli, sd15, tmp_path):
    out = train(run_cli, sd15, tmp_path / "out", "--use_pdm", "--pdm_inversion_steps", "4", "--pdm_timesteps", "2",
                "--checkpointing_steps", "2")
    args = ("train", "--pretrained_model_name_or_path", sd15, "--instance_data_dir", sample_subject_dir(),
            "--output_dir", out, "--max_train_steps", "4", *PROMPTS, "--resume_from_checkpoint", "latest",
            "--use_pdm", "--pdm_inversion_steps", "4")
    assert_one_line_error(run_cli(*args, "--pdm_timesteps", "3"), "the PDMBooth terms")
    assert run_cli(*args, "--pdm_timesteps", "2").code == 0 and len(losses(out)) == 4


def test_the_pdm_term_is_positive_after_a_real_training_step(run_cli, sd15, tmp_path):
    """One optimizer step of `boothkit train --use_pdm`, its LoRA loaded: the term is no longer 0."""
    out = tmp_path / "one"
    assert run_cli("train", "--pretrained_model_name_or_path", sd15, "--instance_data_dir", sample_subject_dir(),
                   "--output_dir", out, "--max_train_steps", "1", "--learning_rate", "1e-2", *PROMPTS, "--use_pdm",
                   "--pdm_inversion_steps", "6", "--pdm_timesteps", "3").code == 0
    config, family, images, regularizers = pdm_setup(sd15, sample_subject_dir(), tmp_path / "o")
    family.pipeline.load_lora_weights(str(out))
    prompt = family.encode_prompts(["a photo of dog"], torch.device("cpu"))
    rows = [(index, 0, 10 + index) for index in range(5)]
    with torch.no_grad():
        term = regularizers.pdm_term(family, family.denoiser, rows, 0, lambda _: prompt, family.default_resolution)
    assert (term > 0).all()


def test_in_the_trainer_the_pdm_term_starts_at_zero(run_cli, sd15, tmp_path):
    """PDM only (--no_use_inst_loss): the logged loss of step 1 is the PDM term of the untrained model. Its rows
    share the UNet call with the instance rows, so it is 0 up to float rounding (the batch changes summation
    order), and stays there: the frozen model is where a PDM-only run has nothing to move."""
    out = train(run_cli, sd15, tmp_path / "only", "--no_use_inst_loss", "--use_pdm", "--pdm_inversion_steps", "6",
                "--pdm_timesteps", "3", "--learning_rate", "1e-2")
    assert max(losses(out)) < 1e-9, losses(out)
