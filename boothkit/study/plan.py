"""The plan of a study: which (subject, recipe) jobs there are, what each trains and evaluates, and which
process takes which job.

A job is one subject trained with one recipe, then evaluated with every method. Jobs are sorted by (subject,
recipe) and process r of W takes jobs r, r + W, r + 2W, ... (`shard`): a rule every process computes alone from
RANK and WORLD_SIZE (set by `torchrun` / `accelerate launch`, or by hand on a cluster), so no coordinator is
needed and a job is never done twice.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from boothkit.errors import BoothkitError
from boothkit.study.config import BUILTIN_RECIPES, StudyConfig

_PLAN_KEYS = {"subjects", "methods", "train", "evaluate", "recipes"}


@dataclass(frozen=True)
class Job:
    subject: str  # the subject folder
    noun: str  # its class ("dog")
    recipe: str

    @property
    def name(self) -> str:
        return f"{self.recipe}/{self.subject}"


@dataclass
class Plan:
    jobs: list[Job]
    methods: list[str]
    recipes: dict[str, dict]  # recipe -> its training options
    train: dict = field(default_factory=dict)  # options of every training
    evaluate: dict = field(default_factory=dict)  # options of every evaluation
    prompts_path: str = ""

    def train_options(self, recipe: str) -> dict:
        return {**self.train, **self.recipes[recipe]}


def read_plan_file(path: str | os.PathLike) -> dict:
    """The TOML plan (unknown top-level keys are an error, as in every boothkit config)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise BoothkitError(f"cannot read the plan '{path}': {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise BoothkitError(f"plan '{path}' is not valid TOML: {error}") from None
    unknown = sorted(set(data) - _PLAN_KEYS)
    if unknown:
        raise BoothkitError(f"plan '{path}': unknown key '{unknown[0]}' (allowed: {', '.join(sorted(_PLAN_KEYS))})")
    return data


def prompts_path(config: StudyConfig) -> str:
    if config.evaluation_prompts_path:
        return config.evaluation_prompts_path
    local = Path(config.instance_data_dir) / "prompts_and_classes.txt"
    if local.is_file():
        return str(local)
    from importlib.resources import files

    return str(files("boothkit") / "assets" / "prompts_and_classes.txt")


def build_plan(config: StudyConfig) -> Plan:
    """The study's jobs (sorted by subject, then recipe) from the dataset, the prompts file and the plan."""
    from boothkit.evaluate.dataset import load_evaluation_prompts

    data = read_plan_file(config.plan) if config.plan else {}
    recipes = data.get("recipes") or {name: BUILTIN_RECIPES[name] for name in _known(config.recipes)}
    if not isinstance(recipes, dict) or not all(isinstance(options, dict) for options in recipes.values()):
        raise BoothkitError("plan: [recipes.NAME] tables of training options expected")
    path = prompts_path(config)
    prompts = load_evaluation_prompts(path)
    root = Path(config.instance_data_dir)
    if not root.is_dir():
        raise BoothkitError(f"--instance_data_dir '{root}' is not a folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in prompts.subjects)
    wanted = config.subjects or data.get("subjects")
    if wanted:
        missing = [name for name in wanted if name not in folders]
        if missing:
            raise BoothkitError(f"subject '{missing[0]}' has no photo folder in '{root}' or no prompts in '{path}'")
        folders = [name for name in folders if name in wanted]
    if not folders:
        raise BoothkitError(f"no subject: no folder of '{root}' is a subject of '{path}'")
    jobs = [Job(subject, prompts.class_of(subject), recipe) for subject in folders for recipe in sorted(recipes)]
    train = {"max_train_steps": config.max_train_steps, **data.get("train", {})}
    return Plan(jobs, list(data.get("methods") or config.methods), recipes, train, data.get("evaluate", {}), path)


def _known(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in BUILTIN_RECIPES]
    if unknown:
        raise BoothkitError(f"unknown recipe '{unknown[0]}' (built in: {', '.join(BUILTIN_RECIPES)}; others go in "
                            "a --plan's [recipes.NAME])")
    return names


def process_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process under torchrun / accelerate launch / SLURM (1 process:
    0, 1, 0)."""
    def number(*names: str, default: int) -> int:
        for name in names:
            if os.environ.get(name, "").isdigit():
                return int(os.environ[name])
        return default

    world = number("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = number("RANK", "SLURM_PROCID", default=0)
    local = number("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not 0 <= rank < world:
        raise BoothkitError(f"process rank {rank} is outside the world size {world}")
    return rank, world, local


def shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """This process's jobs: every world-th job from its rank."""
    return jobs[rank::world]
