"""Start-up of `boothkit train` and `boothkit sample`: the share of a tiny-model run spent before the first step.

Model: the tiny SD 1.5 model (`build_tiny("sd15")`), the sample subject's 5 photos, 64 px. Each round runs, as
child processes, `boothkit train` (`--steps`, default 10, LoRA, batch 1) and `boothkit sample` (the LoRA of an
untimed warm-up training, cfg, 1 image, `--sample_steps`, default 4) of each code tree under test: this
checkout's and, with `--baseline DIR`, another checkout's (e.g. the main branch), interleaved (the order of the
trees reverses every other round) so both see the same machine load. Every child has OMP_NUM_THREADS=1
(`--threads`; see bench/pdm_cost.py) and its tree's own warm BOOTHKIT_CACHE_DIR (the warm-up runs fill it, as a
user's earlier runs would).

A child is `python bench/startup.py --child COMMAND ARGS...`, which calls `boothkit.cli.main([COMMAND, ...])`
after hooking, without changing boothkit:
- every import (Python's `importlib._bootstrap._find_and_load`, which both `import` and `importlib.import_module`
  go through; the outermost one is timed, so an import's own imports count once), wherever it happens: at the
  top of a module, in a sub-command's lazy import, or inside diffusers' lazy modules while a model loads;
- model loading: `load_family` as the trainer and the sampler call it, and for `sample` also the LoRA adapters
  (`load_guidance_adapters`) and a full model's weight variants (`load_weight_variants`), imports excluded;
- the first step: the first `boothkit.train.trainer._optimizer_step` (train) or the first
  `GuidedSampler.denoise` (sample, i.e. after the prompts are encoded).
The child prints one MARKER line of JSON. Per run: wall time (the parent's launch to the child's exit), time
before the first step (launch to the first step's start), its share of the wall time, the child's CPU time
(user + system) until then (less sensitive to other processes than wall time), and the time before the first
step split into interpreter (launch to the child's first statement: exec, Python, site), imports, model loading
and other set-up (the rest: parsing and validating the flags, accelerate, reading the photos, encoding the
prompts, caching the photos' latents, attaching the LoRA, the optimizer...); the parts add up to the time before the first step, less the
probe's own few ms. Also: the first step's time against the later steps' (one-off work the first step pays,
e.g. the optimizer's state), and the import time by package: each module's own time (less the imports
it makes), summed per library (torch, diffusers, ...) and for boothkit's own modules.

Reported per command: medians with their 95 % percentile-bootstrap interval (bench/child_runs.py) over
`--rounds` rounds; with `--baseline`, per round the ratio this/baseline of the time before the first step (wall
and CPU) and of the wall time (child_runs.ratio_line, verdict against 1.0), and the seconds saved (medians with
their intervals).

`--preload`: each child first imports what an SD LoRA run takes from the libraries in any case (`PRELOAD`:
torch, accelerate, peft, diffusers' SD pipeline, UNet, VAE, schedulers, transformers' CLIP...), before the clock
starts (that time counts as 'interpreter'): 'imports' is then what boothkit's own modules add, measured with
less noise around it (for comparing boothkit's own start-up between trees).

    python bench/startup.py [--rounds 5] [--steps 10] [--sample_steps 4] [--resolution 64] [--threads 1]
                            [--baseline /path/to/other/checkout] [--preload] [--keep DIR]

To find what a command imports and need not: `python -X importtime -m boothkit train ...` (note: it does not
list modules loaded by `importlib.import_module`, e.g. the flag schemas, only their own imports).

Measured (2 CPU cores, load average 2-3, another engineer's work beside; ~4 minutes), after the parser came to
build only the command's own flags, the SANA family module to load only for SANA models, and training to import
the DINO/CLIP metrics only with --validation_every, against the code before (the main checkout):

    python bench/startup.py --rounds 9 --baseline /work/main

                    wall s             before the first step s   share %            interpreter  imports  loading  set-up
    this train      6.12 (5.91-6.38)   4.54 (4.48-4.82)          75.3 (73.6-75.8)   0.04         4.23     0.12     0.14
    baseline train  6.18 (5.96-6.46)   4.66 (4.46-4.89)          75.5 (74.9-75.8)   0.04         4.35     0.13     0.14
    this sample     5.60 (5.50-5.86)   4.46 (4.37-4.68)          79.8 (78.9-80.2)   0.04         4.19     0.18     0.05
    baseline sample 5.82 (5.51-5.95)   4.61 (4.40-4.75)          79.6 (79.0-80.0)   0.04         4.31     0.19     0.05
    (medians, 95 % bootstrap interval; the parts are medians in seconds)
    imports by library, train: torch 1.65, transformers 0.73, scipy 0.45, diffusers 0.41, peft 0.26, sympy 0.18,
      numpy 0.09, huggingface_hub 0.06, accelerate 0.04, pydantic 0.03, other 0.30; boothkit's own 0.072 (was 0.102)
    time before the first step this/baseline: train 0.99x (95% interval 0.95-1.02), sample 0.98x (0.94-1.00)
    seconds saved before the first step: train 0.065 (-0.080-0.240), sample 0.084 (0.001-0.278)

    python bench/startup.py --rounds 7 --preload --baseline /work/main

    boothkit's own imports (libraries preloaded): train 0.17 -> 0.12 s, saved 0.054 s (95% interval 0.052-0.063);
    sample 0.145 -> 0.10 s, saved 0.045 s (0.038-0.047)

Three quarters of a tiny run (train 75 %, sample 80 %) is start-up, and 93 % of the start-up is importing the
libraries the command uses: torch, transformers, diffusers (which imports all of its ~80 transformer model classes
and torch._dynamo, with sympy, on the way to the UNet) and peft. Two of them the command does not use: scipy
(0.45 s; transformers imports scipy.optimize for its object-detection loss whenever scipy is installed, and
boothkit itself never imports scipy, only its tests do) and sympy/mpmath (via torch._dynamo). The rest of the
start-up is ~0.3 s: boothkit's own modules 0.07 s, model loading 0.12-0.18 s (mostly diffusers' and transformers'
from_pretrained), other set-up 0.05-0.14 s. The cuts saved 0.05 s of boothkit's imports, ~1 % of the start-up,
within this machine's noise for the whole run (and `boothkit --help` went from 0.21 to 0.06 s). The first training step
costs 0.07 s against 0.05 s for later ones; the first sampling step 0.04 s against 0.035 s.
"""

