"""Tuning the guidance scale: golden-section search over an expensive, deterministic (common random numbers) score."""

from boothkit.tune.golden import GOLDEN_RATIO, SearchResult, golden_section_evaluations, golden_section_search

__all__ = ["GOLDEN_RATIO", "SearchResult", "golden_section_evaluations", "golden_section_search"]
