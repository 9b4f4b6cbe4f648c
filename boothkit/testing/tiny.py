"""Tiny model folders built from configs in code: no network, no model hub.

`build_tiny(kind, out_dir, seed)` writes a complete folder that the usual `from_pretrained` of diffusers or
transformers loads offline:

- ``sd15``  `StableDiffusionPipeline`, DDIM epsilon (SD 1.5 scheduler settings), 32 px default resolution.
- ``sd21``  the same with v-prediction, linear attention projections and a GELU text encoder (SD 2.1 style).
- ``sdxl``  `StableDiffusionXLPipeline`: two text encoders (the second with a projection), "text_time" micro
  conditioning, Euler scheduler with the SDXL settings, 32 px default resolution.
- ``sana``  `SanaPipeline`: linear-attention DiT, DC-AE autoencoder, Gemma-2 text encoder and the flow
  DPM-Solver scheduler that the real SANA diffusers conversions save; 32 px is the natural resolution (the
  pipeline's own default is 1024 px, so pass height/width and `use_resolution_binning=False`).
- ``dino``  `ViTModel` (ViT-S/16 geometry, tiny width) + a PIL image processor with the DINO eval preprocessing.
- ``dinov2``  `Dinov2Model` (14 px patches, image_size 518 like ``facebook/dinov2-small``, tiny width) + the
  `BitImageProcessor` settings of ``facebook/dinov2-small``: shorter side 256 (bicubic), crop 224, ImageNet mean/std.
- ``clip``  `CLIPModel` + `CLIPProcessor` (PIL image processor, in-memory tokenizer).

Tokenizers are built in memory: a byte-level CLIP BPE (every byte, so any text tokenizes, plus a few merges that
make "sks", "dog", "the" and "of" single tokens) and a Gemma BPE with byte fallback.

Weights come from torch's RNG seeded per module inside `torch.random.fork_rng`, so the caller's RNG state is
untouched, the same seed gives byte-identical safetensors files and another seed other weights. Each tiny folder
is under 3 MB and builds in well under a second. `build_sd_bench` writes an SD-1.5-shaped pipeline of reduced
width (about 35 M UNet parameters, 512 px default) for benchmarks, `build_sdxl_bench` an SDXL-shaped one (about
54 M UNet parameters, 256 px default).

The folder is built beside `out_dir` and moved into place, as an output folder of `boothkit.layout`: an earlier
tiny build there (its manifest) is replaced once the new one is complete, a file someone added beside it stays, and
a folder boothkit did not write is refused (unless `overwrite`: then the build goes beside its files, replacing
none).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable, Iterator

from boothkit.errors import BoothkitError
from boothkit.io import atomic_path
from boothkit.layout import OutputFolder, check_output_folder

TINY_KINDS: tuple[str, ...] = ("sd15", "sd21", "sdxl", "sana", "dino", "dinov2", "clip", "clipseg")

# SD 1.x / 2.x training noise schedule, as saved in the real checkpoints' scheduler configs.
_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

# BPE merges of the tiny CLIP tokenizer, in priority order (the DreamBooth identifier "sks" becomes one token).
_CLIP_MERGES = [
    ("s", "k"), ("sk", "s</w>"), ("o", "g</w>"), ("d", "og</w>"), ("t", "h"), ("th", "e</w>"), ("o", "f</w>")
]


def build_tiny(kind: str, out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny model folder `kind` (one of `TINY_KINDS`) to `out_dir` and return its path."""
    builders: dict[str, Callable[[Path, int], None]] = {
        "sd15": _build_sd,
        "sd21": functools.partial(_build_sd, v_prediction=True),
        "sdxl": _build_sdxl,
        "sana": _build_sana,
        "dino": _build_dino,
        "dinov2": _build_dinov2,
        "clip": _build_clip,
        "clipseg": _build_clipseg,
    }
    if kind not in builders:
        raise BoothkitError(f"unknown tiny model kind {kind!r}; choose one of: {', '.join(TINY_KINDS)}")
    return _write(builders[kind], out_dir, seed, overwrite)


def build_sd_bench(out_dir: str | Path, seed: int = 0) -> Path:
    """Write an SD-1.5-shaped pipeline of reduced width (about 35 M UNet parameters, 512 px) for benchmarks."""
    return _write(functools.partial(_build_sd, bench=True), out_dir, seed)


