"""Test helpers: tiny, offline, deterministic model folders (see `boothkit.testing.tiny`)."""
