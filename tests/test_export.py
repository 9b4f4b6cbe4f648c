"""`boothkit export` / `boothkit info` and LoRAs from other tools (issue 11): every kohya name is one ComfyUI's own
loader maps (fixture: tests/fixtures/comfyui_lora_keys), diffusers loads every export to the boothkit LoRA's
images, export → import is exact, the real alpha is kept, and a LoRA for another model is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from boothkit.formats.ldm import block_prefixes, to_ldm
from boothkit.formats.lora import PEFT_013_FIELDS, read_lora
from boothkit.formats.models import base_model
from boothkit.testing.tiny import build_tiny
from test_train import assert_one_line_error
import test_sample
import test_sdxl
from test_sana import sana_lora  # noqa: F401,F811 (a fixture)

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui_lora_keys"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    return build_tiny("sdxl", tmp_path_factory.mktemp("sdxl") / "model", seed=0)


@pytest.fixture(scope="module")
def sdxl_trained(sdxl, tmp_path_factory) -> Path:
    """A boothkit SDXL LoRA on the UNet and both text encoders, rank 4 with alpha 2 (scale 0.5)."""
    from boothkit.cli import main
    from boothkit.data.images import sample_subject_dir

    out = tmp_path_factory.mktemp("sdxl-lora") / "lora"
    assert main(["train", "--pretrained_model_name_or_path", str(sdxl), "--instance_data_dir", str(sample_subject_dir()),
                 "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "64",
                 "--max_train_steps", "8", "--learning_rate", "3e-2", "--text_encoder_lr", "1e-2", "--rank", "4",
                 "--lora_alpha", "2", "--train_text_encoder", "--checkpointing_steps", "100"]) == 0
    return out


def export(run_cli, source: Path, out: Path, *extra: str) -> Path:
    result = run_cli("export", str(source), "--output", str(out), "--dtype", "fp32", *extra)
    assert result.code == 0, result.err
    assert out.name in result.out and "tensors" in result.out
    return out


def sd_images(model: Path, lora: Path | None) -> np.ndarray:
    """diffusers' StableDiffusionPipeline with `load_lora_weights(lora)`: 2 images of PROMPTS[0]."""
    pipe = test_sample.reference_pipeline(model, lora)
    return pipe(test_sample.PROMPTS[0], num_images_per_prompt=2, guidance_scale=6.0, num_inference_steps=8,
                generator=[torch.Generator("cpu").manual_seed(3 + i) for i in range(2)], output_type="np").images


def boothkit_images(kind: str, model: Path, lora: Path) -> np.ndarray:
    if kind == "sdxl":
        return test_sdxl.pixels(test_sdxl.sampler(model, lora, "cfg", guidance_scale=5.0).generate(
            test_sdxl.PROMPTS[:1], None, 2, seed=7))
    return test_sample.pixels(test_sample.sampler(model, lora, "cfg", guidance_scale=6.0).generate(
        test_sample.PROMPTS[:1], None, 2, seed=3))


def diffusers_images(kind: str, model: Path, lora: Path) -> np.ndarray:
    if kind == "sdxl":
        return test_sdxl.pipeline_images(model, lora, test_sdxl.PROMPTS[0], None, 2, 7, 5.0)
    return sd_images(model, lora)


@pytest.fixture(scope="module")
def sana_mixed(sana_lora, tmp_path_factory) -> Path:  # noqa: F811
    """The SANA LoRA with the same weights under other alphas: self-attention q at alpha 2 (its up doubled), both
    cross-attention k and v at alpha 2, the rest at 4 = the rank: per-layer alphas (`alpha_pattern`), fused
    parts with one scale and with several."""
    from boothkit.formats.lora import LoraLayerWeights, diffusers_tensors

    layers = {}
    for name, layer in read_lora(sana_lora).layers.items():
        halved = name.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v"))
        layers[name] = LoraLayerWeights(layer.down, layer.up * 2, 2.0) if halved else layer
    tensors, metadata = diffusers_tensors(layers)
    out = tmp_path_factory.mktemp("sana-mixed") / "mixed.safetensors"
    with safe_open(str(sana_lora / "pytorch_lora_weights.safetensors"), "pt") as handle:
        metadata.update({k: v for k, v in handle.metadata().items() if k.startswith(("ss_", "modelspec", "boothkit"))})
    save_file(tensors, out, metadata=metadata)
    return out


