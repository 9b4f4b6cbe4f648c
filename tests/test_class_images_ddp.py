"""Training under a distributed launcher (torchrun, as `accelerate launch` uses; CPU/gloo): class images split
across processes are each generated exactly once even when one process is slow, and two processes train
the LoRA that one process trains with twice the batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

import boothkit

from test_train import assert_same_weights, train_args, trained_weights

CLASS_IMAGES = 4

# Run by torchrun in place of `-m boothkit`. Only here, in the test: rank 1 lists the class folder only once
# rank 0 has written a class image (the race of a slow rank, made certain), and every process records the
# class images it generates.
HOOKED_CLI = """
import json, os, sys, time
from pathlib import Path

import boothkit.train.class_images as class_images

listing, generating = class_images.existing_class_images, class_images.generate_class_images
rank = os.environ["RANK"]

def slow_listing(folder):
    deadline = time.time() + 20
    while rank == "1" and time.time() < deadline and not list(Path(folder).glob("class_*.png")):
        time.sleep(0.05)
    return listing(folder)

def recorded_generation(family, folder, prompt, indices, *args, **kwargs):
    log = Path(os.environ["GENERATION_LOG"]) / f"rank{rank}.json"
    done = json.loads(log.read_text()) if log.exists() else []
    log.write_text(json.dumps(done + list(indices)))
    return generating(family, folder, prompt, indices, *args, **kwargs)

class_images.existing_class_images = slow_listing
class_images.generate_class_images = recorded_generation
from boothkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_generate_each_class_image_once_and_train_like_one(sd15, instance_dir, tmp_path, run_cli):
    """Ranks take interleaved samples, gradients are averaged (DDP for the denoiser, an all-reduce for the text
    encoder), class images are split across ranks, and --overwrite is done once."""
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", CLASS_IMAGES,
             "--sample_batch_size", 1]
    single = trained_weights(run_cli, sd15, instance_dir, tmp_path / "single", "--train_batch_size", 2,
                             *prior, "--class_data_dir", tmp_path / "class_single")
    out = tmp_path / "ddp"
    assert run_cli(*train_args(sd15, instance_dir, out, "--max_train_steps", 3, "--checkpointing_steps", 1)).code == 0
    script, generation_log = tmp_path / "hooked_cli.py", tmp_path / "generated"
    script.write_text(HOOKED_CLI)
    generation_log.mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
               *map(str, train_args(sd15, instance_dir, out, "--max_train_steps", 4, "--learning_rate", 1e-3,
                                    "--train_text_encoder", "--train_batch_size", 1, "--overwrite", *prior,
                                    "--class_data_dir", tmp_path / "class_ddp"))]
    source = str(Path(boothkit.__file__).parents[1])  # the processes run the boothkit this test imports
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", GENERATION_LOG=str(generation_log),
               PYTHONPATH=os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-2000:]

    expected = [f"class_{index:05d}.png" for index in range(CLASS_IMAGES)]
    generated = [json.loads((generation_log / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(generated[0] + generated[1]) == list(range(CLASS_IMAGES))  # each image by exactly one rank
    assert generated[0] and generated[1]  # and the work was split
    assert sorted(p.name for p in (tmp_path / "class_ddp").iterdir()) == expected
    for name in expected:
        assert (tmp_path / "class_ddp" / name).read_bytes() == (tmp_path / "class_single" / name).read_bytes()

    assert completed.stdout.count("LoRA:") == 1  # only the main process reports
    assert json.loads((out / "train_config.json").read_text())["resolved"]["num_processes"] == 2
    assert not list(out.glob("checkpoint-*"))  # the earlier run's checkpoints were removed, once
    assert_same_weights(single, load_file(out / "pytorch_lora_weights.safetensors"))
