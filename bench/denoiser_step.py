"""What could make the denoiser's own training step faster: one LoRA training step of the bench UNet under
variants of precision, memory format, attention kernel and compilation, each against the plain fp32 step.

The step is what both trainers share (`bench/profile_train.py`): UNet forward on a batch of one noisy latent,
MSE loss, backward into rank-4 LoRA weights on to_q/to_k/to_v/to_out.0, AdamW step. Variants:

- `channels_last`: UNet and latents in channels-last memory format;
- `bf16_autocast`: `torch.autocast("cpu", torch.bfloat16)` around the forward (what `--mixed_precision bf16`
  does on a CPU);
- `onednn_bf16`: fp32 tensors, oneDNN allowed to compute fp32 matmuls and convolutions in bf16
  (`torch.backends.mkldnn.fp32_precision = "bf16"`, the CPU's counterpart of TF32);
- `sdpa_math`: the math attention kernel instead of the CPU flash kernel;
- `compile`: `torch.compile` of the UNet (Inductor; its compile time is printed apart: not in ms/step).

Each variant runs in its own child process (the settings are process-wide), the plain step in another, in
interleaved rounds; a child times `--steps` steps after `--warmup` and reports the median. Printed per variant:
its ms/step, its speed-up over the plain step in the same round and its peak RSS over the plain step's (the
UNet loaded as the trainers load it: safetensors weights memory-mapped), as medians with 95 % bootstrap
intervals.

    python bench/denoiser_step.py [--variants channels_last bf16_autocast onednn_bf16 sdpa_math compile]
                                  [--resolution 128] [--rounds 5] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_runs import ratio_line  # noqa: E402

VARIANTS = ("channels_last", "bf16_autocast", "onednn_bf16", "sdpa_math", "compile")


def child(variant: str, model: Path, resolution: int, steps: int, warmup: int) -> dict:
    """ms per step (median of `steps` after `warmup`) of one variant; with compile, the first step's seconds; the
    process's peak RSS (GB)."""
    import resource

    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from boothkit.train.lora import attach_lora

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    attach_lora(unet, ("to_k", "to_q", "to_v", "to_out.0"), rank=4, alpha=4, seed=0)
    unet.train()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, resolution // 8, resolution // 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    if variant == "channels_last":
        unet, latents = unet.to(memory_format=torch.channels_last), latents.contiguous(memory_format=torch.channels_last)
    if variant == "onednn_bf16":
        torch.backends.mkldnn.fp32_precision = "bf16"
    forward = torch.compile(unet) if variant == "compile" else unet
    around = {"bf16_autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
              "sdpa_math": lambda: sdpa_kernel(SDPBackend.MATH)}.get(variant, contextlib.nullcontext)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        with around():
            prediction = forward(latents, torch.tensor([500]), context).sample
        torch.nn.functional.mse_loss(prediction.float(), latents.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times[warmup:]), "first_s": times[0],
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def run_child(variant: str, args, model: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads)) if args.threads \
        else dict(os.environ)
    command = [sys.executable, __file__, "--child", variant, "--model", str(model), "--resolution",
               str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=[v for v in VARIANTS if v != "compile"])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return print(json.dumps(child(args.child, args.model, args.resolution, args.steps, args.warmup)))
    from boothkit.testing.tiny import build_sd_bench

    with tempfile.TemporaryDirectory(prefix="boothkit-denoiser-bench-") as work:
        model = build_sd_bench(Path(work) / "model")
        rounds = []
        for index in range(args.rounds):  # the plain step and every variant once per round, order rotating
            names = ["plain", *args.variants]
            names = names[index % len(names):] + names[:index % len(names)]
            rounds.append({name: run_child(name, args, model) for name in names})
    print(f"sd bench UNet, LoRA rank 4, {args.resolution} px, batch 1, {args.threads or 'default'} thread(s), "
          f"{args.rounds} rounds of {args.steps} steps")
    print(f"plain fp32 step: {statistics.median(r['plain']['ms'] for r in rounds):.1f} ms, peak RSS "
          f"{statistics.median(r['plain']['rss_gb'] for r in rounds):.3f} GB")
    for variant in args.variants:
        speedups = [r["plain"]["ms"] / r[variant]["ms"] for r in rounds]
        first = statistics.median(r[variant]["first_s"] for r in rounds)
        memory = [r[variant]["rss_gb"] / r["plain"]["rss_gb"] for r in rounds]
        print(f"{variant}: {statistics.median(r[variant]['ms'] for r in rounds):.1f} ms/step, first step {first:.1f} s; "
              + ratio_line("speed-up over plain", speedups) + "; " + ratio_line("peak RSS over plain", memory))


if __name__ == "__main__":
    main()
