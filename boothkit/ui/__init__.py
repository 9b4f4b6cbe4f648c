"""`boothkit ui`: a local Gradio page that calls the same functions as the CLI (no logic the CLI lacks)."""