@pytest.fixture
def models_and_loras(tiny_models, sd15_lora, sd21_lora, sdxl, sdxl_trained):
    return {"sd15": (tiny_models["sd15"], sd15_lora), "sd21": (tiny_models["sd21"], sd21_lora),
            "sdxl": (sdxl, sdxl_trained)}


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_kohya_export_is_what_comfyui_maps_and_diffusers_loads_to_the_same_images(kind, models_and_loras, run_cli,
                                                                                   tmp_path):
    model, lora = models_and_loras[kind]
    exported = export(run_cli, lora, tmp_path / "kohya.safetensors")
    fixture = json.loads((FIXTURES / f"{kind}.json").read_text())
    module_of_weight = fixture["diffusers_modules"]
    tensors = load_file(exported)
    stems = {key.removesuffix(".lora_down.weight") for key in tensors if key.endswith(".lora_down.weight")}
    layers = read_lora(lora).layers
    assert len(stems) == len(layers) and len(tensors) == 3 * len(layers)
    for stem in stems:  # each stem is one ComfyUI maps, to the weight of the very module the layer belongs to
        assert stem in fixture["keys"], stem
        module = module_of_weight[fixture["keys"][stem]]
        layer = layers[module]
        assert torch.equal(tensors[stem + ".lora_down.weight"], layer.down)
        assert float(tensors[stem + ".alpha"]) == layer.alpha
    if kind == "sdxl":  # original block names, text encoders te1/te2, the real alpha (2, not the rank 4)
        assert any("_input_blocks_" in stem for stem in stems) and not any("_down_blocks_" in stem for stem in stems)
        assert {stem[:9] for stem in stems} == {"lora_unet", "lora_te1_", "lora_te2_"}
        assert {float(tensors[stem + ".alpha"]) for stem in stems} == {2.0}
    original = boothkit_images(kind, model, lora)
    assert np.abs(diffusers_images(kind, model, exported) - original).max() <= 1.001 / 255


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_export_loads_in_diffusers_and_peft_013(kind, models_and_loras, run_cli, tmp_path):
    model, lora = models_and_loras[kind]
    exported = export(run_cli, lora, tmp_path / "diffusers.safetensors", "--format", "diffusers")
    with safe_open(str(exported), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys)
    assert all(".text_model." in key for key in keys if key.startswith("text_encoder"))  # for transformers < 5.6 too
    adapters = json.loads(metadata["lora_adapter_metadata"])
    assert {key.split(".", 1)[1] for key in adapters} <= set(PEFT_013_FIELDS)
    for file in (exported, lora / "pytorch_lora_weights.safetensors"):  # the training output is the same layout
        with safe_open(str(file), "pt") as handle:
            fields = {key.split(".", 1)[1] for key in json.loads(handle.metadata()["lora_adapter_metadata"])}
        assert fields <= set(PEFT_013_FIELDS)
    original = boothkit_images(kind, model, lora)
    assert np.abs(diffusers_images(kind, model, exported) - original).max() <= 1.001 / 255


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_export_then_import_is_exact(layout, models_and_loras, sana_lora, sana_mixed, sana, run_cli,  # noqa: F811
                                     tmp_path):
    cases = {"sd15": models_and_loras["sd15"], "sdxl": models_and_loras["sdxl"], "sana": (sana, sana_lora),
             "sana_mixed_alphas": (sana, sana_mixed)}
    for kind, (model, lora) in cases.items():
        exported = export(run_cli, lora, tmp_path / f"{kind}.safetensors", "--format", layout)
        original, back = read_lora(lora).layers, read_lora(exported, base_model(str(model))).layers
        assert set(back) == set(original), kind
        for name, layer in original.items():
            assert torch.equal(back[name].delta(), layer.delta()), (kind, name)
            if kind != "sana_mixed_alphas" or layout == "diffusers":  # fused parts of several scales: folded into up
                assert torch.equal(back[name].down, layer.down) and torch.equal(back[name].up, layer.up), (kind, name)
                assert back[name].alpha == layer.alpha


