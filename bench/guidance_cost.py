"""Cost of guidance: seconds per image for CFG, CFG + AG and WIG, batched vs branch by branch.

Model (`--family`): the SD-1.5-shaped bench model of reduced width (`build_sd_bench`, ~35 M UNet
parameters; DDIM), the SDXL-shaped one (`build_sdxl_bench`, ~54 M UNet parameters, two text encoders; its own
scheduler, Euler) or the SANA-shaped one (`build_sana_bench`; FlowDPM-Solver), with random rank-4 fine and
weak LoRAs (on every text encoder too where the family trains them: SD's one, SDXL's two). Each configuration
samples the same images (same seeds); each timed run follows an untimed run of the same configuration, the
order rotates every round; ratios are taken within a round and reported as median [range] over `--repeats` rounds.

    python bench/guidance_cost.py [--family sd|sdxl|sana] [--resolution 256] [--steps 10] [--images 2] [--repeats 3]

Targets: WIG ≤ 1.05× CFG; CFG + AG ≤ 2.1× CFG; batched ≤ branch by branch for every method.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from child_runs import ratio_line

from boothkit.families import load_family
from boothkit.formats.metadata import LoraDescription
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GuidedSampler, SamplerSettings, load_guidance_adapters
from boothkit.guidance.settings import resolve_scheduler
from boothkit.testing.tiny import build_sana_bench, build_sd_bench, build_sdxl_bench
from boothkit.train.lora import attach_lora, save_lora

METHODS = {"cfg": {"guidance_scale": 7.5}, "ag": {"guidance_scale": 2.0, "cfg_scale": 7.5},
           "wig": {"guidance_scale": 7.5, "omega": 0.3}}
PROMPTS = ["a sks dog in the snow"]


def write_random_loras(model: Path, root: Path) -> Path:
    """Fine LoRA in root/ and weak LoRA in root/weak/, with random (non-zero) B so they change outputs; on the
    denoiser and on each text encoder of a family that trains them."""
    for seed, folder in ((1, root), (2, root / "weak")):
        family = load_family(str(model))
        modules = {family.denoiser_name: family.denoiser}
        if family.text_encoder_lora_targets:
            modules.update(family.named_text_encoders)
        for index, (name, module) in enumerate(modules.items()):
            targets = family.denoiser_lora_targets if name == family.denoiser_name else family.text_encoder_lora_targets
            attach_lora(module, targets, rank=4, alpha=4, seed=seed * 10 + index)
            with torch.no_grad():
                for param_name, param in module.named_parameters():
                    if "lora_B" in param_name:
                        param.normal_(std=0.02, generator=torch.Generator().manual_seed(seed))
        save_lora(family, modules, folder, LoraDescription(family.base_model, f"random bench LoRA {seed}"))
    return root


def build_sampler(model: Path, lora: Path, method: str, batched: bool, args) -> GuidedSampler:
    family = load_family(str(model))
    guidance = make_guidance(method, **METHODS[method])
    adapters = load_guidance_adapters(family, str(lora), None, guidance)
    scheduler = resolve_scheduler(family.default_scheduler, family)
    settings = SamplerSettings(args.steps, args.resolution, args.resolution, scheduler, batch_size=args.images,
                               batched_branches=batched, progress=False)
    return GuidedSampler(family, guidance, settings, adapters)


def seconds_per_image(samplers: dict, args) -> list[dict]:
    """Seconds per image of every configuration, one dict per round. A configuration that runs right after a
    heavier one is slowed by the state that one left (allocator, caches): measured here, 1.3x on a 2-core
    machine. So every timed run follows an untimed run of the same configuration, and the order rotates every
    round; ratios are taken within a round (the same machine load) and summarised over rounds."""
    keys = list(samplers)
    rounds = []
    for round_index in range(args.repeats):
        times = {}
        for key in keys[round_index % len(keys):] + keys[:round_index % len(keys)]:
            samplers[key].generate(PROMPTS, None, args.images, seed=0)  # settle
            start = time.perf_counter()
            samplers[key].generate(PROMPTS, None, args.images, seed=0)
            times[key] = (time.perf_counter() - start) / args.images
        rounds.append(times)
    return rounds


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd", "sdxl", "sana"), default="sd")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=2, help="images per batch (one prompt)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="boothkit-guidance-bench-") as work:
        builders = {"sd": build_sd_bench, "sdxl": build_sdxl_bench, "sana": build_sana_bench}
        model = builders[args.family](Path(work) / "model")
        lora = write_random_loras(model, Path(work) / "lora")
        samplers = {(m, b): build_sampler(model, lora, m, b, args) for m in METHODS for b in (True, False)}
        rounds = seconds_per_image(samplers, args)
    print(f"{args.family}, {args.resolution}px, {args.steps} steps, {args.images} images per batch, {args.repeats} "
          "rounds: medians [range]")
    print(f"{'method':<8} {'batched s/img':>14} {'branch-by-branch s/img':>23} {'batched/branch':>18} {'vs CFG':>18}")
    ratios = {}
    for method in METHODS:
        batched = statistics.median(r[(method, True)] for r in rounds)
        single = statistics.median(r[(method, False)] for r in rounds)
        per_branch = [r[(method, True)] / r[(method, False)] for r in rounds]
        ratios[method] = [r[(method, True)] / r[("cfg", True)] for r in rounds]
        print(f"{method:<8} {batched:>14.3f} {single:>23.3f} {_median_range(per_branch):>18} "
              f"{_median_range(ratios[method]):>18}")
    print(ratio_line("WIG/CFG s per image", ratios["wig"], goal=1.05, at_least=False))  # a verdict only when the
    print(ratio_line("AG/CFG s per image", ratios["ag"], goal=2.1, at_least=False))  # interval is on one side


if __name__ == "__main__":
    main()