def build_sdxl_bench(out_dir: str | Path, seed: int = 0) -> Path:
    """Write an SDXL-shaped pipeline of reduced width (two text encoders, about 54 M UNet parameters, 256 px) for
    benchmarks (sizes: `_SDXL_SIZES`)."""
    return _write(functools.partial(_build_sdxl, bench=True), out_dir, seed)


def build_sana_bench(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a SANA-shaped pipeline of reduced width (f8 DC-AE, 32 latent channels, 8-layer DiT) for benchmarks."""
    return _write(functools.partial(_build_sana, bench=True), out_dir, seed)


def _write(builder: Callable[[Path, int], None], out_dir: str | Path, seed: int, overwrite: bool = False) -> Path:
    """Build into a staging folder, then replace the earlier build's files (the folder's manifest) by the new
    ones; a file someone added beside them stays (see `boothkit.layout`)."""
    out = Path(out_dir)
    root = check_output_folder(out, "tiny", overwrite=overwrite, reuse=True)
    with OutputFolder(root, "tiny") as folder, atomic_path(root) as staging:
        staging.mkdir()
        builder(staging, int(seed))
        files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
        folder.check_writable(*files)  # a user's file in the way: refused before the earlier build is removed
        folder.remove()  # the earlier build, now that the new one is complete
        folder.claim(*files)
    return out


@contextlib.contextmanager
def _seeded(seed: int, salt: int) -> Iterator[None]:
    """Seed torch's CPU RNG for one module (`salt` tells the modules apart) and restore the RNG state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + salt) % (2**63))
        yield


# ---------------------------------------------------------------------------------------------------------------
# Shared parts


def _clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A real byte-level `CLIPTokenizer`: the 256 byte characters, each also with "</w>", a few merges, specials."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in _CLIP_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=list(_CLIP_MERGES), pad_token=pad_token, model_max_length=77)


def _gemma_tokenizer():
    """A `GemmaTokenizer`: specials, the 256 byte-fallback tokens, "▁" and printable ASCII; pads on the right."""
    from transformers import GemmaTokenizer

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁"] + [chr(c) for c in range(33, 127)]
    vocab = {token: i for i, token in enumerate(tokens)}
    # `add_bos_token` must be explicit: its documented default (True) is not what the code does (False).
    return GemmaTokenizer(vocab=vocab, merges=[], padding_side="right", add_bos_token=True, add_eos_token=False)


def _clip_text_config(tokenizer, hidden: int = 32, **overrides):
    """A tiny CLIP text tower config whose vocabulary and special ids match `tokenizer`."""
    from transformers import CLIPTextConfig

    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextConfig(**{**settings, **overrides})


def _autoencoder_kl(seed: int, channels: tuple[int, ...], layers: int, groups: int, sample_size: int, **overrides):
    """An `AutoencoderKL` with one down/up block per width: scale factor 2 ** (len(channels) - 1), 4 latents."""
    from diffusers import AutoencoderKL

    with _seeded(seed, 2):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=layers,
            latent_channels=4,
            norm_num_groups=groups,
            sample_size=sample_size,
            **overrides,
        )


# ---------------------------------------------------------------------------------------------------------------
# Writers


