"""Training throughput and memory: boothkit vs the diffusers DreamBooth-LoRA example, same model, same run.

The model is SD-1.5-shaped at reduced width (`boothkit.testing.tiny.build_sd_bench`, ~35 M UNet
parameters); training at 128 px, batch 1, rank 4. Steady steps/s come from two run lengths (20 and 120 steps),
so start-up (imports, loading, caching) cancels out; peak RSS is the child's maxrss.

    python bench/train_speed.py [--reference_script PATH/TO/train_dreambooth_lora.py]
                                [--refshim ../shared/tools/refshim/run_ref.py]

The reference script is fetched by the user (it is never part of boothkit) and run unmodified
through refshim. Without it only boothkit is measured. Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from boothkit.data.images import sample_subject_dir
from boothkit.testing.tiny import build_sd_bench

COMMON = ["--instance_prompt", "a photo of sks dog", "--resolution", "128", "--train_batch_size", "1",
          "--rank", "4", "--learning_rate", "1e-4", "--seed", "0"]


def timed_run(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child execs the command; its rusage is read back alone via wait4
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execvp(command[0], command)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(command)}")
    return elapsed, usage.ru_maxrss / 1024**2


def measure(name: str, make_command, steps: tuple[int, int], work: Path) -> dict:
    """Steady steps/s = (long - short) / (t_long - t_short); peak RSS of the long run."""
    times, peak = {}, 0.0
    for count in steps:
        out = work / f"{name}-{count}"
        shutil.rmtree(out, ignore_errors=True)
        times[count], rss = timed_run(make_command(count, out))
        peak = max(peak, rss)
    short, long = steps
    return {"name": name, "steps_per_s": (long - short) / (times[long] - times[short]), "peak_rss_gb": peak,
            "wall_long_s": times[long]}


def boothkit_command(model: Path, images: Path):
    def command(steps: int, out: Path) -> list[str]:
        return [sys.executable, "-m", "boothkit", "train", "--pretrained_model_name_or_path", str(model),
                "--instance_data_dir", str(images), "--output_dir", str(out), "--max_train_steps", str(steps),
                "--checkpointing_steps", "100000", *COMMON]
    return command


def reference_command(model: Path, images: Path, script: Path, refshim: Path):
    def command(steps: int, out: Path) -> list[str]:
        return [sys.executable, str(refshim), str(script), "--pretrained_model_name_or_path", str(model),
                "--instance_data_dir", str(images), "--output_dir", str(out), "--max_train_steps", str(steps),
                "--checkpointing_steps", "100000", *COMMON]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference_script", type=Path, help="diffusers examples/dreambooth/train_dreambooth_lora.py")
    parser.add_argument("--refshim", type=Path, default=Path(__file__).resolve().parents[2] / "shared/tools/refshim/run_ref.py")
    parser.add_argument("--steps", type=int, nargs=2, default=(20, 120), metavar=("SHORT", "LONG"))
    parser.add_argument("--repeats", type=int, default=2, help="Repeat each measurement and keep the best.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="boothkit-bench-"))
    try:
        model = build_sd_bench(work / "model")
        images = work / "images"
        shutil.copytree(sample_subject_dir(), images)
        runs = [("boothkit", boothkit_command(model, images))]
        if args.reference_script:
            runs.append(("diffusers", reference_command(model, images, args.reference_script, args.refshim)))
        results = {}
        for name, command in runs:
            best = [measure(name, command, tuple(args.steps), work) for _ in range(args.repeats)]
            results[name] = max(best, key=lambda r: r["steps_per_s"])
        report(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict) -> None:
    print(f"{'trainer':<10} {'steps/s':>8} {'peak RSS GB':>12}")
    for result in results.values():
        print(f"{result['name']:<10} {result['steps_per_s']:>8.2f} {result['peak_rss_gb']:>12.2f}")
    if "diffusers" in results:
        ours, ref = results["boothkit"], results["diffusers"]
        print(f"speed ratio boothkit/diffusers: {ours['steps_per_s'] / ref['steps_per_s']:.2f}x (target >= 1.3x)")
        print(f"memory ratio boothkit/diffusers: {ours['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x (target <= 1.0x)")


if __name__ == "__main__":
    main()
