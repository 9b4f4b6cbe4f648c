"""Cost of guidance per denoising step: WIG/CFG and CFG + AG/CFG, over families × resolutions × images.

What is timed: the denoising loop of `GuidedSampler.sample` only — from the start of the first step's `denoise`
call (all branches' forward passes, the per-row LoRA scales, the rule's combination) to the end of the last
step's `scheduler.step`; per-step cost = that time / `--steps`. What is not: loading the model and the LoRAs,
prompt encoding (each configuration's conditioning is encoded once, before any timing), drawing the initial
noise and setting the scheduler's timesteps, and VAE decoding (the bench replaces each family's `decode` by a
no-op: no image is looked at, and the untimed runs skip its cost too).

Models (`--families`): the SD-1.5-shaped bench model of reduced width (`build_sd_bench`, ~35 M UNet
parameters; DDIM), the SDXL-shaped one (`build_sdxl_bench`, ~54 M UNet parameters, two text encoders; Euler)
and the SANA-shaped one (`build_sana_bench`; FlowDPM-Solver), each with random rank-4 fine and weak LoRAs (on
every text encoder too where the family trains them). One model build per family; every combination of
`--resolutions` and `--images` (one prompt, that many images in one batch) is a grid point.

Interleaved: at a grid point, every round runs every configuration (CFG, CFG + AG, WIG; with
`--branch_by_branch` also each branch by branch), each as an untimed settle run then a timed run of the same
configuration, the order rotating every round; ratios are taken within a round (the same machine load) and
reported as median with 95 % bootstrap interval and a verdict (`child_runs.ratio_line`: 'undecided, run
longer' while the interval straddles the goal).

One torch thread by default (`--threads`): on the shared 2-core machine with other work running (load 4-5),
torch's default (one thread per core) gave SD 64 px 0.5-8 s per step and ratios anywhere in 0.2-7x, burning
193 s of CPU in 309 s of wall time for steps that take ~80 ms on one thread (most likely OpenMP threads spinning
at barriers while their partner is descheduled); with one thread: 78-84 ms per step, ratios within ±4 %. So the
ratios are per-step compute ratios on one core; `--threads 0` keeps torch's default (one per core).

    python bench/guidance_cost.py                       # sd, 256 px, 1 image, 4 steps, 9 rounds, 1 thread
    python bench/guidance_cost.py --families sd sana sdxl --resolutions 64 256 512 --images 1 4 --rounds 9 --steps 4
    python bench/guidance_cost.py --families sd --resolutions 64 --images 1 --rounds 3 --steps 2  # smoke

Goals (issue 16): WIG ≤ 1.05× CFG and CFG + AG ≤ 2.1× CFG per denoising step, at 64–512 px and 1–4 images,
for SD, SANA and SDXL; with `--branch_by_branch`, batched ≤ branch by branch for every method.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from child_runs import bootstrap_interval, ratio_line, verdict

from boothkit.families import load_family
from boothkit.formats.metadata import LoraDescription
from boothkit.guidance.rules import make_guidance
from boothkit.guidance.sampler import GuidedSampler, SamplerSettings, load_guidance_adapters
from boothkit.guidance.settings import resolve_scheduler
from boothkit.testing.tiny import build_sana_bench, build_sd_bench, build_sdxl_bench
from boothkit.train.lora import attach_lora, save_lora

METHODS = {"cfg": {"guidance_scale": 7.5}, "ag": {"guidance_scale": 2.0, "cfg_scale": 7.5},
           "wig": {"guidance_scale": 7.5, "omega": 0.3}}
GOALS = {"wig": 1.05, "ag": 2.1}  # per-step cost relative to CFG, at most
PROMPTS = ["a sks dog in the snow"]
BUILDERS = {"sd": build_sd_bench, "sdxl": build_sdxl_bench, "sana": build_sana_bench}


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


class LoopTimedSampler(GuidedSampler):
    """A `GuidedSampler` that stamps the start of each step's `denoise` call and, through `sample`'s progress-bar
    hook (`update`, called right after `scheduler.step`), the end of each step."""

    stamps: list[float]

    def denoise(self, latents, timestep, conditioning):
        self.stamps.append(time.perf_counter())
        return super().denoise(latents, timestep, conditioning)

    def update(self, _steps: int = 1) -> None:  # `sample` passes the sampler itself as its `bar`
        self.stamps.append(time.perf_counter())

    def ms_per_step(self, conditioning: dict, images: int) -> float:
        """Milliseconds per denoising step of one batch of `images` (seeds 0, 1, ...): first step's start to
        last step's end, divided by the steps."""
        self.stamps = []
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(images)]
        self.sample({branch: c.index([0] * images) for branch, c in conditioning.items()}, generators, bar=self)
        return 1000 * (self.stamps[-1] - self.stamps[0]) / self.settings.num_inference_steps


def load_methods(model: Path, lora: Path) -> dict:
    """Per method: its family (LoRAs loaded and active for that rule; `decode` a no-op), guidance, adapters and
    conditioning of `PROMPTS` (encoded here, once, untimed)."""
    loaded = {}
    for method, settings in METHODS.items():
        family = load_family(str(model))
        family.decode = lambda latents: []  # the bench looks at no image: skip the VAE (untimed anyway)
        guidance = make_guidance(method, **settings)
        adapters = load_guidance_adapters(family, str(lora), None, guidance)
        probe = GuidedSampler(family, guidance, SamplerSettings(1, 64, 64, "ddim", progress=False), adapters)
        loaded[method] = (family, guidance, adapters, probe.conditioning(PROMPTS, None))
    return loaded