def _build_sd(out: Path, seed: int, *, v_prediction: bool = False, bench: bool = False) -> None:
    """SD 1.5 (or SD 2.1 with `v_prediction`) shaped `StableDiffusionPipeline`; `bench` is the 35 M-UNet size."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    if bench:
        text = {"hidden": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}
        levels = {"block_out_channels": (64, 128, 256, 256), "layers_per_block": 2, "attention_head_dim": 8,
                  "norm_num_groups": 32}
        vae_args = ((32, 64, 128, 128), 2, 32, 512)
        sample_size = 64
    else:
        text = {"hidden": 32}
        # Widths 16/32 with 8 norm groups keep the folder under 2 MB (32/64 with 32 groups would be 6 MB).
        levels = {"block_out_channels": (16, 32), "layers_per_block": 1, "attention_head_dim": 2,
                  "norm_num_groups": 8}
        vae_args = ((16, 32), 1, 8, 32)
        sample_size = 16
    if v_prediction:
        text["hidden_act"] = "gelu"  # SD 2.x: OpenCLIP ViT-H text tower (GELU); SD 1.x: OpenAI CLIP (quick GELU)
    with _seeded(seed, 0):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, **text))
    n_cross = len(levels["block_out_channels"]) - 1
    with _seeded(seed, 1):
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * n_cross + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * n_cross,
            cross_attention_dim=text["hidden"],
            use_linear_projection=v_prediction,
            **levels,
        )
    scheduler = DDIMScheduler(
        **_SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if v_prediction else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=_autoencoder_kl(seed, *vae_args),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


# Sizes of the tiny SDXL (tests) and of the reduced-width, SDXL-shaped bench model. The bench model keeps SDXL's
# structure (Podell et al. 2023, Tab. 1): three UNet levels, no attention in the first, transformer depth growing
# with depth (SDXL: 1, 2, 10), 64-dim attention heads, a CLIP-L-like and a wider projected bigG-like text encoder
# whose penultimate states are concatenated, "text_time" conditioning; at a quarter of SDXL's width:
# about 54 M UNet parameters, 256 px default.
_SDXL_SIZES = {
    False: {"text": ({"hidden": 32}, {"hidden": 32}), "channels": (16, 32), "layers": 1, "depth": (1, 2),
            "heads": (2, 4), "time_dim": 8, "groups": 8, "sample": 16, "vae": ((16, 32), 1, 8, 32)},
    True: {"text": ({"hidden": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 3},
                    {"hidden": 320, "intermediate_size": 1280, "num_hidden_layers": 4, "num_attention_heads": 5}),
           "channels": (64, 128, 256), "layers": 2, "depth": (1, 2, 4), "heads": (1, 2, 4), "time_dim": 64,
           "groups": 32, "sample": 32, "vae": ((32, 64, 128, 128), 2, 32, 256)},
}


def _build_sdxl(out: Path, seed: int, bench: bool = False) -> None:
    """SDXL-shaped `StableDiffusionXLPipeline`: CLIP-L-like + bigG-like (projected) text encoders, text_time UNet
    with attention from the second level on (sizes: `_SDXL_SIZES`)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    size = _SDXL_SIZES[bench]
    text_1, text_2 = size["text"]
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads "!"
    with _seeded(seed, 0):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, **text_1))
    with _seeded(seed, 3):
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(tokenizer_2, projection_dim=text_2["hidden"], hidden_act="gelu", **text_2)
        )
    levels = len(size["channels"])
    with _seeded(seed, 1):
        unet = UNet2DConditionModel(
            sample_size=size["sample"],
            in_channels=4,
            out_channels=4,
            block_out_channels=size["channels"],
            layers_per_block=size["layers"],
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            transformer_layers_per_block=size["depth"],
            attention_head_dim=size["heads"],  # diffusers' name for the number of heads (SDXL: 5, 10, 20)
            use_linear_projection=True,
            cross_attention_dim=text_1["hidden"] + text_2["hidden"],
            addition_embed_type="text_time",
            addition_time_embed_dim=size["time_dim"],
            # six micro-conditioning numbers (original size, crop origin, target size) + the pooled text embedding
            projection_class_embeddings_input_dim=6 * size["time_dim"] + text_2["hidden"],
            norm_num_groups=size["groups"],
        )
    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear"
    )
    pipe = StableDiffusionXLPipeline(
        vae=_autoencoder_kl(seed, *size["vae"], scaling_factor=0.13025, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


# Widths of the tiny SANA (tests) and of the reduced-width, SANA-shaped bench model (f8 DC-AE, 32 latent
# channels like SANA's, an 8-layer DiT of width 256: 8.9 M parameters).
_SANA_SIZES = {
    False: {"text": 16, "text_layers": 2, "text_ff": 32, "text_heads": 2, "text_head_dim": 8, "latent": 4,
            "vae": (16, 32), "heads": 2, "head_dim": 8, "layers": 2, "sample": 16},
    True: {"text": 256, "text_layers": 2, "text_ff": 1024, "text_heads": 4, "text_head_dim": 64, "latent": 32,
           "vae": (32, 64, 128, 128), "heads": 8, "head_dim": 32, "layers": 8, "sample": 16},
}


def _build_sana(out: Path, seed: int, bench: bool = False) -> None:
    """SANA-shaped `SanaPipeline`: Gemma-2 text encoder, DC-AE, linear-attention DiT (sizes: `_SANA_SIZES`)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    size = _SANA_SIZES[bench]
    tokenizer = _gemma_tokenizer()
    with _seeded(seed, 0):
        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=size["text"], intermediate_size=size["text_ff"],
            num_hidden_layers=size["text_layers"], num_attention_heads=size["text_heads"], num_key_value_heads=1,
            head_dim=size["text_head_dim"], pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        ))
    levels = len(size["vae"])
    blocks = ("ResBlock",) * (levels - 1) + ("EfficientViTBlock",)
    with _seeded(seed, 2):
        vae = AutoencoderDC(
            in_channels=3, latent_channels=size["latent"], attention_head_dim=8,
            encoder_block_types=blocks, decoder_block_types=blocks,
            encoder_block_out_channels=size["vae"], decoder_block_out_channels=size["vae"],
            encoder_layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * levels,
            encoder_qkv_multiscales=((),) * (levels - 1) + ((5,),),
            decoder_qkv_multiscales=((),) * (levels - 1) + ((5,),),
            scaling_factor=0.41407,  # the SANA DC-AE's
        )
    with _seeded(seed, 1):
        transformer = SanaTransformer2DModel(
            in_channels=size["latent"], out_channels=size["latent"], num_attention_heads=size["heads"],
            attention_head_dim=size["head_dim"], num_layers=size["layers"],
            num_cross_attention_heads=size["heads"], cross_attention_head_dim=size["head_dim"],
            cross_attention_dim=size["heads"] * size["head_dim"], caption_channels=size["text"],
            attention_bias=False,
            sample_size=size["sample"],  # tiny: 16 latents x scale 2 = 32 px, a size resolution binning knows
            patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
        )
    # What the diffusers SANA conversion saves by default ("flow-dpm_solver", flow_shift 3 below 4K).
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.save_pretrained(out, safe_serialization=True)


def _build_dino(out: Path, seed: int) -> None:
    """DINO-ViT-S/16-shaped `ViTModel` (224 px, 16 px patches) + PIL processor: resize 256 bicubic, crop 224."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        qkv_bias=True,
    )
    with _seeded(seed, 0):
        model = ViTModel(config)  # keeps the pooler so that a plain `ViTModel.from_pretrained` finds every weight
    model.save_pretrained(out)
    ViTImageProcessorPil(**_dino_protocol()).save_pretrained(out)


def _dino_protocol() -> dict:
    """Image-processor settings of the DINO evaluation protocol: shorter side 256 (bicubic), centre crop 224,
    ImageNet mean and std."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    return {"do_resize": True, "size": {"shortest_edge": 256}, "resample": PILImageResampling.BICUBIC,
            "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
            "image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD)}


def _build_dinov2(out: Path, seed: int) -> None:
    """DINOv2-shaped `Dinov2Model` (14 px patches, position embeddings for 518 px that it interpolates to the
    224 px crops) + the PIL `BitImageProcessor` that ``facebook/dinov2-small`` ships."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        image_size=518, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
    )
    with _seeded(seed, 0):
        model = Dinov2Model(config)
    model.save_pretrained(out)
    processor = BitImageProcessorPil(do_convert_rgb=True, **_dino_protocol())
    processor.save_pretrained(out)


