"""Per subject: evaluate one setting, or search λ (golden section) and ω (grid) for the best DINO score."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from boothkit.data.images import list_image_files
from boothkit.errors import BoothkitError
from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.dataset import SubjectEntry, discover_subjects
from boothkit.evaluate.runner import METRICS, Evaluation, Evaluator, Setting
from boothkit.guidance.adapters import lora_file
from boothkit.io import write_json_atomic
from boothkit.tune import GOLDEN_RATIO, golden_section_search

log = logging.getLogger(__name__)


@dataclass
class SubjectResult:
    folder: str
    subject: str
    prompts: list[str]
    best: dict  # the best evaluation: setting, scores, per-prompt scores, image files, cache key
    history: list[dict]  # every evaluation in order: guidance_scale, omega, DINO, CLIP-I, CLIP-T
    omega_table: list[dict] | None  # per ω: the best λ there and its scores (ω sweeps only)


def _row(evaluation: Evaluation) -> dict:
    return {"guidance_scale": evaluation.setting.guidance_scale, "omega": evaluation.setting.omega,
            **{metric: evaluation.scores.get(metric) for metric in METRICS}}


def expected_evaluations(config: EvaluateConfig) -> int:
    """Evaluations of one subject's search, for the progress bar."""
    low, high = config.lambda_range
    golden = 2 + max(0, math.ceil(math.log(config.tolerance / (high - low)) / math.log(GOLDEN_RATIO)))
    if config.max_evaluations:
        golden = min(golden, config.max_evaluations)
    return {"none": 1, "lambda": golden, "omega": len(config.omega_grid),
            "both": golden * len(config.omega_grid)}[config.optimize]


def search_subject(evaluator: Evaluator, entry: SubjectEntry) -> SubjectResult:
    config = evaluator.config
    history: list[Evaluation] = []
    bar = tqdm(total=expected_evaluations(config), desc=f"evaluations ({entry.folder})", unit="eval", leave=False)

    def evaluate(setting: Setting) -> float:
        evaluation = evaluator.evaluate(entry, setting)
        history.append(evaluation)
        bar.update(1)
        bar.set_postfix(λ=f"{setting.guidance_scale:.3f}", DINO=f"{evaluation.scores['DINO']:.4f}")
        return evaluation.scores["DINO"]

    wig = config.method == "wig"
    default_lambda, default_omega = evaluator.default_guidance_scale(), config.omega if wig else None
    omegas = config.omega_grid if config.optimize in ("omega", "both") else [default_omega]
    for omega in omegas:
        if config.optimize in ("lambda", "both"):
            low, high = config.lambda_range
            golden_section_search(lambda lam: evaluate(Setting(lam, omega)), low, high,
                                  tol=config.tolerance, max_evals=config.max_evaluations)
        else:
            evaluate(Setting(default_lambda, omega))
    bar.close()
    best = max(history, key=lambda e: e.scores["DINO"])
    table = _omega_table(history) if config.optimize in ("omega", "both") else None
    return SubjectResult(entry.folder, entry.subject, evaluator.prompts_for(entry),
                         {**asdict(best), "setting": asdict(best.setting)}, [_row(e) for e in history], table)


def _omega_table(history: list[Evaluation]) -> list[dict]:
    best_per_omega: dict[float, Evaluation] = {}
    for evaluation in history:
        omega = evaluation.setting.omega
        if omega not in best_per_omega or evaluation.scores["DINO"] > best_per_omega[omega].scores["DINO"]:
            best_per_omega[omega] = evaluation
    return [_row(best_per_omega[omega]) for omega in sorted(best_per_omega)]


def check_entries(config: EvaluateConfig, entries: list[SubjectEntry]) -> None:
    """Fail early, with one line, on what would otherwise stop the run midway."""
    for entry in entries:
        list_image_files(entry.images_dir, f"subject folder '{entry.folder}'")
        lora_file(entry.lora_dir, f"LoRA folder of subject '{entry.folder}'")
        if config.method == "ag":
            try:
                lora_file(entry.lora_dir / "weak", "weak checkpoint")
            except BoothkitError:
                raise BoothkitError(f"--method ag needs a weak checkpoint: '{entry.lora_dir / 'weak'}' has no "
                                    "pytorch_lora_weights.safetensors") from None


def run_evaluate(config: EvaluateConfig) -> list[SubjectResult] | None:
    """Evaluate every subject (this process's share); the main process returns all results."""
    from boothkit.evaluate.outputs import write_outputs  # matplotlib only where the report is written

    # Honour `accelerate launch --cpu` (ACCELERATE_USE_CPU) as the Accelerator does; PartialState alone does not.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    evaluator = Evaluator(config, state.device)
    entries, skipped = discover_subjects(config.instance_data_dir, config.lora_base_dir,
                                         evaluator.prompts.subjects, config.subjects)
    if skipped and state.is_main_process:
        log.warning("skipping folders with no matching subject or LoRA folder: %s", ", ".join(skipped))
    if not entries:
        raise BoothkitError(f"no subject to evaluate: no folder of '{config.instance_data_dir}' matches a subject "
                            f"of '{config.evaluation_prompts_path}' with a LoRA folder in '{config.lora_base_dir}'")
    check_entries(config, entries)
    results_dir = Path(config.output_dir) / "subjects"
    mine = entries[state.process_index::state.num_processes]
    for entry in tqdm(mine, desc="subjects", unit="subject", disable=len(mine) < 2):
        result = search_subject(evaluator, entry)
        write_json_atomic(results_dir / f"{entry.folder}.json", asdict(result))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = [SubjectResult(**json.loads((results_dir / f"{e.folder}.json").read_text())) for e in entries]
    write_outputs(config, results, evaluator)
    return results
