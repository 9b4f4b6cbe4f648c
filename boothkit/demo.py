"""`make demo`: the whole job on the embedded sample subject with a tiny offline model.

Builds a tiny random SD-1.5-shaped pipeline, trains a DreamBooth LoRA (with prior preservation and a
weak checkpoint) on the 5 sample dog photos, samples it with CFG, CFG + AutoGuidance and WIG, and prints
where everything is. Takes about a minute on
2 CPU cores. The images a tiny random model draws are noise-like: the demo shows the workflow and files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from boothkit.cli import main as cli_main
from boothkit.data.images import sample_subject_class, sample_subject_dir
from boothkit.testing.tiny import build_tiny

DEMO_DIR = Path("demo_output")
SAMPLE_METHODS = ("cfg", "ag", "wig")


def run_demo(root: Path = DEMO_DIR) -> int:
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
            "--guidance_scale", "2.0" if method == "ag" else "7.5", "--output_dir", str(root / "samples" / method),
            "--overwrite",
        ])
        if code != 0:
            return code
    print("\ndemo finished:")
    print(f"  tiny base model:          {model}")
    print(f"  fine LoRA:                {lora_dir / 'pytorch_lora_weights.safetensors'}")
    print(f"  weak LoRA (autoguidance): {lora_dir / 'weak' / 'pytorch_lora_weights.safetensors'}")
    print(f"  loss log / config:        {lora_dir / 'train_log.csv'}, {lora_dir / 'train_config.json'}")
    print(f"  validation images:        {lora_dir / 'validation'}")
    print(f"  class images:             {root / 'class_images' / subject}")
    print(f"  guided samples:           {', '.join(str(root / 'samples' / m) for m in SAMPLE_METHODS)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
