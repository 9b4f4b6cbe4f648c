"""Evaluation results as dataclasses; JSON only at the edge (`to_json` / `from_json`).

An evaluation folder holds the results of every method evaluated into it (`MethodResults`, one per method);
the report compares them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PROMPT_METRICS: tuple[str, ...] = ("DINO", "CLIP-I", "CLIP-T", "DINO-D", "CLIP-D")
"""The metrics of one prompt's images (`PromptScores.scores`); an evaluation's are their means over prompts."""
METRICS: tuple[str, ...] = PROMPT_METRICS + ("PRES",)
"""An evaluation's metrics (`Evaluation.scores`), in the order of the report's and the Results tab's columns.
PRES comes from the class-prompt samples (`Evaluation.class_samples`), None when none were asked for."""


@dataclass(frozen=True)
class Setting:
    """One point of a search: λ (`guidance_scale`), and ω for WIG."""

    guidance_scale: float
    omega: float | None = None


@dataclass
class PromptScores:
    """One prompt's images (file names inside the evaluation's folder) and their scores (means over the
    prompt's images and all reference photos)."""

    prompt: str
    seeds: list[int]
    files: list[str]
    scores: dict[str, float | None]  # keyed by PROMPT_METRICS (a class-prompt row: by "PRES")


@dataclass
class Evaluation:
    """One setting evaluated for one subject: per-prompt scores and their means, and (when asked) the
    class-prompt samples that give PRES."""

    setting: Setting
    key: str  # the cache key (content identity of everything that made these images and scores)
    scores: dict[str, float | None]  # keyed by METRICS: means over prompts (PRES: over all class samples)
    per_prompt: list[PromptScores]
    sampler: dict = field(default_factory=dict)  # steps, scheduler, height, width as resolved
    class_samples: list[PromptScores] = field(default_factory=list)  # one per class prompt; empty without PRES

    @property
    def images(self) -> list[str]:
        """The images of the evaluation prompts (the best evaluation's are copied out of the cache)."""
        return [name for prompt in self.per_prompt for name in prompt.files]

    @property
    def class_images(self) -> list[str]:
        """The class-prompt samples (kept in the cache entry only)."""
        return [name for prompt in self.class_samples for name in prompt.files]

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "Evaluation":
        return Evaluation(setting=Setting(**data["setting"]), key=data["key"], scores=dict(data["scores"]),
                          per_prompt=[PromptScores(**row) for row in data["per_prompt"]],
                          sampler=dict(data.get("sampler", {})),
                          class_samples=[PromptScores(**row) for row in data.get("class_samples", [])])


@dataclass
class SubjectResult:
    """One subject evaluated with one method: every evaluation in the order made, and the best (by DINO)."""

    folder: str  # the subject's folder name (in --instance_data_dir and --lora_base_dir)
    subject: str  # the subject it maps to ("dog")
    method: str
    prompts: list[str]
    reference_dir: str  # the folder of the subject's reference photos
    history: list[Evaluation]
    best: Evaluation

    def omega_table(self) -> list[Evaluation]:
        """Per ω (sorted), the evaluation with the best DINO at that ω; empty when ω was not swept."""
        best: dict[float, Evaluation] = {}
        for evaluation in self.history:
            omega = evaluation.setting.omega
            if omega is None:
                continue
            if omega not in best or _dino(evaluation) > _dino(best[omega]):
                best[omega] = evaluation
        return [best[omega] for omega in sorted(best)] if len(best) > 1 else []

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("history", "best")}
        data["history"] = [evaluation.to_json() for evaluation in self.history]
        data["best"] = self.history.index(self.best) if self.best in self.history else self.best.to_json()
        return data

    @staticmethod
    def from_json(data: dict) -> "SubjectResult":
        history = [Evaluation.from_json(item) for item in data["history"]]
        best = history[data["best"]] if isinstance(data["best"], int) else Evaluation.from_json(data["best"])
        return SubjectResult(folder=data["folder"], subject=data["subject"], method=data["method"],
                             prompts=list(data["prompts"]), reference_dir=data["reference_dir"],
                             history=history, best=best)


@dataclass
class MethodResults:
    """One `boothkit evaluate --method M` run into an evaluation folder: its settings and its subjects."""

    method: str
    settings: dict  # the run's options (EvaluateConfig.model_dump())
    subjects: list[SubjectResult]

    def to_json(self) -> dict:
        return {"method": self.method, "settings": self.settings,
                "subjects": [subject.to_json() for subject in self.subjects]}

    @staticmethod
    def from_json(data: dict) -> "MethodResults":
        return MethodResults(method=data["method"], settings=dict(data["settings"]),
                             subjects=[SubjectResult.from_json(item) for item in data["subjects"]])


def best_by_dino(history: list[Evaluation]) -> Evaluation:
    """The evaluation with the highest DINO (the first on ties; a missing DINO counts as worst)."""
    return max(history, key=_dino)


def _dino(evaluation: Evaluation) -> float:
    value = evaluation.scores.get("DINO")
    return float("-inf") if value is None else value
