"""`boothkit evaluate`: every subject × prompt, scored with DINO / CLIP-I / CLIP-T, λ (and ω) tuned for DINO.

The output folder is boothkit's (`layout.OutputFolder`): refused when it holds someone else's files (unless
`--overwrite`, and then nothing of theirs is touched), reused by later evaluations (the cache answers again,
and several methods may be evaluated into one folder). Each evaluation is cached under its content key
(`keys.py`), so a re-run generates nothing and loads no model, and an interrupted run resumes. Under
`accelerate launch`, subjects are split across processes and the main process merges their results.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path, PurePosixPath

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from boothkit.errors import BoothkitError
from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.dataset import discover_subjects, load_evaluation_prompts
from boothkit.evaluate.keys import EvaluationKeys
from boothkit.evaluate.models import Models
from boothkit.evaluate.outputs import RESULTS_NAME, SUMMARY_NAME, write_outputs
from boothkit.evaluate.report import REPORT_NAME
from boothkit.evaluate.results import MethodResults, SubjectResult
from boothkit.evaluate.runner import Evaluator
from boothkit.evaluate.search import search_subject
from boothkit.evaluate.store import CACHE_DIR, SUBJECTS_DIR, CacheStore, Writer
from boothkit.evaluate.subjects import Subject, resolve_subjects
from boothkit.guidance.settings import family_defaults, sampler_settings
from boothkit.io import write_json_atomic
from boothkit.layout import OutputFolder, RankClaims, check_output_folder

log = logging.getLogger(__name__)
COMMAND = "evaluate"


def evaluate_command(config: EvaluateConfig) -> int:
    """The CLI command: evaluate, then print the folder's summary (every method evaluated there)."""
    run = run_evaluate(config)
    if run is not None:
        root = Path(config.output_dir).expanduser()
        print((root / SUMMARY_NAME).read_text(encoding="utf-8"), end="")
        print(f"summary: {root / SUMMARY_NAME}; report: {root / REPORT_NAME}")
    return 0


def run_evaluate(config: EvaluateConfig) -> MethodResults | None:
    """Evaluate every subject (this process's share); the main process writes the outputs and returns this
    method's results, the others return None."""
    # Honour `accelerate launch --cpu` (ACCELERATE_USE_CPU) as the Accelerator does; PartialState alone does not.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    root = check_output_folder(config.output_dir, COMMAND, overwrite=config.overwrite, reuse=True)
    subjects = find_subjects(config, warn=state.is_main_process)
    defaults = family_defaults(config.pretrained_model_name_or_path, config.revision)
    settings = sampler_settings(defaults, config)
    keys = EvaluationKeys(config, settings, state.device.type)
    with OutputFolder(root, COMMAND) if state.is_main_process else contextlib.nullcontext() as folder:
        if folder is not None:
            if config.overwrite:
                folder.clear()
            folder.claim(RESULTS_NAME, SUMMARY_NAME, REPORT_NAME)  # a user's file there: refused before any work
        state.wait_for_everyone()  # the other processes write only once the manifest is in place
        writer = Writer(root, folder if folder is not None else RankClaims(root, state.process_index, COMMAND))
        cache = CacheStore(writer)
        evaluator = Evaluator(config, keys, cache, Models(config, state.device, settings))
        mine = subjects[state.process_index::state.num_processes]
        results = {}
        for subject in tqdm(mine, desc="subjects", unit="subject", disable=len(mine) < 2):
            results[subject.folder] = search_subject(evaluator, subject, defaults.default_guidance_scale)
            _save_subject(writer, results[subject.folder])
        state.wait_for_everyone()
        if folder is not None:
            folder.absorb_ranks()  # the other processes are done writing
        if folder is None:
            return None
        for subject in subjects:
            if subject.folder not in results:  # evaluated by another process
                results[subject.folder] = _read_subject(root, config.method, subject)
        run = MethodResults(method=config.method, settings=config.model_dump(),
                            subjects=[results[subject.folder] for subject in subjects])
        write_outputs(folder, run, cache, keys.results_identity(subjects))
        return run


def find_subjects(config: EvaluateConfig, warn: bool) -> list[Subject]:
    """The subjects to evaluate, resolved and checked (one line for anything that would stop the run midway)."""
    prompts = load_evaluation_prompts(config.evaluation_prompts_path)
    entries, skipped = discover_subjects(config.instance_data_dir, config.lora_base_dir, prompts.subjects,
                                         config.subjects, config.lora_dir)
    if skipped and warn:
        log.warning("skipping folders with no matching subject or LoRA folder: %s", ", ".join(skipped))
    if not entries:
        raise BoothkitError(f"no subject to evaluate: no folder of '{config.instance_data_dir}' matches a subject "
                            f"of '{config.evaluation_prompts_path}' with a LoRA folder in "
                            f"'{config.lora_base_dir or config.lora_dir}'")
    reserved = [entry.folder for entry in entries if entry.folder in (CACHE_DIR, SUBJECTS_DIR)]
    if reserved:
        raise BoothkitError(f"subject folder '{reserved[0]}' has the name of a folder boothkit keeps in output_dir; "
                            "rename it")
    return resolve_subjects(config, prompts, entries)


def _subject_file(method: str, folder: str) -> PurePosixPath:
    return PurePosixPath(SUBJECTS_DIR, method, f"{folder}.json")


def _save_subject(writer: Writer, result: SubjectResult) -> None:
    """This process's result for one subject, for the main process to merge (and to read after a crash)."""
    path, = writer.claim(_subject_file(result.method, result.folder))
    write_json_atomic(path, result.to_json())


def _read_subject(root: Path, method: str, subject: Subject) -> SubjectResult:
    """Main process: a subject another process evaluated (its files are in that process's side manifest)."""
    path = root / _subject_file(method, subject.folder)
    return SubjectResult.from_json(json.loads(path.read_text(encoding="utf-8")))
