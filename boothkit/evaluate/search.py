"""Per subject, the search for the best DINO score: one setting, a golden-section search over λ, a grid over ω
(WIG), or a λ search at each ω of the grid."""

from __future__ import annotations

from typing import Protocol

from tqdm.auto import tqdm

from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.results import Evaluation, Setting, SubjectResult, best_by_dino
from boothkit.evaluate.subjects import Subject
from boothkit.guidance.rules import default_guidance_scale
from boothkit.tune import golden_section_evaluations, golden_section_search


class Objective(Protocol):
    config: EvaluateConfig

    def evaluate(self, subject: Subject, setting: Setting) -> Evaluation: ...


def expected_evaluations(config: EvaluateConfig) -> int:
    """Evaluations of one subject's search (the progress bar's total)."""
    low, high = config.lambda_range
    golden = golden_section_evaluations(low, high, config.tolerance, config.max_evaluations)
    return {"none": 1, "lambda": golden, "omega": len(config.omega_grid),
            "both": golden * len(config.omega_grid)}[config.optimize]


def search_subject(evaluator: Objective, subject: Subject, family_guidance_scale: float) -> SubjectResult:
    """Every evaluation the search makes for `subject`, in order, and the best by DINO. λ, when not searched,
    is `--guidance_scale`, else the method's default (`family_guidance_scale`: the family's CFG scale)."""
    config = evaluator.config
    history: list[Evaluation] = []
    bar = tqdm(total=expected_evaluations(config), desc=f"evaluations ({subject.folder})", unit="eval", leave=False)

    def dino_at(setting: Setting) -> float:
        evaluation = evaluator.evaluate(subject, setting)
        history.append(evaluation)
        dino = evaluation.scores.get("DINO")
        bar.update(1)
        bar.set_postfix(λ=f"{setting.guidance_scale:.3f}", DINO="-" if dino is None else f"{dino:.4f}")
        return float("nan") if dino is None else dino

    fixed_lambda = config.guidance_scale if config.guidance_scale is not None else \
        default_guidance_scale(config.method, family_guidance_scale)
    omegas = config.omega_grid if config.optimize in ("omega", "both") else \
        [config.omega if config.method == "wig" else None]
    with bar:
        for omega in omegas:
            if config.optimize in ("lambda", "both"):
                low, high = config.lambda_range
                golden_section_search(lambda lam: dino_at(Setting(lam, omega)), low, high,
                                      tol=config.tolerance, max_evals=config.max_evaluations)
            else:
                dino_at(Setting(fixed_lambda, omega))
    entry = subject.entry
    return SubjectResult(folder=entry.folder, subject=entry.subject, method=config.method,
                         prompts=list(subject.prompts), reference_dir=str(entry.images_dir.resolve()),
                         history=history, best=best_by_dino(history))
