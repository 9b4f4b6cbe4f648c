"""The `boothkit ui` page (Gradio 6). The Generate tab builds a `SampleConfig` from the page's fields and calls
`boothkit.sample.run_sample`, the function behind `boothkit sample`: the images are the CLI's, bit for bit, and
the folder holds the same `samples.json`. Paths typed on the page must lie inside `--root`.
"""

from __future__ import annotations

import logging
import random
import shlex
import time
from pathlib import Path

from boothkit.errors import BoothkitError
from boothkit.ui.config import UiConfig

log = logging.getLogger(__name__)
METHODS = ("cfg", "ag", "wig")
_SAMPLE_FLAGS_SHOWN = ("pretrained_model_name_or_path", "lora_dir", "method", "guidance_scale", "omega", "prompt",
                       "negative_prompt", "num_inference_steps", "height", "width", "scheduler", "seed",
                       "num_images_per_prompt", "output_dir")


def require_gradio():
    try:
        import gradio
    except ImportError:
        raise BoothkitError("boothkit ui needs Gradio: pip install 'boothkit[ui]'") from None
    return gradio


class Workspace:
    """The folder the page may use: every local path typed there must resolve inside it."""

    def __init__(self, config: UiConfig):
        self.root = Path(config.root).expanduser().resolve()
        if not self.root.is_dir():
            raise BoothkitError(f"--root '{config.root}' is not a folder")
        self.outputs = Path(config.output_dir).expanduser().resolve() if config.output_dir else self.root / "ui_outputs"
        self.inside(self.outputs, "--output_dir")
        self.models: dict = {}  # the loaded model and LoRAs, kept between clicks (`run_sample`'s cache)

    def inside(self, path: str | Path, what: str) -> Path:
        resolved = (self.root / Path(path).expanduser()).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise BoothkitError(f"{what} '{path}' is outside the folder this page may use ('{self.root}')")
        return resolved

    def model(self, source: str) -> str:
        """A local model folder inside the root, or a hub id (`org/name`, not a path here)."""
        source = source.strip()
        if not source:
            raise BoothkitError("choose a model (a folder under the root, or a hub id)")
        local = (self.root / source).expanduser()
        if local.exists() or source.startswith((".", "/", "~")):
            return str(self.inside(source, "model"))
        return source

    def new_output_folder(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for index in range(1000):
            folder = self.outputs / f"{stamp}-{index:03d}"
            if not folder.exists():
                return folder
        raise BoothkitError(f"no free output folder name under '{self.outputs}'")


def sample_config(workspace: Workspace, values: dict):
    """The `SampleConfig` of the Generate tab's fields (validated as the CLI validates its flags)."""
    from boothkit.config import validate_config
    from boothkit.guidance.config import SampleConfig

    seed = random.randrange(2**31) if values.get("random_seed") else int(values["seed"])
    fields = {
        "pretrained_model_name_or_path": workspace.model(values["model"]),
        "method": values["method"], "prompt": [values["prompt"]], "seed": seed,
        "num_inference_steps": int(values["steps"]), "num_images_per_prompt": int(values["num_images"]),
        "output_dir": str(workspace.new_output_folder()),
    }
    if str(values.get("lora") or "").strip():
        fields["lora_dir"] = str(workspace.inside(values["lora"].strip(), "LoRA"))
    scale = str(values.get("guidance_scale") or "").strip()
    if scale:  # λ = 0 is a scale like any other; empty means the method's default
        fields["guidance_scale"] = scale
    fields["omega"] = values["omega"]
    for name in ("height", "width"):  # 0: the model's resolution
        if values.get(name):
            fields[name] = int(values[name])
    if str(values.get("negative_prompt") or "").strip():
        fields["negative_prompt"] = values["negative_prompt"]
    if str(values.get("scheduler") or "").strip():
        fields["scheduler"] = values["scheduler"].strip()
    return validate_config(SampleConfig, fields)


def command_line(config) -> str:
    """The `boothkit sample` command that makes the same images."""
    words = ["boothkit", "sample"]
    for name in _SAMPLE_FLAGS_SHOWN:
        value = getattr(config, name)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            words += [f"--{name}", str(item)]
    return shlex.join(words)


def generate(workspace: Workspace, values: dict) -> tuple[list, str]:
    """Sample with the tab's settings through `run_sample`; (gallery items, the CLI command(s)). With "compare",
    the same seeds through CFG, CFG + AG and WIG (λ empty: each method's default), one folder each, captioned."""
    from boothkit.sample import run_sample

    methods = list(METHODS) if values.get("compare") else [values["method"]]
    if values.get("random_seed"):  # one seed for every method of a comparison
        values = dict(values, seed=random.randrange(2**31), random_seed=False)
    items, commands = [], []
    for method in methods:
        config = sample_config(workspace, dict(values, method=method))
        paths = run_sample(config, workspace.models)
        items += [(str(path), method) if len(methods) > 1 else str(path) for path in paths]
        commands.append(command_line(config))
    return items, "\n".join(commands)


GENERATE_FIELDS = ("model", "lora", "method", "guidance_scale", "omega", "prompt", "negative_prompt", "steps",
                   "height", "width", "scheduler", "seed", "random_seed", "num_images", "compare")


def build_app(config: UiConfig):
    """The Gradio Blocks of the page."""
    gr = require_gradio()
    workspace = Workspace(config)
    with gr.Blocks(title="boothkit") as app:
        gr.Markdown("# boothkit")
        with gr.Tab("Generate"):
            inputs = _generate_inputs(gr, config)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="Images", elem_id="gallery", columns=4)
            command = gr.Textbox(label="The same as CLI command(s)", elem_id="command", interactive=False)

        def on_generate(*args, progress=gr.Progress(track_tqdm=True)):  # the sampler's tqdm bar, with step counts
            try:
                return generate(workspace, dict(zip(GENERATE_FIELDS, args)))
            except BoothkitError as error:
                raise gr.Error(str(error)) from None

        button.click(on_generate, inputs=inputs, outputs=[gallery, command], api_name="generate")
    return app


