"""Cost of guidance: seconds per image for CFG, CFG + AG and WIG, batched vs branch by branch.

Model: the SD-1.5-shaped bench model of reduced width (`build_sd_bench`, ~35 M UNet parameters) with
random rank-4 fine and weak LoRAs (text encoder included). Each configuration samples the same images
(same seeds) after a warm-up; the best of `--repeats` timings is kept.

    python bench/guidance_cost.py [--resolution 256] [--steps 10] [--images 2] [--repeats 3]

Targets: WIG ≤ 1.05× CFG; CFG + AG ≤ 2.1× CFG; batched ≤ branch by branch for every method.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from boothkit.families import load_family
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GuidedSampler, SamplerSettings, load_guidance_adapters
from boothkit.testing.tiny import build_sd_bench
from boothkit.train.lora import attach_lora, save_lora

METHODS = {"cfg": {"guidance_scale": 7.5}, "ag": {"guidance_scale": 2.0, "cfg_scale": 7.5},
           "wig": {"guidance_scale": 7.5, "omega": 0.3}}
PROMPTS = ["a sks dog in the snow"]


def write_random_loras(model: Path, root: Path) -> Path:
    """Fine LoRA in root/ and weak LoRA in root/weak/, with random (non-zero) B so they change outputs."""
    for seed, folder in ((1, root), (2, root / "weak")):
        family = load_family(str(model))
        modules = {"unet": family.denoiser, "text_encoder": family.text_encoder}
        for index, (name, module) in enumerate(modules.items()):
            targets = family.denoiser_lora_targets if name == "unet" else family.text_encoder_lora_targets
            attach_lora(module, targets, rank=4, alpha=4, seed=seed * 10 + index)
            with torch.no_grad():
                for param_name, param in module.named_parameters():
                    if "lora_B" in param_name:
                        param.normal_(std=0.02, generator=torch.Generator().manual_seed(seed))
        save_lora(family, modules, folder)
    return root


def seconds_per_image(model: Path, lora: Path, method: str, batched: bool, args) -> float:
    family = load_family(str(model))
    guidance = make_guidance(method, **METHODS[method])
    adapters = load_guidance_adapters(family, str(lora), None, guidance)
    settings = SamplerSettings(args.steps, args.resolution, args.resolution, "ddim", batch_size=args.images,
                               batched_branches=batched, progress=False)
    sampler = GuidedSampler(family, guidance, settings, adapters)
    sampler.generate(PROMPTS, None, args.images, seed=0)  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        sampler.generate(PROMPTS, None, args.images, seed=0)
        best = min(best, time.perf_counter() - start)
    return best / args.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=2, help="images per batch (one prompt)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="boothkit-guidance-bench-") as work:
        model = build_sd_bench(Path(work) / "model")
        lora = write_random_loras(model, Path(work) / "lora")
        table = {(m, b): seconds_per_image(model, lora, m, b, args) for m in METHODS for b in (True, False)}
    print(f"{args.resolution}px, {args.steps} DDIM steps, {args.images} images per batch, best of {args.repeats}")
    print(f"{'method':<8} {'batched s/img':>14} {'branch-by-branch s/img':>23} {'batched/branch':>15} {'vs CFG':>7}")
    cfg = table[("cfg", True)]
    for method in METHODS:
        batched, single = table[(method, True)], table[(method, False)]
        print(f"{method:<8} {batched:>14.3f} {single:>23.3f} {batched / single:>15.2f} {batched / cfg:>7.2f}")
    print(f"targets: WIG/CFG {table[('wig', True)] / cfg:.2f} (<= 1.05), AG/CFG {table[('ag', True)] / cfg:.2f} "
          f"(<= 2.1), batched <= branch-by-branch for every method")


if __name__ == "__main__":
    main()
