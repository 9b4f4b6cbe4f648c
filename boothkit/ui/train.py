"""The Train tab of `boothkit ui`: a `boothkit train` run in a child process (the page stays responsive, and a
crash there cannot take the page down), its progress, log and validation images streamed to the page, and a
Cancel button (SIGINT: the run stops as Ctrl-C stops it, and its folder keeps its checkpoints, so the same
command with `--resume_from_checkpoint latest` goes on from there, on the page or in a terminal).

The flags are validated by `TrainConfig`, as the CLI validates them, before anything starts; uploaded photos are
checked with the loader training uses and copied under the output area (never into a folder of the user's).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from boothkit.errors import BoothkitError

TRAIN_FIELDS = ("model", "photos", "photo_folder", "instance_prompt", "class_prompt", "prior_preservation",
                "num_class_images", "output_dir", "max_train_steps", "rank", "learning_rate", "resolution",
                "validation_prompt", "validation_steps", "checkpointing_steps", "weak_checkpoint_step", "resume")
POLL_SECONDS = 0.5
_STEP = re.compile(r"step-(\d+)")
CANCEL_GRACE_SECONDS = 60  # after SIGINT, how long the run may take to close its folder before it is killed
# `boothkit train` with Ctrl-C's KeyboardInterrupt restored first: a page started in the background by a
# non-interactive shell (`nohup boothkit ui &`, a service script) has SIGINT ignored, and an ignored signal is
# inherited across exec — the run would then ignore Cancel until the grace period ends and it is killed.
CHILD_PROGRAM = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "from boothkit.cli import main; raise SystemExit(main(['train', *sys.argv[1:]]))")


@dataclass
class TrainJob:
    """One `boothkit train` child process and where it writes."""

    arguments: list[str]  # after `boothkit train`
    output_dir: Path
    log_path: Path
    max_train_steps: int
    process: subprocess.Popen | None = None
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def command(self) -> str:
        return shlex.join(["boothkit", "train", *self.arguments])

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-c", CHILD_PROGRAM, *self.arguments],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=environment, start_new_session=True)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cancel(self) -> None:
        """Ctrl-C for the run (its checkpoints stay); killed only if it has not ended after the grace period."""
        with self.lock:
            if not self.running():
                return
            self.cancelled = True
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(CANCEL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def step(self) -> int:
        """The last optimizer step in the run's `train_log.csv` (0 before the first)."""
        from boothkit.layout import TRAIN_LOG_NAME

        try:
            with open(self.output_dir / TRAIN_LOG_NAME, newline="") as handle:
                steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("step", "").isdigit()]
        except (OSError, ValueError, KeyError):
            return 0
        return steps[-1] if steps else 0

    def validation_images(self) -> list[tuple[str, str]]:
        """(path, "step N") of every validation image so far, oldest first."""
        found = sorted((self.output_dir / "validation").rglob("step-*.png"))
        return [(str(path), f"step {int(_STEP.search(path.name)[1])}") for path in found]

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the run's output, each progress-bar line as last drawn."""
        try:
            text = self.log_path.read_bytes()[-20_000:].decode("utf-8", "replace")
        except OSError:
            return ""
        shown = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
        return "\n".join([line for line in shown if line.strip()][-lines:])

    def status(self) -> str:
        step = self.step()
        if self.running():
            return f"training: step {step} of {self.max_train_steps} (folder {self.output_dir})"
        code = self.process.returncode if self.process else None
        if code == 0:
            return f"finished: {self.max_train_steps} steps; the LoRA is in {self.output_dir}"
        if self.cancelled:
            return (f"cancelled at step {step}; its checkpoints stay in {self.output_dir}: tick 'resume' (or add "
                    "--resume_from_checkpoint latest to the command) to go on")
        last = self.log_tail(1)
        return f"failed (exit status {code}): {last}"


def photo_folder(workspace, values: dict) -> str:
    """The instance photo folder: uploaded photos (checked as training reads them, copied under the output area)
    or a folder typed on the page (inside the root)."""
    from boothkit.data.images import UnreadableImageError, load_rgb_image

    uploads = [Path(item if isinstance(item, (str, Path)) else item["path"]) for item in values.get("photos") or []]
    if not uploads:
        if not str(values.get("photo_folder") or "").strip():
            raise BoothkitError("choose the photos: upload them, or type a folder under the root")
        return str(workspace.inside(values["photo_folder"].strip(), "photo folder"))
    for path in uploads:
        try:
            load_rgb_image(path)
        except UnreadableImageError as error:
            raise BoothkitError(f"uploaded photo '{path.name}' cannot be used: {error.reason}") from None
    target = workspace.new_output_folder("photos-")
    target.mkdir(parents=True)
    for path in uploads:
        shutil.copyfile(path, target / path.name)
    return str(target)