from __future__ import annotations

import time

_READY = time.time()  # the child's first statement: everything before it is the interpreter's start-up

import argparse  # noqa: E402 - after _READY on purpose
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from child_runs import bootstrap_interval, ratio_line, timed_run  # noqa: E402

MARKER = "STARTUP-TIMES "
PARTS = ("interpreter", "imports", "loading", "set-up")
COMMANDS = ("train", "sample")


# The child -----------------------------------------------------------------------------------------------

def package_of(module: str) -> str:
    """`torch`, `diffusers`, ... for a library's modules; boothkit's by sub-package (`boothkit.train`)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "boothkit" and len(parts) > 1 else parts[0]


class Clock:
    """Exclusive seconds per phase ("set-up", "loading", "imports") from the child's start to the first step."""

    def __init__(self) -> None:
        self.spent = {"imports": 0.0, "loading": 0.0, "set-up": 0.0}
        self.phase, self.since = "set-up", time.perf_counter()
        self.first_step: float | None = None  # epoch seconds
        self.first_step_cpu: float | None = None  # CPU seconds of this process (user + system) until then
        self.steps: list[float] = []  # perf_counter at the start of each step
        self.hooks: dict[str, object] = {}  # module name -> function patching it once it is imported
        self.packages: dict[str, float] = {}  # own import seconds per package (`package_of`) until the first step

    def switch(self, phase: str) -> str:
        now = time.perf_counter()
        if self.first_step is None:
            self.spent[self.phase] += now - self.since
        previous, self.phase, self.since = self.phase, phase, now
        return previous

    def install_import_timer(self) -> None:
        """Time every import of the main thread: the outermost ones make the "imports" phase; each module's own
        time (less the imports it makes) adds to its package's (`package_of`)."""
        import importlib._bootstrap as bootstrap

        original = bootstrap._find_and_load
        main_thread = threading.main_thread()
        stack: list[list] = []  # [name, start, seconds of its nested imports] of each import in progress

        def find_and_load(name, import_):
            if threading.current_thread() is not main_thread:
                return original(name, import_)
            outermost = not stack
            previous = self.switch("imports") if outermost else None
            stack.append([name, time.perf_counter(), 0.0])
            try:
                return original(name, import_)
            finally:
                _, start, nested = stack.pop()
                seconds = time.perf_counter() - start
                if stack:
                    stack[-1][2] += seconds
                if self.first_step is None:
                    package = package_of(name)
                    self.packages[package] = self.packages.get(package, 0.0) + seconds - nested
                if outermost:
                    self.switch(previous)
                    for module in [m for m in self.hooks if m in sys.modules]:
                        self.hooks.pop(module)(sys.modules[module])

        bootstrap._find_and_load = find_and_load

    def loading(self, function):
        def wrapper(*args, **kwargs):
            previous = self.switch("loading")
            try:
                return function(*args, **kwargs)
            finally:
                self.switch(previous)
        return wrapper

    def first(self, function):
        def wrapper(*args, **kwargs):
            if self.first_step is None:
                self.switch("steps")
                self.first_step = time.time()
                usage = resource.getrusage(resource.RUSAGE_SELF)
                self.first_step_cpu = usage.ru_utime + usage.ru_stime
            self.steps.append(time.perf_counter())
            return function(*args, **kwargs)
        return wrapper