def _generate_inputs(gr, config: UiConfig) -> list:
    with gr.Row():
        model = gr.Textbox(label="Model (folder under the root, or hub id)", elem_id="model",
                           value=config.pretrained_model_name_or_path or "")
        lora = gr.Textbox(label="LoRA (folder or file under the root; empty: none)", elem_id="lora")
    with gr.Row():
        method = gr.Radio(list(METHODS), value="cfg", label="Method", elem_id="method")
        guidance_scale = gr.Textbox(label="λ (guidance scale; empty: the method's default)", value="",
                                    elem_id="guidance_scale")
        omega = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="ω (WIG)")
    prompt = gr.Textbox(label="Prompt", elem_id="prompt")
    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
    with gr.Row():
        steps = gr.Number(label="Steps", value=30, precision=0, minimum=1)
        height = gr.Number(label="Height (0: the model's)", value=0, precision=0, minimum=0)
        width = gr.Number(label="Width (0: the model's)", value=0, precision=0, minimum=0)
        scheduler = gr.Textbox(label="Scheduler (empty: the family's)", value="")
    with gr.Row():
        seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
        random_seed = gr.Checkbox(label="Random seed", value=False)
        num_images = gr.Number(label="Images", value=1, precision=0, minimum=1)
        compare = gr.Checkbox(label="Compare CFG / AG / WIG (same seeds)", value=False, elem_id="compare")
    return [model, lora, method, guidance_scale, omega, prompt, negative, steps, height, width, scheduler, seed,
            random_seed, num_images, compare]


def run_ui(config: UiConfig) -> int:
    """Launch the page and serve until interrupted."""
    app = build_app(config)
    if config.host != "127.0.0.1":
        log.warning("binding %s: anyone who can reach this machine's port %d can use the page", config.host,
                    config.port)
    if config.share:
        log.warning("--share publishes the page on a public gradio.live address")
    app.launch(server_name=config.host, server_port=config.port or None, share=config.share, ssr_mode=False,
               allowed_paths=[str(Workspace(config).outputs)])
    return 0
