"""Training throughput and memory: boothkit vs the diffusers DreamBooth examples, same model, same run.

`--family sd`: an SD-1.5-shaped model of reduced width (`build_sd_bench`, ~35 M UNet parameters) against
`train_dreambooth_lora.py`; `--family sana`: a SANA-shaped model of reduced width (`build_sana_bench`, f8
DC-AE, 8.9 M-parameter DiT) against `train_dreambooth_lora_sana.py`; `--family sdxl`: an SDXL-shaped model of
reduced width (`build_sdxl_bench`: two text encoders, ~54 M UNet parameters) against
`train_dreambooth_lora_sdxl.py`. Batch 1, rank 4, each trainer with its defaults otherwise (fp32, no TF32, no
checkpointing); `--prior` adds prior preservation (5 class images given to both, so neither generates any),
`--text_encoder` adds `--train_text_encoder`.

One CPU thread per trainer by default (`--threads`, as bench/guidance_cost.py): with torch's default of one
thread per core, a 2-core machine that has any other work running turns a 140 ms step into 2-5 s (OpenMP
threads waiting on a descheduled partner; measured: the same UNet step 4.8 s median at load 2.7 with two threads,
0.19 s with one). Ratios at one thread are compute ratios that reproduce; `--threads 0` keeps the default.

A round runs each trainer twice, a short and a long run (`--steps`, e.g. 10 and 40); steady steps/s =
(long − short) / (t_long − t_short), so start-up (imports, loading, caching) cancels; peak RSS is the larger
of the two children's maxrss. Each round gives one boothkit/diffusers ratio (the same machine load for both);
the order of the trainers alternates round by round. Printed: every round, then each ratio as its median with
a 95 % bootstrap interval and a verdict against the goal (≥ 2× steps/s, ≤ 1.0× peak RSS) — "undecided, run
longer" while the interval straddles the goal (`child_runs.ratio_line`).

    python bench/train_speed.py [--family sd|sana|sdxl] [--train_mode lora|full] [--prior] [--text_encoder]
                                [--reference_script PATH/TO/train_dreambooth[_lora[_sana|_sdxl]].py]
                                [--refshim ../shared/tools/refshim/run_ref.py] [--resolution 128] [--rounds 9]
                                [--steps 10 40] [-- FLAGS FOR BOTH TRAINERS]

The reference script is fetched by the user (it is never part of boothkit) and run unmodified
through refshim. Without it only boothkit is measured.

`--train_mode full` (sd only, against the full DreamBooth example `train_dreambooth.py`): boothkit runs `train
--train_mode full`; learning rate 5e-6, no prior preservation, text-encoder training or validation. Differences
by design, from the defaults: boothkit encodes the photos once (latents of both flips, `--cache_latents`) and
the prompt once; the diffusers examples encode every batch with the VAE (and, except SDXL/SANA with a fixed
prompt, the text encoder); boothkit's AdamW is the fused one, and it frees gradients between steps. boothkit
additionally saves `weak/` at 20 % of the steps (its autoguidance default): one save per run, so it cancels out
of steps/s but is part of boothkit's peak RSS. Measured figures and their command lines: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_runs import ratio_line, timed_run  # noqa: E402

from boothkit.data.images import sample_subject_dir  # noqa: E402
from boothkit.testing.tiny import build_sana_bench, build_sd_bench, build_sdxl_bench  # noqa: E402

COMMON = ["--instance_prompt", "a photo of sks dog", "--train_batch_size", "1", "--seed", "0"]
# Flags both trainers get in each mode, and those only boothkit gets (the reference script is per mode).
MODE_FLAGS = {"lora": ["--rank", "4", "--learning_rate", "1e-4"], "full": ["--learning_rate", "5e-6"]}
BOOTHKIT_FLAGS = {"lora": [], "full": ["--train_mode", "full"]}
BUILDERS = {"sd": build_sd_bench, "sana": build_sana_bench, "sdxl": build_sdxl_bench}
# Same LoRA targets for both trainers (the diffusers SANA script defaults to q/k/v, boothkit adds to_out.0).
FAMILY_FLAGS = {"sd": [], "sana": ["--lora_layers", "to_k,to_q,to_v"], "sdxl": []}
SPEED_GOAL, MEMORY_GOAL = 2.0, 1.0


def child_env(threads: int) -> dict[str, str]:
    """The children's environment: `threads` OpenMP/MKL threads each (0: torch's default, one per core)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def measure(name: str, make_command, steps: tuple[int, int], work: Path, env: dict[str, str]) -> dict:
    """Steady steps/s = (long - short) / (t_long - t_short), in wall and in CPU seconds (a child's CPU time
    is less sensitive than wall time to other processes loading the machine, not immune); peak RSS of both runs."""
    wall, cpu, peak = {}, {}, 0.0
    for count in steps:
        out = work / f"{name}-{count}"
        shutil.rmtree(out, ignore_errors=True)
        _, wall[count], cpu[count], rss = timed_run(make_command(count, out), env, work / f"{name}.log")
        peak = max(peak, rss)
    short, long = steps
    return {"name": name, "steps_per_s": (long - short) / (wall[long] - wall[short]),
            "steps_per_cpu_s": (long - short) / (cpu[long] - cpu[short]), "peak_rss_gb": peak,
            "wall_long_s": wall[long]}