# What an SD LoRA run imports from the libraries in any case (`--preload`): the models' classes too, since
# diffusers and transformers import them lazily when a model loads.
PRELOAD = ("torch", "accelerate", "peft", "diffusers.training_utils", "diffusers.optimization",
           "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion", "diffusers.models.unets.unet_2d_condition",
           "diffusers.models.autoencoders.autoencoder_kl", "diffusers.schedulers.scheduling_ddpm",
           "diffusers.schedulers.scheduling_ddim", "transformers.models.clip.modeling_clip",
           "transformers.models.clip.tokenization_clip", "safetensors.torch", "pydantic", "yaml", "PIL.Image",
           "tqdm.auto")


def child(argv: list[str]) -> int:
    """Run `boothkit ARGV` in this process, timed (see the module's docstring); prints one MARKER line. With
    `--preload` first, the libraries' modules of `PRELOAD` are imported before the clock starts."""
    ready = _READY
    if argv[0] == "--preload":
        import importlib

        argv = argv[1:]
        for module in PRELOAD:
            importlib.import_module(module)
        ready = time.time()
    clock = Clock()

    def patch_trainer(trainer) -> None:
        trainer.load_family = clock.loading(trainer.load_family)
        trainer._optimizer_step = clock.first(trainer._optimizer_step)

    def patch_sample(sample) -> None:
        for name in ("load_family", "load_guidance_adapters", "load_weight_variants"):
            setattr(sample, name, clock.loading(getattr(sample, name)))

    def patch_sampler(sampler) -> None:
        sampler.GuidedSampler.denoise = clock.first(sampler.GuidedSampler.denoise)

    clock.hooks = {"boothkit.train.trainer": patch_trainer, "boothkit.sample": patch_sample,
                   "boothkit.guidance.sampler": patch_sampler}
    clock.install_import_timer()
    from boothkit.cli import main

    code = main(argv)
    if clock.first_step is None:
        raise SystemExit(f"startup bench: the first step of `boothkit {argv[0]}` was never seen (renamed hooks?)")
    import boothkit

    steps = [later - earlier for earlier, later in zip(clock.steps, clock.steps[1:])]  # all but the last
    print(MARKER + json.dumps({"ready": ready, "first_step": clock.first_step, "first_step_cpu": clock.first_step_cpu,
                               **clock.spent, "steps": steps, "packages": clock.packages,
                               "boothkit": boothkit.__file__}), flush=True)
    return code


