"""File formats boothkit reads and writes beside the ecosystem's own (metadata inside LoRA files)."""

from boothkit.formats.metadata import PROMPT_ENCODING_KEY, read_prompt_encoding, write_prompt_encoding

__all__ = ["PROMPT_ENCODING_KEY", "read_prompt_encoding", "write_prompt_encoding"]
