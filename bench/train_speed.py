"""Training throughput and memory: boothkit vs the diffusers DreamBooth-LoRA examples, same model, same run.

`--family sd`: an SD-1.5-shaped model of reduced width (`build_sd_bench`, ~35 M UNet parameters) against
`train_dreambooth_lora.py`; `--family sana`: a SANA-shaped model of reduced width (`build_sana_bench`, f8
DC-AE, 8.9 M-parameter DiT) against `train_dreambooth_lora_sana.py`; `--family sdxl`: an SDXL-shaped model of
reduced width (`build_sdxl_bench`: two text encoders, ~54 M UNet parameters) against
`train_dreambooth_lora_sdxl.py`. Training at 128 px, batch 1, rank 4, each trainer with its defaults
otherwise. Steady steps/s come from two run lengths (20 and 120 steps), so start-up (imports, loading,
caching) cancels out; peak RSS is the child's maxrss. The trainers alternate run by run (`--repeats` rounds),
and the ratios are reported as the median over the rounds with their range: these machines are noisy.

    python bench/train_speed.py [--family sd|sana|sdxl] [--reference_script PATH/TO/train_dreambooth_lora[_sana|_sdxl].py]
                                [--refshim ../shared/tools/refshim/run_ref.py] [--resolution 128] [--repeats 3]

The reference script is fetched by the user (it is never part of boothkit) and run unmodified
through refshim. Without it only boothkit is measured. Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path

from boothkit.data.images import sample_subject_dir
from boothkit.testing.tiny import build_sana_bench, build_sd_bench, build_sdxl_bench

COMMON = ["--instance_prompt", "a photo of sks dog", "--train_batch_size", "1", "--rank", "4",
          "--learning_rate", "1e-4", "--seed", "0"]
BUILDERS = {"sd": build_sd_bench, "sana": build_sana_bench, "sdxl": build_sdxl_bench}
# Same LoRA targets for both trainers (the diffusers SANA script defaults to q/k/v, boothkit adds to_out.0).
FAMILY_FLAGS = {"sd": [], "sana": ["--lora_layers", "to_k,to_q,to_v"], "sdxl": []}


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
                        help="diffusers examples/dreambooth/train_dreambooth_lora.py (sd), ..._sana.py or ..._sdxl.py")
    parser.add_argument("--refshim", type=Path, default=Path(__file__).resolve().parents[2] / "shared/tools/refshim/run_ref.py")
    parser.add_argument("--steps", type=int, nargs=2, default=(20, 120), metavar=("SHORT", "LONG"))
    parser.add_argument("--repeats", type=int, default=3, help="Rounds; each measures every trainer once.")
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
        rounds = []
        for _ in range(args.repeats):  # A, B, A, B, ...: both trainers see the same machine load
            rounds.append({name: measure(name, command, tuple(args.steps), work) for name, command in runs})
        print(f"family {args.family}, model {args.model or 'bench'}, {args.resolution} px, batch 1, rank 4, "
              f"{args.repeats} rounds")
        report(rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f})"


def report(rounds: list[dict]) -> None:
    """Per trainer the median steps/s and peak RSS; the ratios per round, as median and range."""
    print(f"{'trainer':<10} {'steps/s':>8} {'peak RSS GB':>12}")
    for name in rounds[0]:
        speed = statistics.median(r[name]["steps_per_s"] for r in rounds)
        memory = statistics.median(r[name]["peak_rss_gb"] for r in rounds)
        print(f"{name:<10} {speed:>8.2f} {memory:>12.2f}")
    if "diffusers" in rounds[0]:
        speed = [r["boothkit"]["steps_per_s"] / r["diffusers"]["steps_per_s"] for r in rounds]
        memory = [r["boothkit"]["peak_rss_gb"] / r["diffusers"]["peak_rss_gb"] for r in rounds]
        print(f"speed ratio boothkit/diffusers: {_median_range(speed)}x (target >= 1.3x)")
        print(f"memory ratio boothkit/diffusers: {_median_range(memory)}x (target <= 1.0x)")


if __name__ == "__main__":
    main()