# The parent ----------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, model: Path, photos: Path):
        self.args, self.work, self.model, self.photos = args, work, model, photos

    def command(self, command: str, tree: str, out: Path) -> list[str]:
        args = self.args
        if command == "train":
            flags = ["--pretrained_model_name_or_path", str(self.model), "--instance_data_dir", str(self.photos),
                     "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--max_train_steps",
                     str(args.steps), "--resolution", str(args.resolution), "--seed", "0"]
        else:
            flags = ["--pretrained_model_name_or_path", str(self.model), "--lora_dir", str(self.lora(tree)),
                     "--prompt", "a sks dog in the snow", "--output_dir", str(out), "--num_inference_steps",
                     str(args.sample_steps), "--height", str(args.resolution), "--width", str(args.resolution),
                     "--seed", "0"]
        preload = ["--preload"] if args.preload else []
        return [sys.executable, str(Path(__file__).resolve()), "--child", *preload, command, *flags]

    def lora(self, tree: str) -> Path:
        return self.work / tree / "warm-up-train"

    def env(self, tree: str, root: Path) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(root), BOOTHKIT_CACHE_DIR=str(self.work / tree / "cache"))
        if self.args.threads:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        else:
            env.pop("OMP_NUM_THREADS", None)
        return env

    def run(self, command: str, tree: str, root: Path, name: str) -> dict:
        out = self.work / tree / name
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        log = self.work / tree / f"{name}.log"
        launch, wall, cpu, rss = timed_run(self.command(command, tree, out), self.env(tree, root), log)
        line = next((l for l in log.read_text(errors="replace").splitlines() if l.startswith(MARKER)), None)
        if line is None:
            raise SystemExit(f"{tree} {command}: no timings in {log}")
        times = json.loads(line[len(MARKER):])
        if Path(times["boothkit"]).resolve().parents[1] != root.resolve():
            raise SystemExit(f"{tree} {command} ran {times['boothkit']}, not the checkout {root}")
        before = times["first_step"] - launch
        result = {"wall": wall, "cpu": cpu, "rss": rss, "before": before, "share": 100 * before / wall,
                  "before_cpu": times["first_step_cpu"], "first_step": times["steps"][0],
                  "later_step": statistics.median(times["steps"][1:]),
                  "interpreter": times["ready"] - launch, "imports": times["imports"], "loading": times["loading"],
                  "set-up": times["set-up"], "packages": times["packages"]}
        result["unaccounted"] = before - sum(result[part] for part in PARTS)  # the probe's own overhead
        if not self.args.keep and not name.startswith("warm-up"):
            shutil.rmtree(out, ignore_errors=True)
        return result


def interval(values: list[float], digits: int = 2) -> str:
    low, high = bootstrap_interval(values)
    return f"{statistics.median(values):.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


COLUMNS = (("wall", "wall s"), ("before", "before s"), ("share", "share %"), ("before_cpu", "CPU before s"),
           ("interpreter", "interpreter s"), ("imports", "imports s"), ("loading", "loading s"),
           ("set-up", "set-up s"), ("first_step", "1st step s"), ("later_step", "later step s"))


def package_line(runs: list[dict], top: int = 10) -> str:
    """The `top` packages by median import time, then boothkit's sub-packages together, then the rest."""
    names = {name for r in runs for name in r["packages"]}
    median = {name: statistics.median(r["packages"].get(name, 0.0) for r in runs) for name in names}
    ours = [name for name in names if name.split(".")[0] == "boothkit"]
    theirs = sorted((name for name in names if name not in ours), key=median.get, reverse=True)
    boothkit = statistics.median(sum(r["packages"].get(name, 0.0) for name in ours) for r in runs)
    rest = statistics.median(sum(r["packages"].get(name, 0.0) for name in theirs[top:]) for r in runs)
    return ", ".join([*(f"{name} {median[name]:.2f}" for name in theirs[:top]), f"other {rest:.2f}",
                      f"boothkit {boothkit:.3f} (" + ", ".join(f"{name.partition('.')[2] or '__init__'} {median[name]:.3f}"
                      for name in sorted(ours, key=median.get, reverse=True)[:6]) + ")"])


