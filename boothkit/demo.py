"""`make demo`: the whole job on the embedded sample subject with a tiny offline model.

Builds a tiny random SD-1.5-shaped pipeline, trains a DreamBooth LoRA (with prior preservation and a
weak checkpoint) on the 5 sample dog photos, samples it with CFG, CFG + AutoGuidance and WIG, evaluates
each method with tiny DINO / CLIP scorers (a short golden-section search on λ; ω swept for WIG), and prints
where everything is. Takes about a minute on
2 CPU cores. The images a tiny random model draws are noise-like: the demo shows the workflow and files.
"""

from __future__ import annotations

import os
import sys
from importlib.resources import files
from pathlib import Path

from boothkit import layout
from boothkit.cli import main as cli_main
from boothkit.data.images import sample_subject_class, sample_subject_dir
from boothkit.testing.tiny import build_tiny

DEMO_DIR = Path("demo_output")
SAMPLE_METHODS = ("cfg", "ag", "wig")


def run_demo(root: Path = DEMO_DIR) -> int:
    # As the CLI does before any library is imported: the libraries' own load reports stay quiet.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    model = root / "models" / "tiny-sd15"
    if not (model / "model_index.json").is_file():
        build_tiny("sd15", model, seed=0)
    subject = sample_subject_class()
    lora_dir = root / "lora" / subject
    code = cli_main([
        "train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(sample_subject_dir()),
        "--instance_prompt", f"a photo of sks {subject}", "--with_prior_preservation",
        "--class_prompt", f"a photo of {subject}", "--class_data_dir", str(root / "class_images" / subject),
        "--num_class_images", "10", "--output_dir", str(lora_dir), "--max_train_steps", "200",
        "--learning_rate", "1e-3", "--checkpointing_steps", "100", "--validation_prompt",
        f"a sks {subject} in the snow", "--num_validation_images", "2", "--validation_steps", "100",
        "--random_flip", "--overwrite",
    ])
    if code != 0:
        return code
    for method in SAMPLE_METHODS:
        code = cli_main([
            "sample", "--pretrained_model_name_or_path", str(model), "--lora_dir", str(lora_dir),
            "--method", method, "--prompt", f"a sks {subject} in the snow", "--prompt", f"a sks {subject} on the beach",
            "--num_images_per_prompt", "2", "--num_inference_steps", "25", "--omega", "0.3",
            "--output_dir", str(root / "samples" / method),
            "--overwrite",
        ])
        if code != 0:
            return code
    code = evaluate_demo(root, model)
    if code != 0:
        return code
    print("\ndemo finished:")
    print(f"  tiny base model:          {model}")
    print(f"  fine LoRA:                {layout.lora_file(lora_dir)}")
    print(f"  weak LoRA (autoguidance): {layout.lora_file(layout.weak_dir(lora_dir))}")
    print(f"  loss log / config:        {lora_dir / layout.TRAIN_LOG_NAME}, {lora_dir / layout.TRAIN_CONFIG_NAME}")
    print(f"  validation images:        {lora_dir / layout.VALIDATION_DIR}")
    print(f"  class images:             {root / 'class_images' / subject}")
    print(f"  guided samples:           {', '.join(str(root / 'samples' / m) for m in SAMPLE_METHODS)}")
    print(f"  evaluation (all methods): {root / 'evaluation' / 'report.html'}")
    return 0


def evaluate_demo(root: Path, model: Path) -> int:
    """Score the demo subject with each method into one folder (one report compares them); the search is short
    because the model is tiny and random."""
    scorers = {kind: root / "models" / f"tiny-{kind}" for kind in ("dino", "clip")}
    for kind, folder in scorers.items():
        if not (folder / "config.json").is_file():
            build_tiny(kind, folder, seed=0)
    prompts = files("boothkit") / "assets" / "prompts_and_classes.txt"
    for method in SAMPLE_METHODS:
        search = ["--optimize", "both", "--omega_grid", "0.0", "0.5", "1.0"] if method == "wig" else ["--optimize"]
        # The first method starts the folder afresh (the LoRA was just retrained); the others add to it.
        fresh = ["--overwrite"] if method == SAMPLE_METHODS[0] else []
        code = cli_main([
            "evaluate", "--pretrained_model_name_or_path", str(model), "--lora_base_dir", str(root / "lora"),
            "--instance_data_dir", str(sample_subject_dir().parent), "--evaluation_prompts_path", str(prompts),
            "--output_dir", str(root / "evaluation"), "--method", method, "--max_prompts", "3",
            "--num_inference_steps", "10", "--tolerance", "2", "--max_evaluations", "6", "--cfg_scale", "7.5",
            "--dino_model", str(scorers["dino"]), "--clip_model", str(scorers["clip"]), *search, *fresh,
        ])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
