"""boothkit: DreamBooth personalization of text-to-image diffusion models.

Train a LoRA from a few photos of a subject, sample it with personalization-aware guidance
(CFG, CFG + AutoGuidance, weight-interpolation guidance), and score it with DINO / CLIP metrics.
"""

__version__ = "0.1.0"
