"""Running a study: each process trains and evaluates its share of the jobs (`plan.shard`), skipping what is
done; process 0 then waits for every job and writes study.csv and study.md (`study.table`).

Each stage is an ordinary boothkit output folder (`train/<recipe>/<subject>`, `eval/<recipe>/<subject>`), and
each job keeps a record in `jobs/` of what finished and for which inputs (a digest of the photos, the model and
the options). A killed study resumes where it stopped: a finished training with the same inputs is not run
again, an interrupted one resumes from its latest checkpoint, and an evaluation already recorded is skipped (an
interrupted one reuses its content-keyed cache). Under `torchrun` / `accelerate launch` the processes are
independent workers: the launcher's distributed variables are read and then hidden from the trainings and
evaluations, which run on this process's own device (GPU LOCAL_RANK when there are GPUs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from boothkit.config import validate_config
from boothkit.errors import BoothkitError
from boothkit.identity import folder_digest, model_identity, value_digest
from boothkit.io import write_json_atomic
from boothkit.study.config import StudyConfig
from boothkit.study.plan import Job, Plan, build_plan, process_rank, shard

log = logging.getLogger(__name__)
JOBS_DIR = "jobs"
_DISTRIBUTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")
POLL_SECONDS = 5.0
LORA_NAME = "pytorch_lora_weights.safetensors"


def run_study(config: StudyConfig) -> int:
    rank, world, local = process_rank()
    _work_alone(local)
    plan = build_plan(config)
    out = Path(config.output_dir)
    mine = shard(plan.jobs, rank, world)
    if rank == 0:
        print(describe(plan, world))
        if config.estimate_steps:
            print(estimate(config, plan, out, world))
    for job in tqdm(mine, desc=f"study (process {rank + 1}/{world})", unit="job"):
        run_job(config, plan, job, out)
    if rank != 0:
        return 0
    _wait_for_every_job(plan, out)
    from boothkit.study.table import write_tables

    csv_path, md_path = write_tables(plan, out)
    print(f"study: {csv_path}, {md_path} and {md_path.with_suffix('.html')}")
    return 0


def describe(plan: Plan, world: int) -> str:
    subjects = sorted({job.subject for job in plan.jobs})
    return (f"study plan: {len(subjects)} subject(s) x {len(plan.recipes)} recipe(s) "
            f"({', '.join(sorted(plan.recipes))}) = {len(plan.jobs)} training(s), each evaluated with "
            f"{', '.join(plan.methods)}; {world} process(es)")


def estimate(config: StudyConfig, plan: Plan, out: Path, world: int) -> str:
    """The study's time from two short trainings of the first job (N and 2N steps: start-up cancels out) and two
    short evaluations of their LoRA (`evaluation_estimate`), scaled to every job and spread over the processes.
    Approximate: the probe evaluates with the first method, and batching makes larger runs cheaper per image."""
    job = plan.jobs[0]
    seconds = []
    for steps in (config.estimate_steps, 2 * config.estimate_steps):
        probe = dataclasses.replace(plan, train={**plan.train, "max_train_steps": steps, "weak_checkpoint_step": 0,
                                                 "overwrite": True})
        started = time.perf_counter()
        train_job(config, probe, job, out / "probe" / f"{steps}-steps")
        seconds.append(time.perf_counter() - started)
    per_step = max(seconds[1] - seconds[0], 0.0) / config.estimate_steps
    total = sum(plan.train_options(j.recipe).get("max_train_steps", config.max_train_steps) for j in plan.jobs)
    training = (per_step * total + seconds[0] * len(plan.jobs)) / world / 3600
    per_image, images = evaluation_estimate(config, plan, out, out / "probe" / f"{2 * config.estimate_steps}-steps")
    evaluating = per_image * images / world / 3600
    return (f"estimate: {per_step:.2f} s per training step, {per_image:.2f} s per evaluation image (measured on "
            f"{job.name}); about {training:.2f} h of training and {evaluating:.2f} h of evaluation ({images} images) "
            f"over {world} process(es)")


def _work_alone(local_rank: int) -> None:
    """Hide the launcher's distributed variables (each process runs whole jobs, never a share of one) and give
    the process its own GPU."""
    for name in _DISTRIBUTED:
        os.environ.pop(name, None)
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def record_path(out: Path, job: Job) -> Path:
    return out / JOBS_DIR / f"{job.recipe}__{job.subject}.json"


def read_record(out: Path, job: Job) -> dict:
    try:
        return json.loads(record_path(out, job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run_job(config: StudyConfig, plan: Plan, job: Job, out: Path) -> None:
    """Train the job's subject with its recipe (unless done), then evaluate each method (unless done)."""
    record = read_record(out, job)
    record.setdefault("evaluated", {})
    train_key = value_digest({"model": model_identity(config.pretrained_model_name_or_path),
                              "photos": folder_digest(Path(config.instance_data_dir) / job.subject),
                              "options": plan.train_options(job.recipe), "identifier": config.identifier})
    train_dir = out / "train" / job.recipe / job.subject
    if record.get("trained") != train_key:
        record = {"trained": None, "evaluated": {}}
        write_json_atomic(record_path(out, job), record)
        train_job(config, plan, job, train_dir)
        record["trained"] = train_key
        write_json_atomic(record_path(out, job), record)
    for method in plan.methods:
        inputs = {"train": train_key, "method": method, "options": plan.evaluate, "optimize": config.optimize,
                  "prompts": plan.prompts_path}
        if plan.train_options(job.recipe).get("keep_best"):  # which of the run's models is evaluated
            inputs["model"] = "best" if "lora_dir" in evaluation_options(config, plan, job, method, out) else "final"
        eval_key = value_digest(inputs)
        if record["evaluated"].get(method) == eval_key:
            continue
        evaluate_job(config, plan, job, method, out)
        record["evaluated"][method] = eval_key
        write_json_atomic(record_path(out, job), record)


