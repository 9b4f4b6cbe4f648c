"""Content identity: digests follow the bytes, whatever happens to names, sizes and dates."""

from __future__ import annotations

import hashlib
import os

import pytest

from boothkit import identity


@pytest.fixture
def fresh_memo(monkeypatch, tmp_path):
    monkeypatch.setenv("BOOTHKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(identity, "_memo", None)


def test_digest_is_sha256_of_the_bytes(tmp_path, fresh_memo):
    file = tmp_path / "a.bin"
    file.write_bytes(b"hello boothkit")
    assert identity.file_digest(file) == hashlib.sha256(b"hello boothkit").hexdigest()


def test_same_size_and_mtime_but_other_bytes_is_another_digest(tmp_path, fresh_memo):
    file = tmp_path / "photo.png"
    file.write_bytes(b"A" * 100)
    before, stat = identity.file_digest(file), file.stat()
    file.write_bytes(b"B" * 100)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as before
    assert identity.file_digest(file) == hashlib.sha256(b"B" * 100).hexdigest() != before


def test_the_memo_survives_the_process_and_answers_without_reading(tmp_path, fresh_memo, monkeypatch):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x" * 4096)
    expected = identity.file_digest(file)
    monkeypatch.setattr(identity, "_memo", None)  # as a new process

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(identity, "open", no_reading, raising=False)
    assert identity.file_digest(file) == expected
    monkeypatch.undo()


def test_folder_digest_sees_names_and_contents_not_hidden_files(tmp_path, fresh_memo):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "model_index.json").write_text("{}")
    first = identity.folder_digest(folder)
    (folder / ".boothkit.lock").write_text("pid")
    assert identity.folder_digest(folder) == first
    (folder / "unet" / "config.json").rename(folder / "unet" / "config2.json")
    assert identity.folder_digest(folder) != first
    assert identity.model_identity(str(folder))["local"] == identity.folder_digest(folder)
