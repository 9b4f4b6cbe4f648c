"""The content key of a cached evaluation: a digest of everything that makes its images and its scores.

Nothing is keyed by a name, a size or a date. The key holds

* the base model's identity (`identity.model_identity`: the digest of a local folder's files, or the commit a
  hub revision resolves to) and its weight variant;
* the digests of the subject's reference photos, of its LoRA file and (`--method ag`) of its weak LoRA file;
* the prompts, the seed and the images per prompt;
* every sampler setting as resolved (steps, scheduler, height, width: the user's, else the family's defaults,
  so `--scheduler ddim` and the default DDIM share their results), the batch size (batched matrix products
  round differently: a pixel may differ by one level), the device type the images are computed on (cpu,
  cuda, ...), the negative prompt, the precision,
  the prompt-encoding options the LoRA is sampled with, the method, λ, ω, (ag) the CFG scale s and the guidance
  rescale φ (when not 0: the keys of runs without it are those of the code before φ, whose caches stay valid);
* the metric models' identities (`--dino_model`, `--clip_model`), the identifier and `--keep_identifier`,
  and `--class_prompt_samples` (the class-prompt samples and PRES an entry holds);
* `scoring.SCORING_VERSION` and `sampler.SAMPLING_VERSION`, the versions of boothkit's scoring and sampling
  code, and the versions of the libraries that compute images and scores (torch, diffusers, transformers, peft).

Computing a key reads files (their digests are memoised per process) but loads no model.
"""

from __future__ import annotations

from pathlib import Path

from importlib import metadata

from boothkit import identity
from boothkit.evaluate import scoring
from boothkit.evaluate.config import EvaluateConfig
from boothkit.evaluate.results import Setting
from boothkit.evaluate.subjects import Subject
from boothkit.guidance.sampler import SAMPLING_VERSION, SamplerSettings

_LIBRARY_VERSIONS = {name: metadata.version(name) for name in ("torch", "diffusers", "transformers", "peft")}
KEY_LENGTH = 24  # hex digits of SHA-256 kept in folder names (96 bits)


def _number(value: float | None) -> str | None:
    """A float as its shortest exact text (1.5 and 1.50 agree, 0.1 and 0.1000001 do not)."""
    return None if value is None else repr(float(value))


class EvaluationKeys:
    """Keys of one run's evaluations. The run-wide part (models, settings) is computed once, each subject's
    part once per subject."""

    def __init__(self, config: EvaluateConfig, settings: SamplerSettings, device_type: str):
        self.config = config
        self.run_identity = {
            "model": identity.model_identity(config.pretrained_model_name_or_path, config.revision, config.variant),
            "dino_model": identity.model_identity(config.dino_model, config_name="config.json"),
            "clip_model": identity.model_identity(config.clip_model, config_name="config.json"),
            "sampler": {"steps": settings.num_inference_steps, "scheduler": settings.scheduler,
                        "height": settings.height, "width": settings.width, "batch_size": settings.batch_size},
            "device": device_type,
            "negative_prompt": config.negative_prompt, "precision": config.mixed_precision,
            "method": config.method, "cfg_scale": _number(config.cfg_scale) if config.method == "ag" else None,
            "seed": config.seed, "images_per_prompt": config.num_images_per_prompt,
            "identifier": config.identifier, "keep_identifier": config.keep_identifier,
            "class_prompt_samples": config.class_prompt_samples,
        }
        if config.guidance_rescale != 0.0:  # φ = 0 samples exactly as before φ existed
            self.run_identity["guidance_rescale"] = _number(config.guidance_rescale)
        self._subjects: dict[str, dict] = {}

    def subject_identity(self, subject: Subject) -> dict:
        if subject.folder not in self._subjects:
            self._subjects[subject.folder] = {
                "references": identity.files_digest(subject.references),
                "lora": _weights_digest(subject.lora),
                "weak": _weights_digest(subject.weak) if subject.weak is not None else None,
                "prompts": list(subject.prompts), "text_options": list(subject.text),
                "identifier": subject.identifier,
            }
        return self._subjects[subject.folder]

    def results_identity(self, subjects: list[Subject]) -> dict:
        """What every method's results in one folder must share to be compared: the base model and, per subject
        folder, its reference photos and LoRA (stored with each method's results; `outputs.write_outputs`)."""
        return {"model": self.run_identity["model"],
                "subjects": {subject.folder: {name: self.subject_identity(subject)[name]
                                              for name in ("references", "lora")} for subject in subjects}}

    def key(self, subject: Subject, setting: Setting) -> str:
        """The key of evaluating `setting` for `subject`."""
        return identity.value_digest({
            "scoring_version": scoring.SCORING_VERSION, "sampling_version": SAMPLING_VERSION,
            "libraries": _LIBRARY_VERSIONS, "run": self.run_identity,
            "subject": self.subject_identity(subject),
            "guidance_scale": _number(setting.guidance_scale), "omega": _number(setting.omega),
        })[:KEY_LENGTH]


def _weights_digest(path: Path) -> str:
    """A LoRA file's digest, or a fully fine-tuned model's (every weight and config file of its folder, weak/,
    best/ and checkpoints aside: they are not the model)."""
    if path.is_file():
        return identity.file_digest(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
                   and p.relative_to(path).parts[0] not in ("weak", "best", "validation")
                   and not p.relative_to(path).parts[0].startswith(("checkpoint-", ".")))
    return identity.files_digest(files, root=path)
