"""Training throughput and memory: boothkit vs the diffusers DreamBooth-LoRA examples, same model, same run.

`--family sd`: an SD-1.5-shaped model of reduced width (`build_sd_bench`, ~35 M UNet parameters) against
`train_dreambooth_lora.py`; `--family sana`: a SANA-shaped model of reduced width (`build_sana_bench`, f8
DC-AE, 8.9 M-parameter DiT) against `train_dreambooth_lora_sana.py`. Training at 128 px, batch 1, rank 4. Steady steps/s come from two run lengths (20 and 120 steps),
so start-up (imports, loading, caching) cancels out; peak RSS is the child's maxrss.

    python bench/train_speed.py [--family sd|sana] [--reference_script PATH/TO/train_dreambooth_lora[_sana].py]
                                [--refshim ../shared/tools/refshim/run_ref.py] [--resolution 128]

The reference script is fetched by the user (it is never part of boothkit) and run unmodified
through refshim. Without it only boothkit is measured. Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from boothkit.data.images import sample_subject_dir
from boothkit.testing.tiny import build_sana_bench, build_sd_bench

COMMON = ["--instance_prompt", "a photo of sks dog", "--train_batch_size", "1", "--rank", "4",
          "--learning_rate", "1e-4", "--seed", "0"]
BUILDERS = {"sd": build_sd_bench, "sana": build_sana_bench}
# Same LoRA targets for both trainers (the diffusers SANA script defaults to q/k/v, boothkit adds to_out.0).
FAMILY_FLAGS = {"sd": [], "sana": ["--lora_layers", "to_k,to_q,to_v"]}


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


def trainer_command(prefix: list[str], model: Path, images: Path, resolution: int, extra: list[str]):
    """The same flags for both trainers (they share the diffusers names)."""
    def command(steps: int, out: Path) -> list[str]:
        return [*prefix, "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
                "--output_dir", str(out), "--max_train_steps", str(steps), "--checkpointing_steps", "100000",
                "--resolution", str(resolution), *COMMON, *extra]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(BUILDERS), default="sd")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--model", type=Path, help="Use this pipeline folder instead of the family's bench model.")
    parser.add_argument("--reference_script", type=Path,
                        help="diffusers examples/dreambooth/train_dreambooth_lora.py (sd) or ..._sana.py (sana)")
    parser.add_argument("--refshim", type=Path, default=Path(__file__).resolve().parents[2] / "shared/tools/refshim/run_ref.py")
    parser.add_argument("--steps", type=int, nargs=2, default=(20, 120), metavar=("SHORT", "LONG"))
    parser.add_argument("--repeats", type=int, default=2, help="Repeat each measurement and keep the best.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="boothkit-bench-"))
    try:
        model = args.model or BUILDERS[args.family](work / "model")
        images = work / "images"
        shutil.copytree(sample_subject_dir(), images)
        extra = FAMILY_FLAGS[args.family]
        runs = [("boothkit", trainer_command([sys.executable, "-m", "boothkit", "train"], model, images,
                                             args.resolution, extra))]
        if args.reference_script:
            prefix = [sys.executable, str(args.refshim), str(args.reference_script)]
            runs.append(("diffusers", trainer_command(prefix, model, images, args.resolution, extra)))
        results = {}
        for name, command in runs:
            best = [measure(name, command, tuple(args.steps), work) for _ in range(args.repeats)]
            results[name] = max(best, key=lambda r: r["steps_per_s"])
        print(f"family {args.family}, model {args.model or 'bench'}, {args.resolution} px, batch 1, rank 4")
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