def grid_samplers(loaded: dict, resolution: int, images: int, steps: int, branch_by_branch: bool) -> dict:
    """The configurations of one grid point: (method, batched) → (sampler, conditioning)."""
    samplers = {}
    for method, (family, guidance, adapters, conditioning) in loaded.items():
        scheduler = resolve_scheduler(family.default_scheduler, family)
        for batched in (True, False) if branch_by_branch else (True,):
            settings = SamplerSettings(steps, resolution, resolution, scheduler, batch_size=images,
                                       batched_branches=batched, progress=False)
            samplers[method, batched] = (LoopTimedSampler(family, guidance, settings, adapters), conditioning)
    return samplers


def interleaved_rounds(samplers: dict, images: int, rounds: int) -> list[dict]:
    """Milliseconds per step of every configuration, one dict per round. A configuration that runs right after a
    heavier one is slowed by the state that one left (allocator, caches): measured, 1.3x on a 2-core machine.
    So every timed run follows an untimed run of the same configuration, and the order rotates every round."""
    keys = list(samplers)
    result = []
    for round_index in range(rounds):
        shift = round_index % len(keys)
        times = {}
        for key in keys[shift:] + keys[:shift]:
            sampler, conditioning = samplers[key]
            sampler.ms_per_step(conditioning, images)  # settle
            times[key] = sampler.ms_per_step(conditioning, images)
        result.append(times)
    return result


def point_report(rounds: list[dict], branch_by_branch: bool) -> dict:
    """Print one grid point's figures; return its summary row's (median CFG ms/step, per-method ratios)."""
    cfg_ms = statistics.median(r["cfg", True] for r in rounds)
    ratios = {method: [r[method, True] / r["cfg", True] for r in rounds] for method in GOALS}
    print(f"  CFG: {cfg_ms:.1f} ms/step (median; range {min(r['cfg', True] for r in rounds):.1f}-"
          f"{max(r['cfg', True] for r in rounds):.1f})")
    for method, goal in GOALS.items():
        print("  " + ratio_line(f"{method.upper()}/CFG per step", ratios[method], goal=goal, at_least=False))
    if branch_by_branch:
        for method in METHODS:
            per_branch = [r[method, True] / r[method, False] for r in rounds]
            print("  " + ratio_line(f"{method.upper()} batched/branch by branch", per_branch, goal=1.0,
                                    at_least=False))
    return {"cfg_ms": cfg_ms, "ratios": ratios}


def summary_table(rows: list[tuple]) -> None:
    """family, px, images, CFG ms/step, then per goal: median ratio (95 % interval) and verdict."""
    head = f"{'family':<6} {'px':>4} {'imgs':>4} {'CFG ms/step':>11}"
    for method, goal in GOALS.items():
        head += f"  {method.upper() + '/CFG (95%)':<19} {'verdict (<=' + format(goal, 'g') + ')':<21}"
    print("\n" + head.rstrip())
    for family, px, images, report in rows:
        line = f"{family:<6} {px:>4} {images:>4} {report['cfg_ms']:>11.1f}"
        for method, goal in GOALS.items():
            values = report["ratios"][method]
            low, high = bootstrap_interval(values)
            figure = f"{statistics.median(values):.2f} ({low:.2f}-{high:.2f})"
            line += f"  {figure:<19} {verdict(values, goal, at_least=False):<21}"
        print(line.rstrip())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", "--family", nargs="+", choices=tuple(BUILDERS), default=["sd"])
    parser.add_argument("--resolutions", "--resolution", nargs="+", type=int, default=[256], help="pixels (square)")
    parser.add_argument("--images", nargs="+", type=int, default=[1], help="images per batch (one prompt)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run")
    parser.add_argument("--rounds", "--repeats", type=int, default=9, help="interleaved rounds per grid point")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: see the module docstring; 0 keeps torch's default)")
    parser.add_argument("--branch_by_branch", action="store_true",
                        help="also time each method branch by branch (doubles the run time)")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 2:
        parser.error("--steps must be at least 1 and --rounds at least 2 (ratios need pairs)")
    return args


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch CPU threads: {torch.get_num_threads()}")
    rows = []
    started = time.perf_counter()
    for family_name in args.families:
        with tempfile.TemporaryDirectory(prefix="boothkit-guidance-bench-") as work:
            model = BUILDERS[family_name](Path(work) / "model")
            loaded = load_methods(model, write_random_loras(model, Path(work) / "lora"))
            for resolution in args.resolutions:
                for images in args.images:
                    point = time.perf_counter()
                    samplers = grid_samplers(loaded, resolution, images, args.steps, args.branch_by_branch)
                    rounds = interleaved_rounds(samplers, images, args.rounds)
                    print(f"{family_name}, {resolution} px, {images} image(s), {args.steps} steps, {args.rounds} "
                          f"rounds ({time.perf_counter() - point:.0f} s):", flush=True)
                    rows.append((family_name, resolution, images, point_report(rounds, args.branch_by_branch)))
    summary_table(rows)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; per denoising step, without loading, prompt encoding "
          "or VAE decoding")


if __name__ == "__main__":
    main()
