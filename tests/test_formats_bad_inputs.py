"""Bad inputs to `boothkit export`, `info`, `merge` and `sample --lora`: one `error:` line, nothing written or replaced."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from boothkit.cli import main as cli_main
from boothkit.layout import LORA_WEIGHT_NAME
from tests.test_train import assert_one_line_error


@pytest.fixture(scope="module")
def files(sd15, sd15_lora, tmp_path_factory) -> dict[str, Path]:
    """Broken and foreign files beside a good LoRA (`lora`) and its kohya export (`kohya`)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    lora = sd15_lora / LORA_WEIGHT_NAME
    tensors = load_file(lora)
    with safe_open(str(lora), framework="pt") as handle:
        metadata = handle.metadata()
    data = lora.read_bytes()
    paths = {name: root / f"{name}.safetensors" for name in
             ("empty", "truncated", "png", "unet", "nan", "inf", "kohya", "down_only", "alpha_nan", "no_base", "sd2",
              "user")}
    paths["empty"].write_bytes(b"")
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    shutil.copy(sd15 / "unet" / "diffusion_pytorch_model.safetensors", paths["unet"])
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        broken = {key: value_.clone() for key, value_ in tensors.items()}
        next(iter(broken.values()))[0, 0] = value
        save_file(broken, paths[name], metadata=metadata)
    save_file(tensors, paths["no_base"])  # no metadata: nothing says which model it is for
    save_file(tensors, paths["sd2"], metadata={**metadata, "ss_base_model_version": "sd_v2"})  # says: SD 2.x
    paths["user"].write_text("the user's own file\n")
    assert cli_main(["export", str(sd15_lora), "--format", "kohya", "--output", str(paths["kohya"])]) == 0
    kohya = load_file(paths["kohya"])
    with safe_open(str(paths["kohya"]), framework="pt") as handle:
        kohya_metadata = handle.metadata()
    up = next(key for key in kohya if key.endswith(".lora_up.weight"))
    save_file({key: value for key, value in kohya.items() if key != up}, paths["down_only"], metadata=kohya_metadata)
    alpha = next(key for key in kohya if key.endswith(".alpha"))
    save_file({**kohya, alpha: torch.tensor(float("nan"), dtype=kohya[alpha].dtype)}, paths["alpha_nan"],
              metadata=kohya_metadata)
    (root / "no_lora").mkdir()
    (root / "folder.safetensors").mkdir()
    (root / "user_dir").mkdir()
    (root / "user_dir" / "notes.txt").write_text("mine\n")
    return {**paths, "lora": sd15_lora, "root": root, "sd15": sd15}


