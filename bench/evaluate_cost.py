"""Cost of evaluation and tuning: golden-section evaluations, seconds per evaluation, cached re-run.

Runs `boothkit evaluate --method cfg --optimize lambda --tolerance 0.05` on [-10, 10] for one subject with the
SD-1.5-shaped bench model (random LoRA) and tiny DINO / CLIP scorers, then runs the same command again.
Prints: evaluations the search needed (target <= 16; the progress bar's total must equal it), seconds per
objective evaluation (generation + scoring), the cost of an evaluation relative to generating its images alone
(each evaluation's own generation is the baseline, measured in the same call: median ratio with a 95 % bootstrap
interval over the search's evaluations), and the fully cached re-run's time (target: well under a second: every
cache key is a content digest, computed without loading any model) and its count of module forward calls
(target: 0).

    python bench/evaluate_cost.py [--resolution 128] [--steps 10] [--prompts 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from boothkit.data.images import sample_subject_dir
from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.run import run_evaluate
from boothkit.evaluate.runner import Evaluator
from boothkit.evaluate.search import expected_evaluations
from boothkit.testing.tiny import build_sd_bench, build_tiny
from child_runs import ratio_line
from guidance_cost import write_random_loras

PROMPTS = ["a <subject> in the jungle", "a <subject> in the snow", "a <subject> on the beach", "a red <subject>"]


class ForwardCounter:
    """Counts every nn.Module forward call in the process (a global hook)."""

    def __enter__(self):
        self.calls = 0
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._count)
        return self

    def _count(self, module, inputs, output):
        self.calls += 1

    def __exit__(self, *exc):
        self._handle.remove()


def timed_evaluations(evaluator_class=Evaluator) -> dict[str, list[float]]:
    """Patch Evaluator.evaluate and Evaluator.sample to record the seconds of each evaluation and of the image
    generation inside it."""
    seconds: dict[str, list[float]] = {"evaluate": [], "sample": []}
    for name in seconds:
        original = getattr(evaluator_class, name)

        def timed(self, subject, setting, _original=original, _name=name):
            start = time.perf_counter()
            result = _original(self, subject, setting)
            seconds[_name].append(time.perf_counter() - start)
            return result

        setattr(evaluator_class, name, timed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="boothkit-evaluate-bench-") as work:
        work = Path(work)
        model = build_sd_bench(work / "model")
        write_random_loras(model, work / "loras" / "dog")
        shutil.copytree(sample_subject_dir(), work / "instance" / "dog")
        (work / "prompts.json").write_text(json.dumps({"subjects": ["dog"], "prompts": PROMPTS[: args.prompts]}))
        config = EvaluateConfig(
            pretrained_model_name_or_path=str(model), lora_base_dir=str(work / "loras"),
            instance_data_dir=str(work / "instance"), evaluation_prompts_path=str(work / "prompts.json"),
            output_dir=str(work / "eval"), method="cfg", optimize="lambda", tolerance=0.05,
            lambda_range=(-10.0, 10.0), num_inference_steps=args.steps, height=args.resolution,
            width=args.resolution, dino_model=str(build_tiny("dino", work / "dino")),
            clip_model=str(build_tiny("clip", work / "clip")),
        )
        seconds = timed_evaluations()
        start = time.perf_counter()
        results = run_evaluate(config)
        first_run = time.perf_counter() - start
        evaluations = len(results.subjects[0].history)
        fresh = seconds["evaluate"][:]
        over_sampling = [whole / sampling for whole, sampling in zip(fresh, seconds["sample"])]
        with ForwardCounter() as counter:
            start = time.perf_counter()
            again = run_evaluate(config)
            cached_run = time.perf_counter() - start
    assert again.subjects[0].best == results.subjects[0].best
    assert evaluations == expected_evaluations(config)
    print(f"{args.resolution}px, {args.steps} DDIM steps, {args.prompts} prompts x 1 image, tolerance 0.05 on [-10, 10]")
    print(f"golden-section evaluations: {evaluations} (target <= 16; progress bar total "
          f"{expected_evaluations(config)})")
    print(f"seconds per objective evaluation: {sum(fresh) / len(fresh):.2f} (first run {first_run:.1f} s in all, "
          "model loading included)")
    print(ratio_line("evaluation / generating its images alone", over_sampling))
    print(f"fully cached re-run: {cached_run:.2f} s, module forward calls: {counter.calls} (target 0)")


if __name__ == "__main__":
    main()