def _build_clip(out: Path, seed: int) -> None:
    """`CLIPModel` with tiny text and vision towers (32 px images, 4 px patches) + `CLIPProcessor`."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    vision = {
        "image_size": 32,
        "patch_size": 4,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer).to_dict(), vision_config=vision, projection_dim=16
    )
    with _seeded(seed, 0):
        model = CLIPModel(config)
    model.save_pretrained(out)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


def _build_clipseg(out: Path, seed: int) -> None:
    """`CLIPSegForImageSegmentation` (text-prompted masks, `--mask_model`) with tiny towers and decoder (32 px
    input, 32 px logits) + `CLIPSegProcessor` (PIL image processor, the tiny CLIP tokenizer)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessorPil

    tokenizer = _clip_tokenizer()
    vision = {"image_size": 32, "patch_size": 4, "hidden_size": 32, "intermediate_size": 37,
              "num_hidden_layers": 3, "num_attention_heads": 4}
    config = CLIPSegConfig(text_config=_clip_text_config(tokenizer).to_dict(), vision_config=vision,
                           projection_dim=16, extract_layers=[0, 1, 2], reduce_dim=16, decoder_num_attention_heads=2,
                           decoder_intermediate_size=24)
    with _seeded(seed, 0):
        model = CLIPSegForImageSegmentation(config)
    model.save_pretrained(out)
    image_processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                                           image_std=[0.229, 0.224, 0.225])
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
