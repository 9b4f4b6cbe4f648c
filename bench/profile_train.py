"""Where a training step's time goes: boothkit vs the diffusers DreamBooth example, under torch.profiler.

Each trainer runs in its own child process, unmodified, on the same bench model (`train_speed.BUILDERS`) and
flags (`train_speed.trainers`). The child patches `torch.optim.Optimizer.step` so that every optimizer step is
one profiler step: the first `--wait` steps (warm-up, allocator growth) are skipped and the next `--active`
are recorded, so loading and start-up are outside the table. Global module hooks time the forward of each
top-level model (UNet / transformer, VAE, text encoders); the rest of a step is backward, the optimizer and
Python. Printed per trainer: ms per step by part, then `key_averages()` sorted by self CPU time.

    python bench/profile_train.py [--family sd|sana|sdxl] [--reference_script PATH] [--resolution 128]
                                  [--wait 5] [--active 10] [--rows 20] [-- extra flags for both trainers]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import BUILDERS, shared_flags, trainers  # noqa: E402

from boothkit.data.images import sample_subject_dir  # noqa: E402

# The models whose forward is timed as a whole; anything nested inside them counts for the outer one (a VAE is
# timed by its Encoder/Decoder: `vae.encode` is not its forward).
TOP_LEVEL = ("UNet2DConditionModel", "Encoder", "Decoder", "SanaTransformer2DModel", "AutoencoderKL", "AutoencoderDC", "CLIPTextModel",
             "CLIPTextModelWithProjection", "Gemma2Model", "Gemma2ForCausalLM")


class StepTimer:
    """Forward time of each top-level model and wall time of each optimizer step, for the recorded steps."""

    def __init__(self, wait: int, active: int):
        self.wait, self.active, self.steps = wait, active, 0
        self.forward = defaultdict(float)
        self.depth, self.started, self.step_start, self.step_total, self.optimizer = 0, 0.0, None, 0.0, 0.0

    @property
    def recording(self) -> bool:
        return self.wait <= self.steps < self.wait + self.active

    def pre_hook(self, module, args):
        if type(module).__name__ in TOP_LEVEL:
            self.depth += 1
            if self.depth == 1:
                self.started = time.perf_counter()

    def post_hook(self, module, args, output):
        if type(module).__name__ in TOP_LEVEL:
            self.depth -= 1
            if self.depth == 0 and self.recording:
                self.forward[type(module).__name__] += time.perf_counter() - self.started

    def summary(self) -> dict[str, float]:
        """ms per recorded step: each model's forward, the optimizer, and the rest (backward, Python)."""
        per_step = {f"forward {name}": 1000 * value / self.active for name, value in sorted(self.forward.items())}
        per_step["optimizer step"] = 1000 * self.optimizer / self.active
        per_step["rest (backward, data, Python)"] = (1000 * self.step_total / self.active - sum(per_step.values()))
        per_step["whole step"] = 1000 * self.step_total / self.active
        return per_step


def child(args: argparse.Namespace, command: list[str]) -> None:
    """Run one trainer in this process under the profiler; write the summary and the op table to --report."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    timer = StepTimer(args.wait, args.active)
    torch.nn.modules.module.register_module_forward_pre_hook(timer.pre_hook)
    torch.nn.modules.module.register_module_forward_hook(timer.post_hook)
    tables = []
    profiler = profile(activities=[ProfilerActivity.CPU],
                       schedule=schedule(wait=args.wait - 1, warmup=1, active=args.active, repeat=1),
                       on_trace_ready=lambda done: tables.append(
                           done.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)))
    started = [0.0]

    def before_step(optimizer, a, k):
        started[0] = time.perf_counter()

    def after_step(optimizer, a, k):  # one optimizer step = one profiler step, timed from the end of the previous
        now = time.perf_counter()
        if timer.recording:
            timer.optimizer += now - started[0]
            timer.step_total += now - timer.step_start
        timer.steps += 1
        timer.step_start = now
        profiler.step()

    register_optimizer_step_pre_hook(before_step)
    register_optimizer_step_post_hook(after_step)
    profiler.start()
    module = command[1:3] == ["-m", "boothkit"]
    sys.argv = ["boothkit", *command[3:]] if module else command[1:]
    try:
        runpy.run_module("boothkit", run_name="__main__") if module else runpy.run_path(command[1], run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    finally:
        profiler.stop()
    Path(args.report).write_text(json.dumps({"summary": timer.summary(), "table": tables[0]}))


def caching_bound(boothkit: dict[str, float], reference: dict[str, float]) -> str:
    """Amdahl's bound on what encoding once (and a faster optimizer) can buy: the reference's step over the same
    step without its per-step encoder forwards (VAE encoder, text encoders) and with boothkit's optimizer time.
    The denoiser's forward and backward are the same math in both trainers."""
    encoders = sum(ms for part, ms in reference.items() if part.startswith("forward") and not
                   any(name in part for name in ("UNet", "Transformer")))
    without = reference["whole step"] - encoders - reference["optimizer step"] + boothkit["optimizer step"]
    return (f"\nreference step {reference['whole step']:.1f} ms, of which per-step encoding {encoders:.1f} ms and "
            f"optimizer {reference['optimizer step']:.1f} ms: caching the encodings and boothkit's optimizer can "
            f"make it at most {reference['whole step'] / without:.2f}x faster; measured here (profiled) "
            f"{reference['whole step'] / boothkit['whole step']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(BUILDERS), default="sd")
    parser.add_argument("--train_mode", default="lora", choices=("lora", "full"))
    parser.add_argument("--prior", action="store_true", help="Both trainers with prior preservation.")
    parser.add_argument("--text_encoder", action="store_true", help="Both trainers with --train_text_encoder.")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--reference_script", type=Path)
    parser.add_argument("--refshim", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/tools/refshim/run_ref.py")
    parser.add_argument("--wait", type=int, default=5)
    parser.add_argument("--active", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    if args.child:
        return child(args, json.loads(args.child))
    work = Path(tempfile.mkdtemp(prefix="boothkit-profile-"))
    try:
        model = args.model or BUILDERS[args.family](work / "model")
        images = work / "images"
        shutil.copytree(sample_subject_dir(), images)
        summaries = {}
        for name, make in trainers(args, model, images, shared_flags(args, work)):
            command = [*make(args.wait + args.active + 1, work / f"out-{name}"), *extra]
            report = work / f"{name}.json"
            own = [flag for flag in sys.argv[1:] if flag != "--" and flag not in extra]
            os.spawnv(os.P_WAIT, sys.executable, [sys.executable, __file__, *own, "--child", json.dumps(command),
                                                   "--report", str(report)])
            if not report.exists():
                raise SystemExit(f"the {name} run failed: {' '.join(command)}")
            result = json.loads(report.read_text())
            print(f"\n== {name}: ms per step over {args.active} steps (after {args.wait}) ==")
            for part, ms in result["summary"].items():
                print(f"  {part:<34} {ms:8.1f}")
            print(result["table"])
            summaries[name] = result["summary"]
        if len(summaries) == 2:
            print(caching_bound(summaries["boothkit"], summaries["diffusers"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
