"""boothkit.layout: the manifest, other ranks' side manifests, the lock and what --overwrite may remove."""

from __future__ import annotations

import json

import pytest

from boothkit.errors import BoothkitError
from boothkit.io import write_text_atomic
from boothkit.layout import (LOCK_NAME, MANIFEST_NAME, TMP_PREFIX, OutputFolder, RankClaims, check_output_folder,
                             read_manifest)


def test_other_ranks_claims_survive_a_killed_run_and_overwrite_removes_them(tmp_path):
    root = tmp_path / "eval"
    with OutputFolder(root, "evaluate") as folder:
        write_text_atomic(folder.path("results.json"), "{}")
        rank1 = RankClaims(root, 1)
        write_text_atomic(rank1.claim("cache/dog/abc/scores.json")[0], "{}")
        (root / "cache" / "dog" / "abc" / "mine.txt").write_text("the user's")
        with pytest.raises(BoothkitError, match="will not replace"):
            rank1.claim("cache/dog/abc/mine.txt")
    # The run was killed before its main process adopted rank 1's files: they are still boothkit's.
    assert "cache/dog/abc/scores.json" in read_manifest(root)["files"]
    check_output_folder(root, "evaluate", overwrite=False, reuse=True)
    with OutputFolder(root, "evaluate") as folder:
        assert folder.owns("cache/dog/abc/scores.json")
        assert not list(root.glob(".boothkit-manifest.rank*"))  # folded into the manifest
        folder.clear()
    assert not (root / "cache" / "dog" / "abc" / "scores.json").exists()
    assert (root / "cache" / "dog" / "abc" / "mine.txt").read_text() == "the user's"


def test_overwrite_leaves_staging_files_of_nested_runs_alone(tmp_path):
    root = tmp_path / "runs"
    with OutputFolder(root, "evaluate") as folder:
        write_text_atomic(folder.path("summary.csv"), "x")
    (root / f"{TMP_PREFIX}summary.csv.dead").write_text("left by a killed run")
    nested = root / "dog"  # another command's output folder, writing right now
    with OutputFolder(nested, "train"):
        (nested / f"{TMP_PREFIX}checkpoint-4.1234").mkdir()
        with OutputFolder(root, "evaluate") as folder:
            folder.clear()
        assert (nested / f"{TMP_PREFIX}checkpoint-4.1234").is_dir()
        assert (nested / LOCK_NAME).exists() and (nested / MANIFEST_NAME).exists()
    assert not (root / f"{TMP_PREFIX}summary.csv.dead").exists()


def test_the_lock_is_released_when_entering_fails(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    (root / MANIFEST_NAME).write_text(json.dumps({"command": "train", "files": []}))
    with pytest.raises(BoothkitError, match="boothkit train"):
        OutputFolder(root, "sample").__enter__()
    assert not (root / LOCK_NAME).exists()
    with OutputFolder(root, "train"):
        pass


def test_check_writable_refuses_a_users_file_before_anything_is_removed(tmp_path):
    root = tmp_path / "model"
    with OutputFolder(root, "tiny") as folder:
        write_text_atomic(folder.path("config.json"), "{}")
    (root / "weights.bin").write_text("the user's")
    with OutputFolder(root, "tiny") as folder:
        with pytest.raises(BoothkitError, match="weights.bin"):
            folder.check_writable("config.json", "weights.bin")
        assert (root / "config.json").exists()


def test_a_run_that_writes_nothing_leaves_no_manifest_in_a_users_folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "dog.jpg").write_bytes(b"the user's photo")
    with pytest.raises(BoothkitError):
        with OutputFolder(root, "train") as folder:
            folder.claim("dog.jpg")
    assert sorted(p.name for p in root.iterdir()) == ["dog.jpg"]