NOT_SAFETENSORS = "not a valid .safetensors file"
BROKEN = "holds NaN or inf values"
CASES = {
    "export: missing source": (["export", "{root}/nope.safetensors", "--output", "{out}"], "not found"),
    "export: folder without a LoRA": (["export", "{root}/no_lora", "--output", "{out}"], "not found"),
    "export: empty file": (["export", "{empty}", "--output", "{out}"], NOT_SAFETENSORS),
    "export: truncated file": (["export", "{truncated}", "--output", "{out}"], NOT_SAFETENSORS),
    "export: a PNG named .safetensors": (["export", "{png}", "--output", "{out}"], NOT_SAFETENSORS),
    "export: UNet weights, no LoRA": (["export", "{unet}", "--output", "{out}"], "neither a diffusers/PEFT nor a kohya"),
    "export: NaN in a matrix": (["export", "{nan}", "--output", "{out}"], BROKEN),
    "export: inf in a matrix, diffusers": (["export", "{inf}", "--format", "diffusers", "--output", "{out}"], BROKEN),
    "export: kohya alpha NaN, diffusers": (["export", "{alpha_nan}", "--format", "diffusers", "--output", "{out}",
                                            "--pretrained_model_name_or_path", "{sd15}"], BROKEN),
    "export: kohya down without up": (["export", "{down_only}", "--output", "{out}"], "lacks its up matrix"),
    "export: --output a folder": (["export", "{lora}", "--output", "{root}/folder.safetensors"], "is a folder"),
    "export: --output .ckpt": (["export", "{lora}", "--output", "{root}/x.ckpt"], "must be a .safetensors"),
    "export: --output the source": (["export", "{kohya}", "--output", "{kohya}", "--overwrite"], "being read"),
    "export: --output a user's file": (["export", "{lora}", "--output", "{user}", "--overwrite"], "did not write it"),
    "info: empty file": (["info", "{empty}"], NOT_SAFETENSORS),
    "info: UNet weights": (["info", "{unet}"], "neither a diffusers/PEFT nor a kohya"),
    "info: kohya down without up": (["info", "{down_only}"], "lacks its up matrix"),
    "merge: no LoRA": (["merge", "--output", "{out}"], "required"),
    "merge: weight nan": (["merge", "{lora}:nan", "--output", "{out}"], "finite"),
    "merge: weight 1e999": (["merge", "{lora}:1e999", "--output", "{out}"], "finite"),
    "merge: weight abc": (["merge", "{lora}:abc", "--output", "{out}"], "is not a number"),
    "merge: another base model": (["merge", "{lora}", "{sd2}", "--output", "{out}"], "is for SD 2.x"),
    "merge: svd --rank 0": (["merge", "{lora}", "--method", "svd", "--rank", "0", "--output", "{out}"], "--rank"),
    "merge: svd --rank -2": (["merge", "{lora}", "--method", "svd", "--rank", "-2", "--output", "{out}"], "--rank"),
    "merge: a NaN LoRA": (["merge", "{lora}", "{nan}", "--output", "{out}"], BROKEN),
    "merge: a NaN LoRA into the base": (["merge", "{lora}", "{nan}", "--into_base", "--output", "{root}/fused"],
                                        BROKEN),
    "merge: into a user's folder": (["merge", "{lora}", "--into_base", "--output", "{root}/user_dir"],
                                    "not written by boothkit"),
    "merge: no base model known": (["merge", "{no_base}", "--into_base", "--output", "{root}/fused"],
                                   "cannot tell which model"),
    "merge: --output an input": (["merge", "{lora}:0.5", "{kohya}", "--output", "{kohya}", "--overwrite"],
                                 "being read"),
    "sample: a NaN LoRA": (["sample", "--pretrained_model_name_or_path", "{sd15}", "--lora", "{nan}", "--prompt", "x",
                            "--num_inference_steps", "1", "--method", "none", "--output_dir", "{root}/samples"], BROKEN),
    "sample: a kohya alpha NaN": (["sample", "--pretrained_model_name_or_path", "{sd15}", "--lora", "{alpha_nan}",
                                   "--prompt", "x", "--num_inference_steps", "1", "--method", "none", "--output_dir",
                                   "{root}/samples"], BROKEN),
}


def _digests(root: Path) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, files, run_cli):
    args, fragment = CASES[case]
    out = files["root"] / "out.safetensors"
    names = {key: str(value) for key, value in files.items()} | {"out": str(out)}
    before = _digests(files["root"])
    result = run_cli(*[arg.format(**names) for arg in args])
    assert result.code == 2
    assert_one_line_error(result, fragment)
    assert _digests(files["root"]) == before  # nothing written, nothing replaced
    assert not (files["root"] / "fused").exists()


def test_info_flags_a_broken_lora(files, run_cli):
    result = run_cli("info", files["alpha_nan"])
    assert result.code == 0, result.err
    assert "broken: 1 layer(s) hold NaN or inf values" in result.out


def test_unwritable_output_is_one_line(files, run_cli, monkeypatch):
    """safetensors reports a read-only folder or a full disk as its own error, not as an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def refuse(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    assert_one_line_error(run_cli("export", files["lora"], "--output", files["root"] / "ro.safetensors"),
                          "cannot write", "Permission denied")


def test_merges_that_must_work(files, tmp_path, run_cli):
    """Different ranks on the same layers, layers only one LoRA has, a path with a space and a colon."""
    rank2 = tmp_path / "rank2.safetensors"
    assert run_cli("merge", files["lora"], "--method", "svd", "--rank", "2", "--output", rank2).code == 0
    unet_only = tmp_path / "my dir" / "unet:only.safetensors"
    unet_only.parent.mkdir()
    tensors = load_file(rank2)
    with safe_open(str(rank2), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({key: value for key, value in tensors.items() if key.startswith("unet.")}, unet_only, metadata=metadata)
    result = run_cli("merge", f"{files['lora']}:0.5", f"{unet_only}:0.5", "--output", tmp_path / "merged.safetensors")
    assert result.code == 0, result.err
    assert "merged 2 LoRAs" in result.out
    too_large = run_cli("merge", files["lora"], rank2, "--method", "svd", "--rank", "100000",
                        "--output", tmp_path / "svd.safetensors")
    assert too_large.code == 0, too_large.err