def test_sana_kohya_export_fuses_qkv_and_samples_the_same(sana, sana_lora, sana_mixed, run_cli, tmp_path):  # noqa: F811
    from test_sana import pixels, sampler

    def images(lora):
        return pixels(sampler(sana, lora, "cfg", guidance_scale=4.5).generate(["a photo of sks dog"], None, 2, seed=1))

    exported = export(run_cli, sana_lora, tmp_path / "sana.safetensors")
    tensors = load_file(exported)
    assert "lora_unet_blocks_0_attn_qkv.lora_down.weight" in tensors
    assert "lora_unet_blocks_0_cross_attn_kv_linear.lora_up.weight" in tensors
    assert not any("to_q" in key for key in tensors)
    qkv = tensors["lora_unet_blocks_0_attn_qkv.lora_up.weight"]
    assert qkv.shape[1] == 12 and float(tensors["lora_unet_blocks_0_attn_qkv.alpha"]) == 3 * 4.0  # 3 × rank 4, α = r
    original = images(sana_lora)
    assert np.abs(images(exported) - original).max() <= 1.001 / 255
    # the same weights under other alphas: the diffusers file (alpha_pattern) and its kohya export sample alike
    mixed = export(run_cli, sana_mixed, tmp_path / "mixed.safetensors")
    assert float(load_file(mixed)["lora_unet_blocks_0_cross_attn_kv_linear.alpha"]) == 4.0  # 2 × rank 4 at scale 0.5
    for lora in (sana_mixed, mixed):
        assert np.abs(images(lora) - original).max() <= 1.001 / 255


def test_sdxl_kohya_files_with_and_without_alpha_sample_as_diffusers_loads_them(sdxl, sdxl_trained, run_cli, tmp_path):
    exported = export(run_cli, sdxl_trained, tmp_path / "with_alpha.safetensors")
    without = tmp_path / "without_alpha.safetensors"
    save_file({key: value for key, value in load_file(exported).items() if not key.endswith(".alpha")}, without)
    images = {}
    for file in (exported, without):
        images[file.name] = boothkit_images("sdxl", sdxl, file)
        assert np.abs(images[file.name] - diffusers_images("sdxl", sdxl, file)).max() <= 1.001 / 255
    # without alpha the scale is 1 (α = r, the kohya convention), with it 0.5: different strengths
    assert np.abs(images["with_alpha.safetensors"] - images["without_alpha.safetensors"]).max() > 2 / 255


def test_ldm_block_names_are_what_diffusers_single_file_converter_reads(sdxl):
    """Every weight of the UNet renamed to the LDM layout by `formats.ldm` and converted back by diffusers' own
    single-file converter lands on its own name: for the tiny SDXL and for the real SDXL 1.0 layout."""
    real = dict(block_out_channels=[32, 64, 128], layers_per_block=2, transformer_layers_per_block=[1, 2, 3],
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4, 8],
                cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=8)
    configs = [json.loads((sdxl / "unet" / "config.json").read_text()), real]
    for config in configs:
        unet = UNet2DConditionModel.from_config(config)
        prefixes = block_prefixes(dict(unet.config))
        state = unet.state_dict()
        renamed = {}
        for key, value in state.items():
            module, parameter = key.rsplit(".", 1)
            renamed[f"model.diffusion_model.{to_ldm(module, prefixes)}.{parameter}"] = value
        back = convert_ldm_unet_checkpoint(renamed, dict(unet.config))
        assert set(back) == set(state) and all(torch.equal(back[key], state[key]) for key in state)
    assert block_prefixes(dict(unet.config))["down_blocks.1.attentions.0"] == "input_blocks.4.1"  # as in SDXL 1.0


