"""`boothkit merge` (issue 11): concat is exact (sampling the merged LoRA = both adapters at their weights, as
diffusers' `set_adapters` stacks them), svd reports its error per layer group, `--into_base` fuses the LoRAs
into a pipeline folder diffusers loads."""

from __future__ import annotations

import json
import re

import numpy as np
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors import safe_open

from boothkit.formats.lora import read_lora
from test_lora_stacking import PROMPTS, pipeline_images, pixels, reference, sampler, style_lora  # noqa: F401,F811 (fixture)
from test_train import assert_one_line_error

WEIGHTS = (0.8, 0.6)


def stacked_images(sd15, subject, style) -> np.ndarray:
    pipe = reference(sd15, {"a": (subject, WEIGHTS[0]), "b": (style, WEIGHTS[1])})
    return pipeline_images(pipe, PROMPTS[0], seed=4, scale=6.0, count=2)


def merged_images(sd15, merged) -> np.ndarray:
    return pixels(sampler(sd15, merged, "cfg", guidance_scale=6.0).generate(PROMPTS[:1], None, 2, seed=4))


def test_concat_merge_is_the_two_adapters_stacked(sd15, sd15_lora, style_lora, run_cli, tmp_path):  # noqa: F811
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", f"{sd15_lora}:{WEIGHTS[0]}", f"{style_lora}:{WEIGHTS[1]}", "--output", str(out))
    assert result.code == 0, result.err
    assert "merged 2 LoRAs (concat)" in result.out
    expected = stacked_images(sd15, sd15_lora, style_lora)
    assert np.abs(merged_images(sd15, out) - expected).max() <= 1.001 / 255
    subject, style, merged = (read_lora(path).layers for path in (sd15_lora, style_lora, out))
    name = next(iter(subject))
    assert merged[name].rank == subject[name].rank + style[name].rank and merged[name].scale == 1.0
    assert set(merged) == set(subject) | set(style)
    # the weights matter: the LoRAs at 1.0 each give other images
    plain = tmp_path / "plain.safetensors"
    assert run_cli("merge", str(sd15_lora), str(style_lora), "--output", str(plain)).code == 0
    assert np.abs(merged_images(sd15, plain) - expected).max() > 2 / 255
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == str(merged[name].rank) and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora" and metadata["modelspec.title"] == "merged"
    assert metadata["modelspec.trigger_phrase"] == "sks dog"
    assert [entry["weight"] for entry in json.loads(metadata["boothkit.merged_from"])] == list(WEIGHTS)


def test_svd_merge_reports_its_error_per_layer_group(sd15, sd15_lora, style_lora, run_cli, tmp_path):  # noqa: F811
    subject, style = read_lora(sd15_lora).layers, read_lora(style_lora).layers
    full_rank = next(iter(subject.values())).rank + next(iter(style.values())).rank
    lossless = tmp_path / "full.safetensors"
    result = run_cli("merge", f"{sd15_lora}:{WEIGHTS[0]}", f"{style_lora}:{WEIGHTS[1]}", "--method", "svd",
                     "--rank", str(full_rank), "--output", str(lossless))
    assert result.code == 0, result.err
    errors = [float(value) for value in re.findall(r"relative error (\S+)", result.out)]
    assert errors and max(errors) < 1e-5  # rank r_a + r_b holds the weighted sum exactly
    assert np.abs(merged_images(sd15, lossless) - stacked_images(sd15, sd15_lora, style_lora)).max() <= 1.001 / 255
    small = tmp_path / "rank1.safetensors"
    result = run_cli("merge", f"{sd15_lora}:{WEIGHTS[0]}", f"{style_lora}:{WEIGHTS[1]}", "--method", "svd",
                     "--rank", "1", "--output", str(small))
    groups = dict(re.findall(r"svd rank 1: (\S+): relative error (\S+)", result.out))
    assert "text_encoder" in groups and any(group.startswith("unet.") for group in groups)
    assert all(0.05 < float(error) < 1 for error in groups.values())
    assert {layer.rank for layer in read_lora(small).layers.values()} == {1}
    assert_one_line_error(run_cli("merge", str(sd15_lora), "--method", "svd", "--output", str(tmp_path / "x.safetensors")),
                          "--method svd needs --rank")


def test_into_base_saves_a_pipeline_with_the_loras_fused(sd15, sd15_lora, style_lora, run_cli, tmp_path):  # noqa: F811
    out = tmp_path / "fused"
    result = run_cli("merge", f"{sd15_lora}:{WEIGHTS[0]}", f"{style_lora}:{WEIGHTS[1]}", "--into_base",
                     "--output", str(out))
    assert result.code == 0, result.err
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert not getattr(pipe.unet, "peft_config", None)  # plain weights, no adapter left
    fused = pipeline_images(pipe, PROMPTS[0], seed=4, scale=6.0, count=2)
    assert np.abs(fused - stacked_images(sd15, sd15_lora, style_lora)).max() <= 1.001 / 255
    assert (out / ".boothkit-manifest.json").is_file()
    # a second run into the same folder needs --overwrite, and then replaces only boothkit's files
    (out / "notes.txt").write_text("mine")
    again = run_cli("merge", str(sd15_lora), "--into_base", "--output", str(out))
    assert_one_line_error(again, "--overwrite")
    assert run_cli("merge", str(sd15_lora), "--into_base", "--output", str(out), "--overwrite").code == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_merging_loras_of_different_models_is_refused(sd15_lora, sd21_lora, run_cli, tmp_path):
    result = run_cli("merge", str(sd15_lora), str(sd21_lora), "--output", str(tmp_path / "m.safetensors"))
    assert_one_line_error(result, "is for SD 2.x", "not for SD 1.x")
    assert not (tmp_path / "m.safetensors").exists()
    nan = tmp_path / "nan.safetensors"
    assert_one_line_error(run_cli("merge", f"{sd15_lora}:nan", "--output", str(nan)), "finite")
