"""`boothkit ui` (issue 13, first part: the Generate tab): the page runs `boothkit sample`'s code path, so its
images equal the CLI's bit for bit; driven through gradio_client and through a real browser (the system's
Chromium, via playwright; never a downloaded browser)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boothkit.cli import main
from boothkit.ui.app import build_app
from boothkit.ui.config import UiConfig

# The README's screenshots: `BOOTHKIT_UI_SCREENSHOTS=docs/ui pytest tests/test_ui.py` writes them there; otherwise
# the browser test writes its screenshot into its temporary folder (a test run leaves the checkout as it was).
SCREENSHOTS = os.environ.get("BOOTHKIT_UI_SCREENSHOTS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def page(sd15, sd15_lora, tmp_path_factory):
    """The app, launched on 127.0.0.1 with a root holding the tiny model and a trained LoRA."""
    root = tmp_path_factory.mktemp("ui-root")
    shutil.copytree(sd15, root / "model")
    shutil.copytree(sd15_lora, root / "lora", ignore=shutil.ignore_patterns("checkpoint-*", "validation"))
    yield from launched(root)


def launched(root: Path):
    """The app on 127.0.0.1 with `root` as its --root and the model "model" preset; yields its url and root."""
    app = build_app(UiConfig(root=str(root), pretrained_model_name_or_path="model"))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True,
               allowed_paths=[str(root)])
    yield {"url": f"http://127.0.0.1:{port}/", "root": root}
    app.close()


def values(**changes) -> list:
    fields = {"model": "model", "lora": "lora", "lora_scale": 1.0, "extra_loras": "", "weak": "", "method": "cfg", "guidance_scale": "", "omega": 0.5,
              "prompt": "a photo of sks dog", "negative_prompt": "", "steps": 3, "height": 32, "width": 32,
              "scheduler": "", "seed": 5, "random_seed": False, "num_images": 2, "compare": False}
    fields.update(changes)
    return list(fields.values())


def cli_images(command: str, out: Path) -> list[np.ndarray]:
    """Run the page's "same as a CLI command" line into `out`; its images as arrays."""
    words = shlex.split(command)
    assert words[:2] == ["boothkit", "sample"]
    words[words.index("--output_dir") + 1] = str(out)
    assert main(words[1:]) == 0
    return [np.asarray(Image.open(path)) for path in sorted(out.glob("*.png"))]


@pytest.mark.parametrize("method,scale", [("cfg", "0"), ("ag", ""), ("wig", "4.5")])
def test_generate_through_gradio_client_equals_the_cli(page, method, scale, tmp_path):
    from gradio_client import Client

    client = Client(page["url"], verbose=False)
    gallery, command, status = client.predict(*values(method=method, omega=0.3, guidance_scale=scale),
                                              api_name="/generate")
    assert status.startswith("2 of 2 images")
    assert (f"--guidance_scale {float(scale)}" in command) if scale else "--guidance_scale" not in command
    assert f"--method {method}" in command and len(gallery) == 2
    for flag in ("--seed 5", "--num_inference_steps 3", "--height 32", "--lora_dir", "--omega 0.3"):
        assert flag in command, flag  # the page's settings reach the sampler as given
    got = [np.asarray(Image.open(item["image"])) for item in gallery]
    expected = cli_images(command, tmp_path / "cli")
    assert len(expected) == 2 and all(np.array_equal(a, b) for a, b in zip(got, expected))
    written = sorted(Path(page["root"], "ui_outputs").glob("*/samples.json"))
    assert written and json.loads(written[-1].read_text())[0]["method"] == method


def test_paths_outside_the_root_are_refused(page):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(page["url"], verbose=False)
    with pytest.raises(AppError, match="outside the folder this page may use"):
        client.predict(*values(lora="/etc"), api_name="/generate")


def chromium() -> str:
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("no Chromium found for the browser test: install it with the system package manager "
                "(apt-get install -y chromium); never `playwright install`")


@contextlib.contextmanager
def browser_tab(url: str):
    """A page of the system's Chromium (driven by playwright), at `url`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1280, "height": 1400})
        tab.goto(url)
        yield tab
        browser.close()


def screenshot(tab, name: str, tmp_path: Path) -> None:
    """The README's screenshot of a tab (into docs/ui when BOOTHKIT_UI_SCREENSHOTS says so)."""
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(folder / name), full_page=True)
    assert (folder / name).stat().st_size > 10_000


def test_generate_in_a_real_browser(page, tmp_path):
    with browser_tab(page["url"]) as tab:
        tab.locator("#lora textarea").fill("lora")
        tab.locator("#prompt textarea").fill("a sks dog in the snow")
        tab.locator("#generate").click()
        tab.locator("#gallery img").first.wait_for(timeout=120_000)
        tab.wait_for_function("document.querySelector('#generate_status').innerText.includes('1 of 1')",
                              timeout=60_000)
        command = tab.locator("#command textarea").input_value()
        source = tab.locator("#gallery img").first.get_attribute("src")
        shown = tab.request.get(source if source.startswith("http") else page["url"].rstrip("/") + source).body()
        screenshot(tab, "generate.png", tmp_path)
    (tmp_path / "shown.png").write_bytes(shown)
    expected = cli_images(command, tmp_path / "cli")
    assert "a sks dog in the snow" in command and "--seed 0" in command
    assert np.array_equal(np.asarray(Image.open(tmp_path / "shown.png").convert("RGB")), expected[0][..., :3])


