"""Cost of `boothkit study`: wall time of a 3-subject tiny study in one process vs two, and each stage's share.

The study is tests/test_study.py's: tiny models (`build_tiny("sd15"|"dino"|"clip")`), the 3 subjects of
tests/data/study (cat, cat2, can; 3 photos each at 64 px), 2 recipes (dreambooth and "strong", learning rate
1e-3) x methods cfg and wig, 2 training steps, evaluations of 2 inference steps, 2 images per prompt, 1 prompt,
at most 2 evaluations per search, ω grid [0, 1]: 6 jobs (trainings), 12 evaluations. Every run is a child
process (as bench/train_speed.py, bench/pdm_cost.py) in a fresh output folder and a fresh BOOTHKIT_CACHE_DIR,
with OMP_NUM_THREADS set (`--threads`, default 1: as torchrun sets it, and as the tests run).

1. One process vs two: `python -m boothkit study ...` against `python -m torch.distributed.run --nproc_per_node 2
   --master_port 0 -m boothkit study ...` (each process takes every other job; process 0 then waits for the
   other's jobs, polling every 5 s, and writes the tables). Per round the speed-up = 1-process wall time /
   2-process wall time, reported as the median over the rounds with its range. CPU seconds are the child's
   user + system time including its reaped children (torchrun's workers); peak RSS is the largest single
   process of the tree (maxrss), not their sum.
2. Stage shares: the same single-process study run in a child Python (`python bench/study_cost.py
   --stages_child ...`) that wraps `boothkit.study.run.train_job`, `evaluate_job` and
   `boothkit.study.table.write_tables` with timers before calling `boothkit.cli.main(["study", ...])`, and prints
   the sums as JSON; boothkit itself is not modified. Start-up = from the parent's launch of the child to the
   first training (interpreter, imports, plan, the first job's digests of photos and model); other = the rest
   of the wall time (job records and digests of later jobs, progress bar, interpreter exit).

The three runs of a round alternate (the order reverses every other round) over `--repeats` rounds, so they
see the same machine load. These machines are noisy: read the spread, not one number.

    python bench/study_cost.py [--repeats 3] [--threads 1] [--max_train_steps 2] [--num_inference_steps 2]
                               [--num_images_per_prompt 2] [--max_prompts 1] [--max_evaluations 2]
                               [--resolution N] [--keep DIR]

Larger per-job sizes (`--max_train_steps 50 --num_inference_steps 10 ...`) shift the balance from start-up to
the stages themselves, and with it the speed-up towards 2x.

Measured on a busy machine (2 CPU cores, load average 2.9 at the start and throughout: another engineer's test
suite ran on both cores, so the two study processes never had two free cores; the wall times are an upper bound,
and the speed-up is likely below a quiet machine's; ~3 minutes; an earlier 2-round run that started at load
1.3 gave 1.05 (range 0.91-1.19)x, the same shares within 3 points):

    python bench/study_cost.py --repeats 3

    round  run           wall s   CPU s  peak RSS GB
    1      1 process       18.5    15.3         0.52
    1      2 processes     21.6    23.2         0.52
    1      stages          21.3    15.1         0.52
    2      1 process       16.9    15.3         0.52
    2      2 processes     21.2    22.8         0.51
    2      stages          18.4    15.2         0.52
    3      1 process       18.0    14.8         0.52
    3      2 processes     20.3    23.2         0.52
    3      stages          15.8    15.1         0.52
    median 1 process       18.0    15.3         0.52
    median 2 processes     21.2    23.2         0.52
    median stages          18.4    15.1         0.52
    speed-up 1 process / 2 processes (wall): 0.86 (range 0.80-0.89)x
    CPU time 2 processes / 1 process: 1.52 (range 1.49-1.56)x
    study.csv identical across every run: yes

    stages of the single-process study (timers around train_job, evaluate_job, write_tables)
    round     start-up    training  evaluation  tabulation       other  wall s
    1             1.5s        6.5s       11.2s        0.2s        2.0s    21.3
    2             1.7s        5.8s        9.5s        0.1s        1.3s    18.4
    3             1.3s        5.3s        8.0s        0.1s        1.2s    15.8
    share start-up    8.0 (range 6.9-9.2) %
    share training    31.5 (range 30.6-33.6) %
    share evaluation  51.3 (range 50.4-52.4) %
    share tabulation  0.7 (range 0.7-0.7) %
    share other       7.4 (range 7.3-9.4) %
    per call (s): the first one (it pays the lazy imports and first loads) and the median of the others
    training         first 3.93 (range 3.38-3.96), later 0.23 (range 0.21-0.36)
    evaluation cfg   first 0.98 (range 0.91-1.10), later 0.61 (range 0.53-0.73)
    evaluation wig   first 0.81 (range 0.71-0.99), later 0.83 (range 0.72-0.96)

At the tests' sizes two processes are slower than one (0.86x): the study is one-off costs, not work. The first
training of a process takes 3.9 s against 0.23 s for each later one (train_job's lazy imports of the trainer and
diffusers, the first model load), so the real per-process start-up is ~1.5 + 3.7 + 0.4 (first cfg evaluation)
≈ 5.6 s of a 16-18 s study; every torchrun worker pays it again, and torchrun's launcher imports torch too: the
2-process study spends 1.5x the CPU time (+8 s) of the 1-process one. Evaluation is half of the time (12 calls;
wig, with its ω sweep, costs more than cfg once warm), training a third (most of it that first call), writing the
tables under 1 %; "other" (job records, the digests of photos and model per job, exit) 7 %.

With a larger per-job size, same machine and load (load average 2.7 at the start, 3.1 at the end; ~4.5 minutes):

    python bench/study_cost.py --repeats 2 --max_train_steps 100 --num_inference_steps 20 --max_prompts 2

    round  run           wall s   CPU s  peak RSS GB
    1      1 process       46.2    44.6         0.52
    1      2 processes     40.1    51.7         0.51
    1      stages          44.8    41.6         0.52
    2      1 process       48.2    45.1         0.52
    2      2 processes     39.7    51.0         0.51
    2      stages          47.6    44.2         0.52
    median 1 process       47.2    44.8         0.52
    median 2 processes     39.9    51.3         0.51
    median stages          46.2    42.9         0.52
    speed-up 1 process / 2 processes (wall): 1.18 (range 1.15-1.21)x
    CPU time 2 processes / 1 process: 1.14 (range 1.13-1.16)x
    study.csv identical across every run: yes

    stages of the single-process study (timers around train_job, evaluate_job, write_tables)
    round     start-up    training  evaluation  tabulation       other  wall s
    1             1.1s       16.6s       25.6s        0.1s        1.4s    44.8
    2             1.3s       17.6s       27.1s        0.1s        1.4s    47.6
    share start-up    2.6 (range 2.5-2.6) %
    share training    37.0 (range 37.0-37.1) %
    share evaluation  57.1 (range 57.1-57.1) %
    share tabulation  0.3 (range 0.3-0.3) %
    share other       3.0 (range 2.9-3.1) %
    per call (s): the first one (it pays the lazy imports and first loads) and the median of the others
    training         first 3.41 (range 3.29-3.52), later 2.16 (range 2.07-2.26)
    evaluation cfg   first 1.87 (range 1.87-1.87), later 1.62 (range 1.56-1.67)
    evaluation wig   first 2.60 (range 2.58-2.63), later 2.73 (range 2.66-2.81)

Here the work dominates and two processes win, 1.18x: less than 2x on this machine because the other load left
the two workers about one core between them beyond the first (1-process CPU 45 s in 47 s of wall; the 2-process
study's 51 s of CPU in 40 s of wall, i.e. ~1.3 cores), and each worker still pays its own ~3 s of one-off costs
(start-up 1.2 s, first training +1.3 s, first evaluation +0.3 s), the launcher ~2 s more (at the tests' sizes the
2-process study's extra 8 s of CPU less a worker's 5.6 s). The ideal on two free cores would be (47 - 3)/2 + 3 + 2
≈ 27 s, ~1.7x. Peak RSS is per process (0.52 GB each; two
processes hold about twice that in total). Still to be measured on a quiet machine and on GPUs, where the
one-off costs (CUDA context, model loads per process) weigh differently.

Re-measured on a quiet machine (load average 0.45 at the start, `--repeats 2`, the tests' sizes): 1 process 14.0 s,
2 processes 11.5 s: speed-up 1.22x (range 1.19-1.24), CPU time 2/1 processes 1.52x; shares: start-up 8.2 %,
training 33.0 %, evaluation 50.6 %, tabulation 0.7 %, other 7.5 %; the first training call 3.26 s, later ones 0.18 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from child_runs import median_range, timed_run

SUBJECTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "study"
CONFIGS = ("1 process", "2 processes", "stages")
STAGES = ("start-up", "training", "evaluation", "tabulation", "other")
MARKER = "STUDY-STAGES "


def stages_child(study_args: list[str]) -> int:
    """The single-process study in this process, its stages timed; prints one MARKER line of JSON."""
    import boothkit.study.run as study_run
    import boothkit.study.table as study_table
    from boothkit.cli import main as cli_main

    spent = {"training": 0.0, "evaluation": 0.0, "tabulation": 0.0}
    calls: dict[str, list[float]] = {"training": [], "cfg": [], "ag": [], "wig": []}  # each call's seconds
    first: list[float] = []

    def timed(stage: str, function):
        def wrapper(*args, **kwargs):
            if stage != "tabulation" and not first:
                first.append(time.time())
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                spent[stage] += seconds
                if stage == "training":
                    calls["training"].append(seconds)
                elif stage == "evaluation":  # evaluate_job(config, plan, job, method, out)
                    calls[args[3]].append(seconds)
        return wrapper

    study_run.train_job = timed("training", study_run.train_job)
    study_run.evaluate_job = timed("evaluation", study_run.evaluate_job)
    # run_study imports write_tables from the module when it tabulates, so the wrapper is the one it gets
    study_table.write_tables = timed("tabulation", study_table.write_tables)
    code = cli_main(["study", *study_args])
    print(MARKER + json.dumps({**spent, "calls": calls, "first_job_epoch": first[0] if first else None, "end_epoch": time.time()}),
          flush=True)
    return code


def plan_text(args: argparse.Namespace, dino: Path, clip: Path) -> str:
    """tests/test_study.py's plan, with the per-job sizes of the command line."""
    resolution = f"resolution = {args.resolution}\n" if args.resolution else ""
    return f"""methods = ["cfg", "wig"]
[train]
max_train_steps = {args.max_train_steps}
{resolution}[evaluate]
num_inference_steps = {args.num_inference_steps}
num_images_per_prompt = {args.num_images_per_prompt}
max_prompts = {args.max_prompts}
max_evaluations = {args.max_evaluations}
omega_grid = [0.0, 1.0]
dino_model = "{dino}"
clip_model = "{clip}"
[recipes.dreambooth]
[recipes.strong]
learning_rate = 1e-3
"""


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, model: Path, plan: Path):
        self.args, self.work, self.model, self.plan = args, work, model, plan

    def study_args(self, out: Path) -> list[str]:
        return ["--pretrained_model_name_or_path", str(self.model), "--instance_data_dir", str(SUBJECTS),
                "--output_dir", str(out), "--plan", str(self.plan)]

    def command(self, config: str, out: Path) -> list[str]:
        if config == "1 process":
            return [sys.executable, "-m", "boothkit", "study", *self.study_args(out)]
        if config == "2 processes":
            return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                    "-m", "boothkit", "study", *self.study_args(out)]
        return [sys.executable, str(Path(__file__).resolve()), "--stages_child", *self.study_args(out)]

    def run(self, index: int, config: str) -> dict:
        name = f"{index + 1}-{config.replace(' ', '-')}"
        out, cache, log = (self.work / "runs" / f"{name}{suffix}" for suffix in ("", "-cache", ".log"))
        out.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, BOOTHKIT_CACHE_DIR=str(cache))
        if self.args.threads:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        else:
            env.pop("OMP_NUM_THREADS", None)
        launch, wall, cpu, rss = timed_run(self.command(config, out), env, log)
        if not (out / "study.csv").is_file():
            raise SystemExit(f"{config}: no study.csv in {out}")
        result = {"wall_s": wall, "cpu_s": cpu, "rss_gb": rss, "csv": (out / "study.csv").read_text()}
        if config == "stages":
            line = next(l for l in log.read_text(errors="replace").splitlines() if l.startswith(MARKER))
            stages = json.loads(line[len(MARKER):])
            result["start-up"] = stages["first_job_epoch"] - launch
            for stage in ("training", "evaluation", "tabulation"):
                result[stage] = stages[stage]
            result["other"] = wall - sum(result[stage] for stage in STAGES[:-1])
            result["calls"] = stages["calls"]
        if not self.args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
        return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Rounds; each runs every configuration once.")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every run (0: unset; torchrun then sets 1 in its workers).")
    parser.add_argument("--max_train_steps", type=int, default=2, help="Training steps of each job.")
    parser.add_argument("--resolution", type=int, default=0, help="Training resolution (0: the model's).")
    parser.add_argument("--num_inference_steps", type=int, default=2, help="Denoising steps of each evaluation.")
    parser.add_argument("--num_images_per_prompt", type=int, default=2)
    parser.add_argument("--max_prompts", type=int, default=1, help="Prompts of each subject evaluated.")
    parser.add_argument("--max_evaluations", type=int, default=2, help="At most this many evaluations per search.")
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep every run's outputs and logs.")
    return parser.parse_args()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--stages_child":
        sys.exit(stages_child(sys.argv[2:]))
    args = parse_args()
    load = os.getloadavg()
    from boothkit.testing.tiny import build_tiny

    work = args.keep or Path(tempfile.mkdtemp(prefix="boothkit-study-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = {kind: build_tiny(kind, work / "models" / kind, overwrite=True) for kind in ("sd15", "dino", "clip")}
        plan = work / "plan.toml"
        plan.write_text(plan_text(args, models["dino"], models["clip"]))
        bench = Bench(args, work, models["sd15"], plan)
        rounds = []
        for index in range(args.repeats):  # A, B, C, C, B, A, ...: every configuration sees the same load
            order = list(CONFIGS) if index % 2 == 0 else list(reversed(CONFIGS))
            result = {config: bench.run(index, config) for config in order}
            rounds.append({config: result[config] for config in CONFIGS})
        print(f"3 subjects x 2 recipes x 2 methods (cfg, wig): 6 trainings of {args.max_train_steps} steps "
              f"(resolution {args.resolution or 'the model'}), 12 evaluations ({args.num_inference_steps} inference "
              f"steps, {args.num_images_per_prompt} images x {args.max_prompts} prompt(s), <= {args.max_evaluations} "
              f"per search); {args.repeats} rounds, OMP_NUM_THREADS {args.threads or 'unset'}, "
              f"load average at start {load[0]:.1f} ({os.cpu_count()} CPUs)")
        report(rounds)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(rounds: list[dict]) -> None:
    """Each round's wall/CPU/RSS; the speed-up per round as median and range; the stage shares."""
    print(f"\n{'round':<6} {'run':<12} {'wall s':>7} {'CPU s':>7} {'peak RSS GB':>12}")
    for index, result in enumerate([*rounds, None]):
        for name in CONFIGS:
            values = [r[name] for r in rounds] if result is None else [result[name]]
            numbers = [statistics.median(v[key] for v in values) for key in ("wall_s", "cpu_s", "rss_gb")]
            label = "median" if result is None else str(index + 1)
            print(f"{label:<6} {name:<12} {numbers[0]:>7.1f} {numbers[1]:>7.1f} {numbers[2]:>12.2f}")
    speedups = [r["1 process"]["wall_s"] / r["2 processes"]["wall_s"] for r in rounds]
    cpu = [r["2 processes"]["cpu_s"] / r["1 process"]["cpu_s"] for r in rounds]
    print(f"speed-up 1 process / 2 processes (wall): {median_range(speedups)}x")
    print(f"CPU time 2 processes / 1 process: {median_range(cpu)}x")
    same = all(r[name]["csv"] == rounds[0]["1 process"]["csv"] for r in rounds for name in CONFIGS)
    print(f"study.csv identical across every run: {'yes' if same else 'NO'}")

    print("\nstages of the single-process study (timers around train_job, evaluate_job, write_tables)")
    print(f"{'round':<6} " + " ".join(f"{stage:>11}" for stage in STAGES) + f" {'wall s':>7}")
    for index, result in enumerate(rounds):
        stages = result["stages"]
        print(f"{index + 1:<6} " + " ".join(f"{stages[stage]:>10.1f}s" for stage in STAGES)
              + f" {stages['wall_s']:>7.1f}")
    for stage in STAGES:
        shares = [100 * r["stages"][stage] / r["stages"]["wall_s"] for r in rounds]
        print(f"share {stage:<11} {median_range(shares, 1)} %")
    print("per call (s): the first one (it pays the lazy imports and first loads) and the median of the others")
    for kind in ("training", "cfg", "wig"):
        firsts = [r["stages"]["calls"][kind][0] for r in rounds]
        later = [statistics.median(r["stages"]["calls"][kind][1:]) for r in rounds]
        label = kind if kind == "training" else f"evaluation {kind}"
        print(f"{label:<16} first {median_range(firsts)}, later {median_range(later)}")


if __name__ == "__main__":
    main()