def train_job(config: StudyConfig, plan: Plan, job: Job, train_dir: Path) -> None:
    from boothkit.train.config import TrainConfig
    from boothkit.train.trainer import train

    options = {
        "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
        "instance_data_dir": str(Path(config.instance_data_dir) / job.subject),
        "instance_prompt": f"a photo of {config.identifier} {job.noun}", "class_prompt": f"a photo of {job.noun}",
        "output_dir": str(train_dir), **plan.train_options(job.recipe),
    }
    if options.get("with_prior_preservation") and "class_data_dir" not in options:
        options["class_data_dir"] = str(train_dir.parent.parent / "class_images" / job.noun.replace(" ", "_"))
    if any(train_dir.glob("checkpoint-*")):
        options["resume_from_checkpoint"] = "latest"  # an interrupted run goes on (train checks it is the same)
    elif train_dir.exists() and any(train_dir.iterdir()):
        options["overwrite"] = True  # an earlier run's outputs (with other inputs): boothkit's own files only
    try:
        train(validate_config(TrainConfig, options))
    except BoothkitError as error:
        raise BoothkitError(f"training {job.name}: {error}") from None


def evaluation_options(config: StudyConfig, plan: Plan, job: Job, method: str, out: Path) -> dict:
    """The `boothkit evaluate` options of one (job, method)."""
    options = {
        "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
        "lora_base_dir": str(out / "train" / job.recipe), "subjects": [job.subject],
        "instance_data_dir": config.instance_data_dir, "evaluation_prompts_path": plan.prompts_path,
        "output_dir": str(out / "eval" / job.recipe / job.subject), "method": method,
        "identifier": config.identifier,
        "optimize": ("both" if method == "wig" else "lambda") if config.optimize else "none", **plan.evaluate,
    }
    train_dir = out / "train" / job.recipe / job.subject
    best = train_dir / "best"
    if plan.train_options(job.recipe).get("keep_best") and \
            ((best / LORA_NAME).is_file() or (best / "model_index.json").is_file()):
        # --keep_best: the kept model (best DINO above the CLIP-T floor) is the one evaluated, a LoRA or with
        # --train_mode full a pipeline folder as the run's own; AG's weak is the run's (weak/)
        options.pop("lora_base_dir")
        options["lora_dir"] = str(best)
        if (train_dir / "weak").is_dir():
            options["weak_checkpoint_path"] = str(train_dir / "weak")
    return options


def evaluate_job(config: StudyConfig, plan: Plan, job: Job, method: str, out: Path) -> None:
    from boothkit.evaluate.config import EvaluateConfig
    from boothkit.evaluate.run import run_evaluate

    options = evaluation_options(config, plan, job, method, out)
    if plan.train_options(job.recipe).get("keep_best") and "lora_dir" not in options:
        log.warning("%s: keep_best kept no model (no scoring reached min_clip_t): the final model is evaluated",
                    job.name)
    try:
        run_evaluate(validate_config(EvaluateConfig, options))
    except BoothkitError as error:
        raise BoothkitError(f"evaluating {job.name} with {method}: {error}") from None


def evaluation_estimate(config: StudyConfig, plan: Plan, out: Path, probe_lora: Path) -> tuple[float, int]:
    """(seconds per generated image, images the study's evaluations generate): one prompt of the first job
    evaluated with 1 and 2 images (start-up cancels out) with the probe's LoRA, and each (job, method)'s prompts
    × images per prompt × the evaluations its search makes (`evaluate.search.expected_evaluations`)."""
    from boothkit.evaluate.config import EvaluateConfig
    from boothkit.evaluate.dataset import load_evaluation_prompts
    from boothkit.evaluate.run import run_evaluate
    from boothkit.evaluate.search import expected_evaluations

    seconds = []
    for count in (1, 2):
        options = {**evaluation_options(config, plan, plan.jobs[0], plan.methods[0], out), "lora_dir": str(probe_lora),
                   "optimize": "none", "max_prompts": 1, "num_images_per_prompt": count, "class_prompt_samples": 0,
                   "output_dir": str(out / "probe" / f"evaluation-{count}"), "overwrite": True}
        options.pop("lora_base_dir", None)
        started = time.perf_counter()
        run_evaluate(validate_config(EvaluateConfig, options))
        seconds.append(time.perf_counter() - started)
    prompts, images = load_evaluation_prompts(plan.prompts_path), 0
    for job in plan.jobs:
        for method in plan.methods:
            evaluation = validate_config(EvaluateConfig, evaluation_options(config, plan, job, method, out))
            count = len(prompts.prompts_for(job.subject))
            count = min(count, evaluation.max_prompts) if evaluation.max_prompts else count
            images += count * evaluation.num_images_per_prompt * expected_evaluations(evaluation)
    return max(seconds[1] - seconds[0], 0.0), images


def _wait_for_every_job(plan: Plan, out: Path) -> None:
    """Process 0 waits until every job's record says trained and evaluated with every method (the other
    processes' share); a job that never finishes (a crashed process) is reported and waited for."""
    def done(job: Job) -> bool:
        record = read_record(out, job)
        return bool(record.get("trained")) and set(plan.methods) <= set(record.get("evaluated", {}))

    waiting, reported = [job for job in plan.jobs if not done(job)], 0.0
    while waiting:
        if time.monotonic() - reported > 60:
            log.info("waiting for %d job(s) of other processes: %s", len(waiting),
                     ", ".join(job.name for job in waiting[:5]))
            reported = time.monotonic()
        time.sleep(POLL_SECONDS)
        waiting = [job for job in waiting if not done(job)]
