"""recipe/storage.py and the artefact paths: verified, atomic, locked folders."""
import json
import multiprocessing
import os
from pathlib import Path

import filelock
import numpy as np
import pytest
import torch

from recipe.artifacts import RECIPE, ArtifactError, read_artifact, resolve_checkpoint
from recipe.config import repo_root
from recipe.retrieval import KnowledgeRepository
from recipe.storage import (MANIFEST_FILE, FolderBusyError, FolderCorruptError, FolderNotFoundError, StorageError,
                            open_folder, save_folder, verify_folder)

FORMAT = {"format_name": "test.folder", "versions": (1,)}


def _save(target, payload: str, version: int = 1) -> Path:
    def write_into(work: Path) -> None:
        (work / "data.json").write_text(json.dumps({"payload": payload}))
        (work / "sub").mkdir()
        (work / "sub" / "blob.bin").write_bytes(payload.encode() * 100)

    return save_folder(target, write_into, format_name="test.folder", format_version=version)


def _read(target) -> str:
    with open_folder(target, **FORMAT) as folder:
        payload = json.loads(folder.file("data.json").read_text())["payload"]
        assert folder.file("sub/blob.bin").read_bytes() == payload.encode() * 100
    return payload


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_round_trip_and_manifest_lists_every_file(tmp_path):
    path = _save(tmp_path / "f", "one")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["format"] == "test.folder" and manifest["format_version"] == 1
    assert sorted(manifest["files"]) == ["data.json", "sub/blob.bin"]
    assert _read(path) == "one"
    _save(path, "two")
    assert _read(path) == "two" and _listing(tmp_path) == ["f"]


@pytest.mark.parametrize("name", ["data.json", "sub/blob.bin"])
def test_a_flipped_byte_is_an_error_naming_the_file(tmp_path, name):
    path = _save(tmp_path / "f", "one")
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(FolderCorruptError, match=f"{name}: sha256"):
        verify_folder(path, **FORMAT)


def test_missing_file_wrong_format_version_and_escaping_names_are_refused(tmp_path):
    with pytest.raises(FolderNotFoundError, match="no saved folder"):
        verify_folder(tmp_path / "nothing", **FORMAT)
    path = _save(tmp_path / "f", "one")
    with pytest.raises(FolderCorruptError, match="version 1"):
        verify_folder(path, format_name="test.folder", versions=(2,))
    with pytest.raises(FolderCorruptError, match="'test.folder', expected 'other'"):
        verify_folder(path, format_name="other", versions=(1,))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "files": {"../outside": {"sha256": "0" * 64}}}))
    with pytest.raises(FolderCorruptError, match="outside the folder"):
        verify_folder(path, **FORMAT)
    (path / "sub" / "blob.bin").unlink()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FolderCorruptError, match="blob.bin is missing"):
        verify_folder(path, **FORMAT)


def test_a_failed_write_keeps_the_old_folder_and_a_foreign_folder_is_never_replaced(tmp_path):
    path = _save(tmp_path / "f", "one")

    def dies(work: Path) -> None:
        (work / "data.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_folder(path, dies, format_name="test.folder", format_version=1)
    assert _read(path) == "one" and _listing(tmp_path) == ["f"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StorageError, match="refusing to replace"):
        _save(tmp_path / "mine", "x")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("then", ["save", "load"])
def test_leftovers_of_a_killed_save_are_cleaned_up(tmp_path, then):
    path = _save(tmp_path / "f", "one")
    leftover = tmp_path / ".f.tmp-0123abcd"  # what a save killed while writing leaves
    leftover.mkdir()
    (leftover / "data.json").write_text("half")
    os.rename(path, tmp_path / ".f.old")  # killed between moving the old copy away and renaming the new one in
    if then == "save":
        _save(path, "two")
        assert _read(path) == "two"
    else:
        assert _read(path) == "one"
    assert _listing(tmp_path) == ["f"]


def test_a_held_lock_gives_a_clear_busy_error(tmp_path):
    path = _save(tmp_path / "f", "one")
    with filelock.FileLock(tmp_path / ".f.lock"):  # another holder of the folder
        with pytest.raises(FolderBusyError, match="held by another process"):
            save_folder(path, lambda work: None, format_name="test.folder", format_version=1, timeout=0.2)
        with pytest.raises(FolderBusyError):
            with open_folder(path, **FORMAT, timeout=0.2):
                pass
    assert _read(path) == "one"


def _save_repeatedly(target: str, worker: int, n: int) -> list[str]:
    """Save a small repository ``n`` times, loading it between saves; returns the errors seen."""
    errors = []
    for i in range(n):
        repo = KnowledgeRepository(8, (2, 4), info={"worker": worker, "round": i})
        repo.add(torch.full((3, 8), float(worker + 1)), torch.full((3, 2, 4), float(i)))
        try:
            repo.save(target)
            loaded = KnowledgeRepository.load(target)
            assert loaded.ids() == [0, 1, 2] and np.isfinite(loaded.keys()).all()
        except Exception as exc:  # noqa: BLE001 - the test reports every failure, clear or not
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


def test_two_processes_saving_one_folder_never_corrupt_it(tmp_path):
    target = str(tmp_path / "shared")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_save_repeatedly, [(target, 0, 20), (target, 1, 20)])
    assert results == [[], []]  # every save and load succeeded: the lock serialises them
    final = KnowledgeRepository.load(target)
    assert final.info["round"] == 19 and final.ids() == [0, 1, 2]
    assert _listing(tmp_path) == ["shared"]


def test_shipped_artefacts_resolve_from_the_source_tree_not_the_working_directory(tmp_path, monkeypatch):
    fake = tmp_path / "checkpoints" / "recipe-smollm2"
    fake.mkdir(parents=True)
    (fake / "recipe.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    shipped = repo_root() / "checkpoints" / "recipe-smollm2"
    assert resolve_checkpoint("checkpoints/recipe-smollm2") == shipped.resolve()
    assert resolve_checkpoint("./checkpoints/recipe-smollm2") == shipped.resolve()
    assert resolve_checkpoint(fake) == fake  # an absolute path is the user's own
    (tmp_path / "mine").mkdir()
    assert resolve_checkpoint("mine") == tmp_path / "mine"  # a relative path that names no shipped artefact
    assert resolve_checkpoint("checkpoints/mine") == tmp_path / "checkpoints" / "mine"
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_artifact(RECIPE, fake)  # the fake one is still checked when named explicitly
    meta, tensors = read_artifact(RECIPE, "checkpoints/recipe-smollm2")  # the shipped one, verified
    assert meta["lm"]["name"] == "smollm2-135m" and "sentinel.r_s" in tensors
