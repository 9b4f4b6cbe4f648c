"""SDXL sampling items of issue 10: `--guidance_rescale` (Lin et al. 2024), the negative prompt's None vs ""
semantics, the model's own scheduler as the default, and the SDXL-shaped bench model."""

from __future__ import annotations

import json

from boothkit.testing.tiny import build_sdxl_bench


def test_sdxl_bench_shape(tmp_path):
    """SDXL's structure at reduced width: three levels (no attention in the first), transformer depth growing with
    depth, 64-dim heads, two text encoders (the second projected) concatenated, text_time conditioning."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    out = build_sdxl_bench(tmp_path / "bench")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    params = sum(p.numel() for p in unet.parameters())
    assert 30e6 < params < 60e6, params
    config = unet.config
    assert config.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    depths = list(config.transformer_layers_per_block)
    assert depths[1] > 1 and depths == sorted(depths)
    head_dims = [width // heads for width, heads in zip(config.block_out_channels, config.attention_head_dim)]
    assert head_dims == [64, 64, 64]
    text, text_2 = (CLIPTextConfig.from_pretrained(out / name) for name in ("text_encoder", "text_encoder_2"))
    assert text.hidden_size + text_2.hidden_size == config.cross_attention_dim
    assert text_2.hidden_size > text.hidden_size and text_2.projection_dim == text_2.hidden_size
    assert config.addition_embed_type == "text_time"
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + text_2.projection_dim
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert config.sample_size * 2 ** (len(vae["block_out_channels"]) - 1) == 256