def test_train_and_results_tabs_in_a_real_browser(page, tmp_path):
    """Train: a short run from a photo folder, its validation images shown when it ends. Results: an evaluation
    folder opened, its table and a subject's samples shown."""
    from test_ui_results import make_evaluation_folder

    evaluation = make_evaluation_folder(page["root"] / "study")
    with browser_tab(page["url"]) as tab:
        tab.get_by_role("tab", name="Train").click()
        tab.locator("#photo_folder textarea").fill("study/photos/dog2")
        tab.locator("#train_output_dir textarea").fill("runs/browser")
        tab.locator("#train_steps input").fill("4")
        tab.locator("#validation_prompt textarea").fill("a sks dog on the beach")
        tab.locator("#train").click()
        tab.wait_for_function("document.querySelector('#train_status').innerText.startsWith('finished')",
                              timeout=180_000)
        tab.locator("#validation_gallery img").first.wait_for(timeout=30_000)
        screenshot(tab, "train.png", tmp_path)
        assert (page["root"] / "runs" / "browser" / "pytorch_lora_weights.safetensors").is_file()
        tab.get_by_role("tab", name="Results").click()
        tab.locator("#results_folder textarea").fill(str(evaluation.relative_to(page["root"])))
        tab.locator("#open_results").click()
        tab.locator("#results_gallery img").first.wait_for(timeout=60_000)
        tab.wait_for_function("document.querySelector('#results_table').innerText.includes('mean')",
                              timeout=30_000)
        screenshot(tab, "results.png", tmp_path)
        table = tab.locator("#results_table").inner_text()
    assert all(method in table for method in ("cfg", "ag", "wig")) and "dog2" in table


def test_the_model_stays_loaded_between_clicks(page, monkeypatch):
    """Changing λ, ω, prompt, seed or steps reuses the loaded model; another LoRA (or method) loads again."""
    import boothkit.sample
    from gradio_client import Client

    loads = []
    load_family = boothkit.sample.load_family
    monkeypatch.setattr(boothkit.sample, "load_family", lambda *a, **k: loads.append(a[0]) or load_family(*a, **k))
    client = Client(page["url"], verbose=False)
    client.predict(*values(method="wig", seed=1), api_name="/generate")
    first = len(loads)
    client.predict(*values(method="wig", seed=2, guidance_scale="3", omega=0.7, prompt="a sks dog", steps=2),
                   api_name="/generate")
    assert len(loads) == first  # nothing loaded again
    client.predict(*values(method="cfg", lora=""), api_name="/generate")
    assert len(loads) == first + 1


def test_compare_mode_runs_the_same_seeds_through_every_method(page, tmp_path):
    """One click: CFG, AG and WIG with the same seeds, each image captioned with its method and equal to that
    method's own CLI run."""
    from gradio_client import Client

    client = Client(page["url"], verbose=False)
    gallery, commands, _ = client.predict(*values(compare=True, random_seed=True, omega=0.2), api_name="/generate")
    lines = commands.splitlines()
    assert [item["caption"] for item in gallery] == ["cfg", "cfg", "ag", "ag", "wig", "wig"] and len(lines) == 3
    seeds = {line.split("--seed ")[1].split()[0] for line in lines}
    assert len(seeds) == 1  # one (random) seed for all three methods
    for index, (method, line) in enumerate(zip(("cfg", "ag", "wig"), lines)):
        assert f"--method {method}" in line
        expected = cli_images(line, tmp_path / method)
        got = [np.asarray(Image.open(item["image"])) for item in gallery[2 * index:2 * index + 2]]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_without_gradio_one_line_says_how_to_install_it(run_cli, monkeypatch, tmp_path):
    import sys

    from test_train import assert_one_line_error

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as when it is not installed
    assert_one_line_error(run_cli("ui", "--root", str(tmp_path)), "pip install 'boothkit[ui]'")
    assert_one_line_error(run_cli("ui", "--root", str(tmp_path / "missing")), "pip install")


def test_several_loras_with_weights_and_a_chosen_weak_checkpoint_equal_the_cli(page, tmp_path):
    """The subject LoRA at a weight, another LoRA at its own (one PATH:WEIGHT a line) and an explicit weak
    checkpoint reach `boothkit sample` as --lora_scale, --lora and --weak_checkpoint_path."""
    from gradio_client import Client

    client = Client(page["url"], verbose=False)
    gallery, command, _ = client.predict(*values(method="ag", lora_scale=0.7, extra_loras="lora/weak:-0.5\n",
                                                 weak="lora/weak"), api_name="/generate")
    root = page["root"].resolve()
    for flag in ("--lora_scale 0.7", f"--lora {root / 'lora' / 'weak'}:-0.5", f"--weak_checkpoint_path {root}/lora/weak"):
        assert flag in command, flag
    got = [np.asarray(Image.open(item["image"])) for item in gallery]
    expected = cli_images(command, tmp_path / "cli")
    assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, expected))
    plain, _, _ = client.predict(*values(method="ag"), api_name="/generate")
    assert not np.array_equal(np.asarray(Image.open(plain[0]["image"])), got[0])  # the weights took effect


def test_stop_ends_the_run_and_keeps_the_images_made(page):
    """Stop during a long run: the run ends within a step, the gallery holds the images made, and the folder's
    samples.json lists exactly the PNGs beside it."""
    import time

    from gradio_client import Client

    client = Client(page["url"], verbose=False)
    job = client.submit(*values(num_images=200, steps=20), api_name="/generate")
    deadline = time.monotonic() + 120
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.outputs(), "no image within two minutes"
    client.predict(api_name="/stop")
    gallery, _, status = job.result(timeout=120)
    assert status.startswith("stopped:") and 1 <= len(gallery) < 200
    folder = Path(status.split(" kept in ")[1])
    records = json.loads((folder / "samples.json").read_text())
    assert sorted(r["file"] for r in records) == sorted(p.name for p in folder.glob("*.png"))
    assert len(records) == len(gallery)
