"""Training data: reading users' photos robustly and turning them into training tensors.

`boothkit.data.images` lists and decodes the photos of a subject (any common format and colour
mode, EXIF orientation applied, transparency composited over white), resizes and crops them the
way the diffusers DreamBooth examples do, and converts them to tensors in [-1, 1]. It also gives
access to the small sample subject shipped with the package (`sample_subject_dir()`).
"""
