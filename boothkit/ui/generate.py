"""The Generate tab of `boothkit ui`: builds a `SampleConfig` from the page's fields and runs
`boothkit.sample.iter_sample`, the code behind `boothkit sample`: the images are the CLI's, bit for bit, and the
folder holds the same `samples.json` (and each PNG the same A1111 `parameters`). Images appear one by one; the
Stop button ends the run between two denoising steps, keeping the images already written.
"""

from __future__ import annotations

import random
import shlex
import threading
from typing import Iterator

from boothkit.errors import BoothkitError

METHODS = ("cfg", "ag", "wig")
GENERATE_FIELDS = ("model", "lora", "lora_scale", "extra_loras", "weak", "method", "guidance_scale", "omega",
                   "prompt", "negative_prompt", "steps", "height", "width", "scheduler", "seed", "random_seed",
                   "num_images", "compare")
_SAMPLE_FLAGS_SHOWN = ("pretrained_model_name_or_path", "lora_dir", "lora_scale", "lora", "weak_checkpoint_path",
                       "method", "guidance_scale", "omega", "prompt", "negative_prompt", "num_inference_steps",
                       "height", "width", "scheduler", "seed", "num_images_per_prompt", "output_dir")


def sample_config(workspace, values: dict):
    """The `SampleConfig` of the Generate tab's fields (validated as the CLI validates its flags)."""
    from boothkit.config import validate_config
    from boothkit.guidance.config import SampleConfig, parse_lora

    seed = random.randrange(2**31) if values.get("random_seed") else int(values["seed"])
    fields = {
        "pretrained_model_name_or_path": workspace.model(values["model"]),
        "method": values["method"], "prompt": [values["prompt"]], "seed": seed,
        "num_inference_steps": int(values["steps"]), "num_images_per_prompt": int(values["num_images"]),
        "output_dir": str(workspace.new_output_folder()), "omega": values["omega"],
    }
    if _text(values.get("lora")):
        fields["lora_dir"] = str(workspace.inside(_text(values["lora"]), "LoRA"))
        if values.get("lora_scale") not in (None, "", 1, 1.0):
            fields["lora_scale"] = values["lora_scale"]
    extras = []  # one PATH[:WEIGHT] per line, each path confined to the root
    for line in filter(None, map(str.strip, str(values.get("extra_loras") or "").splitlines())):
        try:
            path, weight = parse_lora(str(workspace.root / line))
        except ValueError as error:
            raise BoothkitError(f"other LoRAs: {error}") from None
        extras.append(f"{workspace.inside(path, 'LoRA')}:{weight:g}")
    if extras:
        fields["lora"] = extras
    if _text(values.get("weak")):
        fields["weak_checkpoint_path"] = str(workspace.inside(_text(values["weak"]), "weak checkpoint"))
    if _text(values.get("guidance_scale")):  # λ = 0 is a scale like any other; empty means the method's default
        fields["guidance_scale"] = _text(values["guidance_scale"])
    for name in ("height", "width"):  # 0: the model's resolution
        if values.get(name):
            fields[name] = int(values[name])
    for name, field in (("negative_prompt", "negative_prompt"), ("scheduler", "scheduler")):
        if _text(values.get(name)):
            fields[field] = values[name] if name == "negative_prompt" else _text(values[name])
    return validate_config(SampleConfig, fields)


def _text(value) -> str:
    return str(value or "").strip()


def command_line(config) -> str:
    """The `boothkit sample` command that makes the same images."""
    words = ["boothkit", "sample"]
    for name in _SAMPLE_FLAGS_SHOWN:
        value = getattr(config, name)
        if value is None or (name == "lora_scale" and name not in config.model_fields_set):
            continue
        for item in value if isinstance(value, list) else [value]:
            words += [f"--{name}", str(item)]
    return shlex.join(words)


def generate(workspace, values: dict, stop: threading.Event | None = None) -> Iterator[tuple[list, str, str]]:
    """Sample with the tab's settings through `iter_sample`, yielding (gallery items so far, the CLI command(s),
    a status line) after each image. With "compare", the same seeds through CFG, CFG + AG and WIG (λ empty: each
    method's default), one folder each, captioned. `stop` set: the run ends at the next denoising step."""
    from boothkit.sample import iter_sample

    methods = list(METHODS) if values.get("compare") else [values["method"]]
    if values.get("random_seed"):  # one seed for every method of a comparison
        values = dict(values, seed=random.randrange(2**31), random_seed=False)
    items, commands, folder = [], [], None
    wanted = len(methods) * int(values["num_images"])
    for method in methods:
        config = sample_config(workspace, dict(values, method=method))
        commands.append(command_line(config))
        folder = config.output_dir
        for path in iter_sample(config, workspace.models, stop):
            items.append((str(path), method) if len(methods) > 1 else str(path))
            yield items, "\n".join(commands), f"{len(items)} of {wanted} images, in {path.parent}"
        if stop is not None and stop.is_set():
            yield items, "\n".join(commands), f"stopped: {len(items)} of {wanted} images kept in {folder}"
            return


def generate_tab(gr, workspace, preset_model: str | None) -> None:
    """The tab's components and events (`generate` and `stop` in the API)."""
    inputs = _generate_inputs(gr, preset_model)
    with gr.Row():
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
    status = gr.Markdown(elem_id="generate_status")
    gallery = gr.Gallery(label="Images", elem_id="gallery", columns=4)
    command = gr.Textbox(label="The same as CLI command(s) (copy to run it in a terminal)", elem_id="command",
                         interactive=False, buttons=["copy"])
    stop = threading.Event()

    def on_generate(*args, progress=gr.Progress(track_tqdm=True)):  # the sampler's tqdm bar, with step counts
        stop.clear()
        try:
            yield from generate(workspace, dict(zip(GENERATE_FIELDS, args)), stop)
        except BoothkitError as error:
            raise gr.Error(str(error)) from None

    button.click(on_generate, inputs=inputs, outputs=[gallery, command, status], api_name="generate")
    stop_button.click(stop.set, api_name="stop")


def _generate_inputs(gr, preset_model: str | None) -> list:
    with gr.Row():
        model = gr.Textbox(label="Model (folder under the root, or hub id)", elem_id="model", value=preset_model or "")
        lora = gr.Textbox(label="Subject LoRA (folder or file under the root; empty: none)", elem_id="lora")
        lora_scale = gr.Number(label="Subject LoRA weight", value=1.0, elem_id="lora_scale")
    with gr.Row():
        extra_loras = gr.Textbox(label="Other LoRAs (one PATH:WEIGHT a line, e.g. a style at 0.8)", lines=2,
                                 elem_id="extra_loras")
        weak = gr.Textbox(label="Weak checkpoint (empty: the subject LoRA's weak/)", elem_id="weak")
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
    return [model, lora, lora_scale, extra_loras, weak, method, guidance_scale, omega, prompt, negative, steps,
            height, width, scheduler, seed, random_seed, num_images, compare]