def report(rounds: list[dict], trees: list[str]) -> None:
    """Per round and tree the runs' numbers; per tree the medians with their 95 % intervals; the comparison."""
    print(f"{'round':<6} {'tree':<9} {'command':<7} " + " ".join(f"{title:>{len(title)}}" for _, title in COLUMNS))
    for index, result in enumerate(rounds):
        for command in COMMANDS:
            for tree in trees:
                r = result[tree][command]
                print(f"{index + 1:<6} {tree:<9} {command:<7} " + " ".join(
                    f"{r[key]:>{len(title)}.{1 if key == 'share' else 2}f}" for key, title in COLUMNS))
    print("\nmedian (95% bootstrap interval of the median) over the rounds")
    for command in COMMANDS:
        for tree in trees:
            runs = [result[tree][command] for result in rounds]
            print(f"{tree} {command}: wall {interval([r['wall'] for r in runs])} s, before the first step "
                  f"{interval([r['before'] for r in runs])} s = {interval([r['share'] for r in runs], 1)} % of the "
                  f"wall; CPU before the first step {interval([r['before_cpu'] for r in runs])} s")
            print("    " + ", ".join(f"{part} {interval([r[part] for r in runs])} s" for part in PARTS)
                  + f"; probe overhead {statistics.median(r['unaccounted'] for r in runs):.3f} s")
            print(f"    first step {interval([r['first_step'] for r in runs])} s, later steps "
                  f"{interval([r['later_step'] for r in runs], 3)} s each")
            print("    imports by package (median s, own time of its modules): " + package_line(runs))
    if len(trees) == 2:
        new, old = trees
        print(f"\n{new} against {old}, per round")
        for command in COMMANDS:
            pairs = [(result[new][command], result[old][command]) for result in rounds]
            for key, what in (("before", "time before the first step"), ("before_cpu", "CPU time before the first step"),
                              ("wall", "wall time")):
                print(ratio_line(f"{command}: {what} {new}/{old}", [n[key] / o[key] for n, o in pairs],
                                 goal=1.0, at_least=False))
            print(f"    {command}: saved (s) " + ", ".join(
                f"{key} {interval([o[key] - n[key] for n, o in pairs], 3)}"
                for key in ("before", "before_cpu", "imports", "loading", "set-up")))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="Each round runs train and sample of every tree once.")
    parser.add_argument("--steps", type=int, default=10, help="Training steps.")
    parser.add_argument("--sample_steps", type=int, default=4, help="Denoising steps of the sample run.")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each child (0: unset).")
    parser.add_argument("--baseline", type=Path, help="Another checkout of boothkit to compare against.")
    parser.add_argument("--preload", action="store_true",
                        help="Each child imports the libraries' modules an SD LoRA run needs in any case (PRELOAD) "
                             "before the clock starts (counted as 'interpreter'): 'imports' is then what boothkit's "
                             "own modules add, with less noise around it.")
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep every run's outputs and logs.")
    args = parser.parse_args()
    if min(args.steps, args.sample_steps) < 3:
        parser.error("--steps and --sample_steps need at least 3 steps (the first, and later ones to compare)")
    return args


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    args = parse_args()
    load = os.getloadavg()
    from boothkit.data.images import sample_subject_dir
    from boothkit.testing.tiny import build_tiny

    here = Path(__file__).resolve().parents[1]
    trees = {"this": here, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    work = args.keep or Path(tempfile.mkdtemp(prefix="boothkit-startup-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = build_tiny("sd15", work / "model", overwrite=True)
        photos = work / "photos"
        shutil.rmtree(photos, ignore_errors=True)
        shutil.copytree(sample_subject_dir(), photos)
        bench = Bench(args, work, model, photos)
        for tree, root in trees.items():  # untimed: the LoRA to sample, a warm cache, the files in the page cache
            bench.run("train", tree, root, "warm-up-train")
            bench.run("sample", tree, root, "warm-up-sample")
        rounds = []
        for index in range(args.rounds):
            order = list(trees) if index % 2 == 0 else list(reversed(trees))
            result = {tree: {} for tree in trees}
            for command in COMMANDS:
                for tree in order:
                    result[tree][command] = bench.run(command, tree, trees[tree], f"{index + 1}-{command}")
            rounds.append(result)
        print(f"tiny sd15, 5 photos, {args.resolution} px; train {args.steps} steps (LoRA, batch 1), sample "
              f"{args.sample_steps} steps (cfg, 1 image); {args.rounds} rounds, OMP_NUM_THREADS "
              f"{args.threads or 'unset'}, load average at start {load[0]:.1f} ({os.cpu_count()} CPUs)"
              + ("; libraries preloaded (in 'interpreter')" if args.preload else "") + "; trees: "
              + ", ".join(f"{tree} = {root}" for tree, root in trees.items()))
        report(rounds, list(trees))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