def test_a_lora_for_another_model_is_refused_naming_both(sd15, sd21_lora, sdxl, sdxl_trained, run_cli, tmp_path):
    result = run_cli("sample", "--pretrained_model_name_or_path", str(sd15), "--lora_dir", str(sd21_lora),
                     "--prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "images"), "--num_inference_steps", "2")
    assert_one_line_error(result, "is for SD 2.x (768-v)")
    assert f"not for SD 1.x ('{sd15}')" in result.err
    result = run_cli("export", str(sdxl_trained), "--pretrained_model_name_or_path", str(sd15),
                     "--output", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "is for SDXL")
    assert "not for SD 1.x" in result.err and not (tmp_path / "x.safetensors").exists()
    # a kohya file from elsewhere (no metadata): told by its layers (a second text encoder: SDXL)
    bare = tmp_path / "bare.safetensors"
    export(run_cli, sdxl_trained, tmp_path / "k.safetensors")
    save_file(load_file(tmp_path / "k.safetensors"), bare)
    result = run_cli("sample", "--pretrained_model_name_or_path", str(sd15), "--lora_dir", str(bare),
                     "--prompt", "a dog", "--output_dir", str(tmp_path / "images2"), "--num_inference_steps", "2")
    assert_one_line_error(result, f"LoRA folder '{bare}' is for SDXL, not for SD 1.x")


def test_metadata_of_trained_and_exported_loras(sd15_lora, sd21_lora, sdxl_trained, run_cli, tmp_path):
    expected = {sd15_lora: ("sd_v1", "stable-diffusion-v1/lora", "4", "4"),
                sd21_lora: ("sd_v2", "stable-diffusion-v2-768-v/lora", "4", "4"),
                sdxl_trained: ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "4", "2")}
    for lora, (version, architecture, dim, alpha) in expected.items():
        exported = export(run_cli, lora, tmp_path / f"{lora.name}-{version}.safetensors")
        for file, title in ((lora / "pytorch_lora_weights.safetensors", lora.name), (exported, exported.stem)):
            with safe_open(str(file), "pt") as handle:
                metadata = handle.metadata()
            assert (metadata["ss_base_model_version"], metadata["modelspec.architecture"]) == (version, architecture)
            assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (dim, alpha)
            assert metadata["ss_network_module"] == "networks.lora" and metadata["modelspec.sai_model_spec"] == "1.0.0"
            assert json.loads(metadata["ss_tag_frequency"]) == {"instance": {"sks dog": 5}}
            assert metadata["modelspec.trigger_phrase"] == "sks dog" and metadata["modelspec.title"] == title
            assert metadata["ss_output_name"] == title and metadata["modelspec.date"][:4].isdigit()
            training = json.loads(metadata["boothkit.training"])
            assert training["instance_prompt"] == "a photo of sks dog" and training["lora_alpha"] == float(alpha)
            assert training["rank"] == 4 and training["seed"] == 0 and "max_train_steps" in training
            assert "ss_resolution" in metadata and "x" in metadata["modelspec.resolution"]
    result = run_cli("info", str(tmp_path / f"{sdxl_trained.name}-sdxl_base_v1-0.safetensors"))
    assert result.code == 0
    assert any(line.startswith("base model: SDXL ('") for line in result.out.splitlines())
    for line in ("format: kohya", "rank: 4", "alpha: 2", "trigger: sks dog", "tensors: 240 (80 layers)",
                 "  ss_network_alpha: 2"):
        assert line in result.out.splitlines(), line


def test_export_never_replaces_a_file_boothkit_did_not_write(sd15_lora, run_cli, tmp_path):
    mine = tmp_path / "mine.safetensors"
    save_file({"x": torch.zeros(1)}, mine)
    before = mine.read_bytes()
    for extra in ((), ("--overwrite",)):
        result = run_cli("export", str(sd15_lora), "--output", str(mine), *extra)
        assert_one_line_error(result, "boothkit did not write it")
    assert mine.read_bytes() == before
    ours = export(run_cli, sd15_lora, tmp_path / "ours.safetensors")
    assert_one_line_error(run_cli("export", str(sd15_lora), "--output", str(ours)), "pass --overwrite")
    export(run_cli, sd15_lora, ours, "--overwrite", "--format", "diffusers")
    assert any(key.endswith("lora_A.weight") for key in load_file(ours))
    assert_one_line_error(run_cli("export", str(sd15_lora), "--output", str(tmp_path / "x.bin")), ".safetensors")
    assert_one_line_error(run_cli("export", str(tmp_path / "missing"), "--output", str(tmp_path / "y.safetensors")),
                          "not found")


def test_kohya_files_from_elsewhere_export_and_merge(sd15, sd15_lora, run_cli, tmp_path):
    """A kohya file with no metadata (as another tool writes it) reads with the base model given, and its
    diffusers export is the original LoRA; a kohya file that records its base merges without the flag."""
    exported = export(run_cli, sd15_lora, tmp_path / "k.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(exported), bare)  # no metadata at all
    result = run_cli("export", str(bare), "--format", "diffusers", "--output", str(tmp_path / "d.safetensors"))
    assert_one_line_error(result, "kohya layout", "--pretrained_model_name_or_path")
    back = export(run_cli, bare, tmp_path / "d.safetensors", "--format", "diffusers",
                  "--pretrained_model_name_or_path", str(sd15))
    original, again = read_lora(sd15_lora).layers, read_lora(back).layers
    assert set(again) == set(original)
    assert all(torch.equal(again[name].delta(), layer.delta()) for name, layer in original.items())
    merged = tmp_path / "m.safetensors"
    result = run_cli("merge", f"{exported}:0.5", f"{sd15_lora}:0.5", "--output", str(merged))
    assert result.code == 0, result.err
    layers = read_lora(merged).layers
    assert all(torch.allclose(layers[name].delta(), layer.delta(), atol=1e-6) for name, layer in original.items())
