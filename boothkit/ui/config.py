"""Options of `boothkit ui` (light: no gradio or torch import)."""

from __future__ import annotations

from pydantic import Field

from boothkit.config import CommandConfig


class UiConfig(CommandConfig):
    root: str = Field(".", description="The folder the page may read and write (models, LoRAs, photos, outputs); "
                                       "paths typed on the page must lie inside it.")
    output_dir: str | None = Field(None, description="Where generated images go (default: ROOT/ui_outputs).")
    pretrained_model_name_or_path: str | None = Field(None, description="The model preset in the Generate tab.")
    host: str = Field("127.0.0.1", description="Address to bind; anything but 127.0.0.1 exposes the page to "
                                               "your network (a warning is printed).")
    port: int = Field(7860, ge=0, le=65535, description="Port (0: any free one).")
    share: bool = Field(False, description="Also publish a public gradio.live link (a warning is printed).")