def train_job(workspace, values: dict) -> TrainJob:
    """The run the tab's fields describe, its flags validated by `TrainConfig` (one line on a bad value)."""
    from boothkit.config import validate_config
    from boothkit.train.config import TrainConfig

    if not str(values.get("output_dir") or "").strip():
        raise BoothkitError("choose an output folder (under the root) for the run")
    output_dir = workspace.inside(values["output_dir"].strip(), "output folder")
    fields = {"pretrained_model_name_or_path": workspace.model(values["model"]),
              "instance_data_dir": photo_folder(workspace, values), "instance_prompt": values["instance_prompt"],
              "output_dir": str(output_dir), "max_train_steps": int(values["max_train_steps"]),
              "rank": int(values["rank"]), "learning_rate": float(values["learning_rate"]),
              "validation_steps": int(values["validation_steps"]),
              "checkpointing_steps": int(values["checkpointing_steps"])}
    for name in ("class_prompt", "validation_prompt"):
        if str(values.get(name) or "").strip():
            fields[name] = values[name].strip()
    for name in ("resolution", "weak_checkpoint_step"):  # empty or 0: the default (the model's; 20 % of the steps)
        if values.get(name):
            fields[name] = int(values[name])
    if values.get("prior_preservation"):
        fields.update(with_prior_preservation=True, num_class_images=int(values["num_class_images"]),
                      class_data_dir=str(class_images_folder(workspace, fields)))
    if values.get("resume"):
        fields["resume_from_checkpoint"] = "latest"
    config = validate_config(TrainConfig, fields)
    arguments = []
    for name, value in fields.items():
        arguments += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    log_path = workspace.outputs / "train-logs" / f"{output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    return TrainJob(arguments, output_dir, log_path, config.max_train_steps)


def class_images_folder(workspace, fields: dict) -> Path:
    """Where the page keeps generated class images: one folder per (model, class prompt, resolution), so runs
    that share them reuse them and a run with another model or prompt never takes images made for another."""
    key = json.dumps([fields["pretrained_model_name_or_path"], fields.get("class_prompt"), fields.get("resolution")])
    slug = re.sub(r"[^a-z0-9]+", "-", str(fields.get("class_prompt", "")).lower()).strip("-")[:60] or "class"
    return workspace.outputs / "class-images" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def follow(job: TrainJob) -> Iterator[tuple[str, list, str, str]]:
    """(status, validation images, log tail, command) while the run lasts, and once more when it has ended."""
    while job.running():
        yield job.status(), job.validation_images(), job.log_tail(), job.command
        time.sleep(POLL_SECONDS)
    yield job.status(), job.validation_images(), job.log_tail(), job.command


def train_tab(gr, workspace, preset_model: str | None) -> None:
    """The tab's components and events (`train`, `cancel_training` in the API)."""
    inputs = _train_inputs(gr, preset_model)
    with gr.Row():
        start = gr.Button("Train", variant="primary", elem_id="train")
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel_training")
    status = gr.Markdown(elem_id="train_status")
    gallery = gr.Gallery(label="Validation images", elem_id="validation_gallery", columns=4)
    log = gr.Textbox(label="Output", lines=8, elem_id="train_log", interactive=False)
    command = gr.Textbox(label="The same as a CLI command", elem_id="train_command", interactive=False,
                         buttons=["copy"])
    current: dict[str, TrainJob] = {}

    def on_train(*args, progress=gr.Progress()):
        if "job" in current and current["job"].running():
            raise gr.Error("a training is running: cancel it or wait for it to end")
        try:
            job = train_job(workspace, dict(zip(TRAIN_FIELDS, args)))
        except BoothkitError as error:
            raise gr.Error(str(error)) from None
        current["job"] = job
        job.start()
        for update in follow(job):
            progress((job.step(), job.max_train_steps), desc="training", unit="steps")
            yield update

    def on_cancel():
        if "job" in current:
            current["job"].cancel()

    start.click(on_train, inputs=inputs, outputs=[status, gallery, log, command], api_name="train")
    cancel.click(on_cancel, api_name="cancel_training")


def _train_inputs(gr, preset_model: str | None) -> list:
    with gr.Row():
        model = gr.Textbox(label="Model (folder under the root, or hub id)", value=preset_model or "",
                           elem_id="train_model")
        output_dir = gr.Textbox(label="Output folder (under the root)", elem_id="train_output_dir")
    with gr.Row():
        photos = gr.File(label="Photos of the subject (3-6)", file_count="multiple", file_types=["image"],
                         type="filepath", elem_id="photos")
        folder = gr.Textbox(label="…or a photo folder under the root", elem_id="photo_folder")
    with gr.Row():
        instance_prompt = gr.Textbox(label="Instance prompt", value="a photo of sks dog", elem_id="instance_prompt")
        class_prompt = gr.Textbox(label="Class prompt (prior preservation)", value="a photo of dog")
        prior = gr.Checkbox(label="Prior preservation", value=False)
        class_images = gr.Number(label="Class images", value=100, precision=0, minimum=1)
    with gr.Row():
        steps = gr.Number(label="Steps", value=500, precision=0, minimum=1, elem_id="train_steps")
        rank = gr.Number(label="LoRA rank", value=4, precision=0, minimum=1)
        learning_rate = gr.Number(label="Learning rate", value=1e-4)
        resolution = gr.Number(label="Resolution (0: the model's)", value=0, precision=0, minimum=0)
    with gr.Row():
        validation_prompt = gr.Textbox(label="Validation prompt (empty: none)", elem_id="validation_prompt")
        validation_steps = gr.Number(label="Validate every", value=100, precision=0, minimum=1)
        checkpointing_steps = gr.Number(label="Checkpoint every", value=100, precision=0, minimum=1)
        weak_step = gr.Number(label="Weak checkpoint at step (0: 20 % of the steps)", value=0, precision=0,
                              minimum=0)
        resume = gr.Checkbox(label="Resume the folder's latest checkpoint", value=False, elem_id="resume")
    return [model, photos, folder, instance_prompt, class_prompt, prior, class_images, output_dir, steps, rank,
            learning_rate, resolution, validation_prompt, validation_steps, checkpointing_steps, weak_step, resume]
