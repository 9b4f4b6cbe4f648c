"""Evaluation of personalized models: DreamBooth metrics (DINO, CLIP-I, CLIP-T) and the commands that use them.

`boothkit.evaluate.metrics` computes the metrics, `boothkit.evaluate.score` is ``boothkit score`` (score a
folder of generated images against a folder of reference photos).
"""
