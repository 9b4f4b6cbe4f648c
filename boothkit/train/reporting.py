"""`--report_to tensorboard|wandb`: the loss, learning rate and validation images of a training run, through
accelerate's trackers (`Accelerator(log_with=...)`, `init_trackers`, `log`, `end_training`).

TensorBoard writes its event files to `OUTPUT_DIR/logs/` (`tensorboard --logdir OUTPUT_DIR/logs`): per step the
scalars `loss` and `lr` (the rows of `train_log.csv`), and per validation each image as the image tag
`<its folder>/<i>` (`validation/0`, several prompts `validation/prompt-K/0`) with the prompt as the text
`<its folder>/prompt`. W&B gets the same values in project `boothkit` (W&B's own files in `OUTPUT_DIR/logs/wandb`).

The event files are named by TensorBoard (`events.out.tfevents.<time>.<host>.<pid>.<n>`), so they are recorded in
the output folder's manifest as soon as they exist (`OutputFolder.record_created`): `--overwrite` removes them and
a resume adds its own file beside the earlier ones. A resume from step N writes `purge_step` N + 1 into its new
file: TensorBoard then hides what earlier files logged from step N + 1 on (the abandoned steps after the
checkpoint), so each step shows once, as in `train_log.csv`. A W&B resume starts a new W&B run unless
`WANDB_RUN_ID` and `WANDB_RESUME` say otherwise (W&B's own environment variables).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
from PIL import Image

from boothkit.errors import BoothkitError
from boothkit.layout import LOGS_DIR, OutputFolder

# The package each --report_to needs, and what to install.
_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard (or 'boothkit[tensorboard]')"),
             "wandb": ("wandb", "pip install wandb (or 'boothkit[wandb]')")}
WANDB_PROJECT = "boothkit"


def check_available(report_to: str) -> None:
    """One line naming the missing package; called before anything is written to the output folder."""
    if report_to not in _PACKAGES:
        return
    package, install = _PACKAGES[report_to]
    try:
        importlib.import_module(package)
    except ImportError:
        raise BoothkitError(f"--report_to {report_to} needs the {package} package: {install}") from None


def log_with(report_to: str) -> str | None:
    """`Accelerator(log_with=...)` for the flag."""
    return None if report_to == "none" else report_to


class Reporter:
    """The run's tracker on the main process (`start` returns None elsewhere and for --report_to none)."""

    def __init__(self, accelerator, folder: OutputFolder, report_to: str, existing: set[str]):
        self.accelerator, self.folder, self.report_to = accelerator, folder, report_to
        self.existing = existing  # the files under logs/ before the tracker started (a user's stay theirs)

    @classmethod
    def start(cls, config, accelerator, folder: OutputFolder | None, start_step: int) -> "Reporter | None":
        """Open the tracker (a resume from step N: TensorBoard's `purge_step` N + 1) and record its files."""
        if config.report_to == "none" or folder is None:
            return None
        if config.report_to == "tensorboard":
            project, kwargs = LOGS_DIR, {"purge_step": start_step + 1} if start_step else {}
        else:
            (folder.root / LOGS_DIR).mkdir(parents=True, exist_ok=True)
            project, kwargs = WANDB_PROJECT, {"dir": str(folder.root / LOGS_DIR)}
        reporter = cls(accelerator, folder, config.report_to, set(folder.files_under(LOGS_DIR)))
        accelerator.init_trackers(project, init_kwargs={config.report_to: kwargs})
        reporter.record_files()
        return reporter

    def record_files(self) -> None:
        """Record in the manifest the files the tracker has created so far under `logs/`."""
        self.folder.record_created(LOGS_DIR, self.existing)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.accelerator.log({"loss": loss, "lr": lr}, step=step)

    def log_validation(self, step: int, folder: str, prompt: str, paths: list[Path]) -> None:
        """The images of one validation prompt (as saved, 8-bit RGB) and the prompt."""
        tracker = self.accelerator.get_tracker(self.report_to, unwrap=False)
        pixels = {f"{folder}/{index}": _rgb(path) for index, path in enumerate(paths)}
        if self.report_to == "tensorboard":  # SummaryWriter.add_images: one (1, H, W, 3) batch per tag
            tracker.log_images({tag: image[None] for tag, image in pixels.items()}, step=step, dataformats="NHWC")
        else:  # wandb.Image of each
            tracker.log_images({tag: [image] for tag, image in pixels.items()}, step=step)
        self.accelerator.log({f"{folder}/prompt": prompt}, step=step)  # TensorBoard: flushes the images too
        self.record_files()

    def finish(self) -> None:
        """Close the tracker (flushes the last events) and record what it wrote."""
        self.accelerator.end_training()
        self.record_files()


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