def trainer_command(prefix: list[str], model: Path, images: Path, resolution: int, extra: list[str]):
    """The same flags for both trainers (they share the diffusers names)."""
    def command(steps: int, out: Path) -> list[str]:
        return [*prefix, "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
                "--output_dir", str(out), "--max_train_steps", str(steps), "--checkpointing_steps", "100000",
                "--resolution", str(resolution), *COMMON, *extra]
    return command


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(BUILDERS), default="sd")
    parser.add_argument("--train_mode", choices=sorted(MODE_FLAGS), default="lora",
                        help="lora: against train_dreambooth_lora[_sana|_sdxl].py; full: full fine-tuning of the UNet "
                             "against train_dreambooth.py (sd only).")
    parser.add_argument("--prior", action="store_true", help="Both trainers with prior preservation (5 class images).")
    parser.add_argument("--text_encoder", action="store_true", help="Both trainers with --train_text_encoder.")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--model", type=Path, help="Use this pipeline folder instead of the family's bench model.")
    parser.add_argument("--reference_script", type=Path,
                        help="diffusers examples/dreambooth/train_dreambooth_lora.py (sd), ..._sana.py or ..._sdxl.py; "
                             "train_dreambooth.py with --train_mode full")
    parser.add_argument("--refshim", type=Path, default=Path(__file__).resolve().parents[2] / "shared/tools/refshim/run_ref.py")
    parser.add_argument("--steps", type=int, nargs=2, default=(10, 40), metavar=("SHORT", "LONG"))
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of each trainer (default 1; 0: torch's default, one per core)")
    parser.add_argument("--rounds", "--repeats", type=int, default=9, help="Rounds; each measures every trainer once.")
    args, extra = parser.parse_known_args()
    args.extra = [flag for flag in extra if flag != "--"]  # after `--`: flags both trainers get (--mixed_precision ...)
    if args.train_mode == "full" and args.reference_script and args.family != "sd":
        parser.error("--train_mode full has a diffusers reference (train_dreambooth.py) only for --family sd")
    return args


def class_images(work: Path) -> Path:
    """Five class images (the sample photos mirrored): given to both trainers, so neither generates any."""
    folder = work / "class_images"
    folder.mkdir()
    for index, photo in enumerate(sorted(sample_subject_dir().iterdir())):
        if photo.suffix.lower() in {".jpg", ".jpeg", ".png"}:
            ImageOps.mirror(Image.open(photo).convert("RGB")).save(folder / f"class-{index}.png")
    return folder


def shared_flags(args: argparse.Namespace, work: Path) -> list[str]:
    flags = [*MODE_FLAGS[args.train_mode], *(FAMILY_FLAGS[args.family] if args.train_mode == "lora" else [])]
    if args.prior:
        count = str(len(list(class_images(work).iterdir())))
        flags += ["--with_prior_preservation", "--class_data_dir", str(work / "class_images"),
                  "--class_prompt", "a photo of dog", "--num_class_images", count]
    return flags + (["--train_text_encoder"] if args.text_encoder else []) + getattr(args, "extra", [])


def trainers(args: argparse.Namespace, model: Path, images: Path, shared: list[str]) -> list[tuple[str, object]]:
    """(name, command maker) of boothkit and, given its script, the diffusers reference: the same flags."""
    boothkit = [sys.executable, "-m", "boothkit", "train", *BOOTHKIT_FLAGS[args.train_mode]]
    runs = [("boothkit", trainer_command(boothkit, model, images, args.resolution, shared))]
    if args.reference_script:
        prefix = [sys.executable, str(args.refshim), str(args.reference_script)]
        runs.append(("diffusers", trainer_command(prefix, model, images, args.resolution, shared)))
    return runs


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="boothkit-bench-"))
    try:
        model = args.model or BUILDERS[args.family](work / "model")
        images = work / "images"
        shutil.copytree(sample_subject_dir(), images)
        runs = trainers(args, model, images, shared_flags(args, work))
        rounds = []
        for index in range(args.rounds):  # A B, B A, A B, ...: both trainers see the same load, neither always first
            order = runs if index % 2 == 0 else runs[::-1]
            rounds.append({name: measure(name, command, tuple(args.steps), work, child_env(args.threads))
                           for name, command in order})
        setting = "rank 4" if args.train_mode == "lora" else "full fine-tuning (UNet)"
        extras = [flag for flag, on in (("prior preservation", args.prior), ("text-encoder LoRA", args.text_encoder)) if on]
        print(f"family {args.family}, mode {args.train_mode}, model {args.model or 'bench'}, {args.resolution} px, "
              f"batch 1, {setting}{''.join(', ' + e for e in extras)}, steps {args.steps[0]}/{args.steps[1]}, "
              f"{args.rounds} rounds, {args.threads or 'default'} thread(s), load average {os.getloadavg()[0]:.1f} at the end")
        report(rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(rounds: list[dict]) -> None:
    """Each round's numbers; per trainer the medians; the ratios per round, as median, interval and verdict."""
    print(f"{'round':<6} {'trainer':<10} {'steps/s':>8} {'steps/CPU-s':>12} {'peak RSS GB':>12}")
    names = sorted(rounds[0])
    for index, result in enumerate([*rounds, None]):
        for name in names:
            values = [r[name] for r in rounds] if result is None else [result[name]]
            numbers = [statistics.median(v[key] for v in values) for key in ("steps_per_s", "steps_per_cpu_s", "peak_rss_gb")]
            label = "median" if result is None else str(index + 1)
            print(f"{label:<6} {name:<10} {numbers[0]:>8.2f} {numbers[1]:>12.2f} {numbers[2]:>12.2f}")
    if "diffusers" in rounds[0]:
        for key, label in (("steps_per_s", "steps/s"), ("steps_per_cpu_s", "steps/CPU-s")):
            ratios = [r["boothkit"][key] / r["diffusers"][key] for r in rounds]
            print(ratio_line(f"boothkit/diffusers {label}", ratios, goal=SPEED_GOAL))
        memory = [r["boothkit"]["peak_rss_gb"] / r["diffusers"]["peak_rss_gb"] for r in rounds]
        print(ratio_line("boothkit/diffusers peak RSS", memory, goal=MEMORY_GOAL, at_least=False))


if __name__ == "__main__":
    main()
