"""The `boothkit ui` page (Gradio 6): the tabs (`ui.generate`, `ui.train`, `ui.results`) and the `Workspace`,
the one folder (`--root`) the page may read and write: every path typed on the page must lie inside it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from boothkit.errors import BoothkitError
from boothkit.ui.config import UiConfig

log = logging.getLogger(__name__)


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

    def new_output_folder(self, prefix: str = "") -> Path:
        """A new (not yet existing) folder under the page's output folder, named by the time."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for index in range(1000):
            folder = self.outputs / f"{prefix}{stamp}-{index:03d}"
            if not folder.exists():
                return folder
        raise BoothkitError(f"no free output folder name under '{self.outputs}'")


def build_app(config: UiConfig):
    """The Gradio Blocks of the page: the Generate, Train and Results tabs."""
    gr = require_gradio()
    from boothkit.ui.generate import generate_tab
    from boothkit.ui.results import results_tab
    from boothkit.ui.train import train_tab

    workspace = Workspace(config)
    with gr.Blocks(title="boothkit") as app:
        gr.Markdown("# boothkit")
        with gr.Tab("Generate"):
            generate_tab(gr, workspace, config.pretrained_model_name_or_path)
        with gr.Tab("Train"):
            train_tab(gr, workspace, config.pretrained_model_name_or_path)
        with gr.Tab("Results"):
            results_tab(gr, workspace)
    return app


def run_ui(config: UiConfig) -> int:
    """Launch the page and serve until interrupted."""
    app = build_app(config)
    if config.host != "127.0.0.1":
        log.warning("binding %s: anyone who can reach this machine's port %d can use the page", config.host,
                    config.port)
    if config.share:
        log.warning("--share publishes the page on a public gradio.live address")
    app.launch(server_name=config.host, server_port=config.port or None, share=config.share, ssr_mode=False,
               allowed_paths=[str(Workspace(config).root)])
    return 0
