"""`boothkit ui`'s Train tab (issue 13): a `boothkit train` child process driven from the page through
gradio_client; its folder is the CLI's (same LoRA as the command it shows; resumable by the CLI after Cancel)."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from boothkit.cli import main
from boothkit.data.images import sample_subject_dir
from boothkit.ui.config import UiConfig
from test_ui import launched


@pytest.fixture(scope="module")
def page(sd15, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-train-root")
    shutil.copytree(sd15, root / "model")
    shutil.copytree(sample_subject_dir(), root / "photos")
    yield from launched(root)


def values(**changes) -> list:
    fields = {"model": "model", "photos": [], "photo_folder": "photos", "instance_prompt": "a photo of sks dog",
              "class_prompt": "a photo of dog", "prior_preservation": False, "num_class_images": 2,
              "output_dir": "runs/dog", "max_train_steps": 6, "rank": 4, "learning_rate": 1e-3, "resolution": 0,
              "validation_prompt": "a sks dog", "validation_steps": 3, "checkpointing_steps": 3, "weak_checkpoint_step": 0,
              "resume": False}
    fields.update(changes)
    return list(fields.values())


def client_of(page):
    from gradio_client import Client

    return Client(page["url"], verbose=False)


def test_a_short_run_from_uploaded_photos_is_the_clis_run(page, tmp_path):
    """Uploaded photos, streamed validation images, and a LoRA equal to the one its CLI command trains."""
    from gradio_client import handle_file

    photos = [handle_file(str(path)) for path in sorted(sample_subject_dir().iterdir())]
    status, gallery, log, command = client_of(page).predict(*values(photos=photos, photo_folder=""),
                                                            api_name="/train")
    out = page["root"] / "runs" / "dog"
    assert status.startswith("finished: 6 steps") and "training" in log
    assert [item["caption"] for item in gallery] == ["step 3"] * 4 + ["step 6"] * 4
    words = shlex.split(command)
    copied = Path(words[words.index("--instance_data_dir") + 1])
    assert copied.parent == page["root"] / "ui_outputs" and len(list(copied.iterdir())) == len(photos)
    words[words.index("--output_dir") + 1] = str(tmp_path / "cli")
    assert main(words[1:]) == 0
    ours, theirs = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (out, tmp_path / "cli"))
    assert ours.keys() == theirs.keys() and all((ours[key] == theirs[key]).all() for key in ours)


@pytest.fixture
def sigint_ignored():
    """As under `nohup boothkit ui &` from a script: the page's process (here pytest's) ignores SIGINT, and the
    runs it starts inherit that."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def test_cancel_keeps_a_folder_the_cli_resumes(page, sigint_ignored):
    client = client_of(page)
    job = client.submit(*values(output_dir="runs/long", max_train_steps=100_000, validation_prompt="",
                                weak_checkpoint_step=2), api_name="/train")
    started = time.monotonic()
    while time.monotonic() < started + 180 and step_shown(job) < 10:
        time.sleep(0.1)
    assert step_shown(job) >= 10, "the page showed no progress to step 10 within three minutes"
    cancelled = time.monotonic()
    client.predict(api_name="/cancel_training")
    status, _, _, command = job.result(timeout=120)
    assert status.startswith("cancelled at step"), status
    assert time.monotonic() - cancelled < 30  # Ctrl-C ends a run within a step or two, not at the grace period
    out = page["root"] / "runs" / "long"
    checkpoints = sorted(int(path.name.split("-")[1]) for path in out.glob("checkpoint-*"))
    assert checkpoints and not (out / ".boothkit.lock").exists()
    words = shlex.split(command)
    words[words.index("--max_train_steps") + 1] = str(checkpoints[-1] + 2)
    assert main([*words[1:], "--resume_from_checkpoint", "latest"]) == 0
    assert (out / "pytorch_lora_weights.safetensors").exists()


def step_shown(job) -> int:
    """The step in the last status the page streamed (0 before any)."""
    shown = job.outputs()
    found = re.search(r"step (\d+) of", shown[-1][0]) if shown else None
    return int(found[1]) if found else 0


def test_a_failing_run_is_reported_and_the_page_stays_up(page):
    """The child process ends in an error (no model in that folder): its one-line error reaches the page."""
    status, _, _, _ = client_of(page).predict(*values(model="photos", output_dir="runs/broken"), api_name="/train")
    assert status.startswith("failed (exit status 2): error:"), status
    assert client_of(page).predict(*values(output_dir="runs/again", max_train_steps=1), api_name="/train")[0] \
        .startswith("finished")


@pytest.mark.parametrize("changes,message", [
    ({"output_dir": "/tmp"}, "outside the folder this page may use"),
    ({"photo_folder": ""}, "choose the photos"),
    ({"max_train_steps": 2, "weak_checkpoint_step": 5}, "--weak_checkpoint_step"),
    ({"prior_preservation": True, "class_prompt": ""}, "--class_prompt"),
])
def test_bad_fields_end_in_one_line(page, changes, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client_of(page).predict(*values(**changes), api_name="/train")


def test_an_upload_that_is_no_image_is_refused(page, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    fake = tmp_path / "dog.png"
    fake.write_text("not a picture")
    with pytest.raises(AppError, match="uploaded photo 'dog.png' cannot be used"):
        client_of(page).predict(*values(photos=[handle_file(str(fake))], photo_folder=""), api_name="/train")


def test_prior_preservation_generates_class_images_kept_per_model_and_prompt(page):
    from boothkit.ui.app import Workspace
    from boothkit.ui.train import class_images_folder

    status, _, _, command = client_of(page).predict(*values(output_dir="runs/prior", prior_preservation=True,
                                                            max_train_steps=2, validation_prompt=""),
                                                    api_name="/train")
    assert status.startswith("finished"), status
    words = shlex.split(command)
    assert "--with_prior_preservation" in words and words[words.index("--num_class_images") + 1] == "2"
    classes = Path(words[words.index("--class_data_dir") + 1])
    assert classes.parent == page["root"] / "ui_outputs" / "class-images" and len(list(classes.glob("*.png"))) == 2
    workspace = Workspace(UiConfig(root=str(page["root"])))
    fields = {"pretrained_model_name_or_path": str(page["root"] / "model"), "class_prompt": "a photo of dog"}
    assert class_images_folder(workspace, fields) == classes
    assert class_images_folder(workspace, dict(fields, pretrained_model_name_or_path="other")) != classes
