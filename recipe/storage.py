"""Atomic, locked, verified folders: how every repository, editor state and trained artefact is saved.

A saved folder ``T`` holds the caller's files plus ``manifest.json``::

    {"format": "<name>", "format_version": <int>, "files": {"<file>": {"sha256": "...", "bytes": n}, ...}}

listing every file written (JSON files included). :func:`open_folder` checks the format, the version
and the sha256 of every listed file before the caller reads anything, so a flipped byte, a truncated
file or a hand-edited JSON file is an error naming the file. Files not in the manifest (a CARD.md
added by hand) are never read.

Save protocol, T = the target, O = sibling ``.T.old``, W = fresh sibling ``.T.tmp-<uuid>``, all under
the lock file ``.T.lock`` (so two processes saving or loading one folder take turns; a process that
waits longer than ``timeout`` seconds gets :class:`FolderBusyError`):

0. repair what a killed save left: O without T means it died between steps 2 and 3: rename O back
   to T; O beside T means it died after step 3: delete O. Delete every leftover W;
1. write the files into W, hash and fsync them, write the manifest, fsync W;
2. if T exists, rename T -> O and fsync the parent (O is now the complete old copy);
3. rename W -> T and fsync the parent (T is now the complete new copy);
4. delete O.

At every instant T, or failing that O, holds a complete folder (old or new); a load repairs the
layout the same way (step 0) when it can write there, and otherwise reads O when T is missing.
Checksums detect damage and accidental edits, not a forger who rewrites the manifest too: range
checks on the values (done by each loader) are the second line.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import filelock

from recipe.errors import RecipeError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
LOCK_TIMEOUT = 600.0  # seconds a save or load waits for another process holding the folder


class StorageError(RecipeError):
    """Base class of the errors this module raises."""


class FolderNotFoundError(StorageError, FileNotFoundError):
    """No saved folder (nor the leftover of an interrupted save) at the given path."""


class FolderCorruptError(StorageError):
    """A saved folder fails verification: missing or extra manifest entries, checksum, format, version."""


class FolderBusyError(StorageError, TimeoutError):
    """Another process held the folder's lock for longer than the timeout."""


@dataclass(frozen=True)
class Errors:
    """The exception classes a caller wants raised instead of this module's own (same meaning)."""

    not_found: type[Exception] = FolderNotFoundError
    corrupt: type[Exception] = FolderCorruptError
    what: str = "saved folder"  # in messages: "no <what> at <path>", "<path> is not a <what>"


@dataclass(frozen=True)
class VerifiedFolder:
    """A folder whose manifest and listed files were verified; ``path`` is where they are."""

    path: Path
    format_version: int
    files: Mapping[str, str]  # file name -> sha256
    errors: Errors

    def file(self, name: str) -> Path:
        """The path of a verified file; the folder's corrupt error when the manifest does not list it."""
        if name not in self.files:
            raise self.errors.corrupt(f"{self.path}: {MANIFEST_FILE} does not list {name}")
        return self.path / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    if os.name == "posix":  # elsewhere a directory cannot be opened for fsync
        fsync_file(path)


def write_json(path: Path, value: object) -> None:
    """Write ``value`` as sorted, indented JSON (NaN refused) and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def save_folder(target: str | os.PathLike, write_into: Callable[[Path], Mapping[str, str] | None], *,
                format_name: str, format_version: int, timeout: float = LOCK_TIMEOUT) -> Path:
    """Run the save protocol (module docstring); returns the absolute target path.

    ``write_into(work)`` writes the files into the empty folder ``work``; it may return the sha256 of
    files it hashed while writing (the rest are hashed here). A non-empty target without a manifest
    is refused, never replaced. Any exception from ``write_into`` leaves the previous folder as it was.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target, timeout, writing=True):
        _repair(target)
        if target.exists() and not target.is_dir():
            raise StorageError(f"cannot save to {target}: it exists and is not a directory")
        if target.is_dir() and not (target / MANIFEST_FILE).exists() and any(target.iterdir()):
            raise StorageError(f"refusing to replace {target}: a non-empty directory without {MANIFEST_FILE}")
        work = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        work.mkdir()
        try:
            known = write_into(work) or {}
            write_json(work / MANIFEST_FILE, _manifest(work, known, format_name, format_version))
            fsync_dir(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        old = _old_path(target)
        if target.exists():
            os.rename(target, old)
            fsync_dir(target.parent)
        os.rename(work, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def open_folder(target: str | os.PathLike, *, format_name: str, versions: Collection[int],
                errors: Errors = Errors(), timeout: float = LOCK_TIMEOUT, lock: bool = True) -> Iterator[VerifiedFolder]:
    """Verify the folder at ``target`` and hold its lock while the caller reads it.

    Checks, before yielding: the manifest is valid JSON naming ``format_name`` and a version in
    ``versions``; every listed file exists, lies inside the folder and has the recorded sha256.
    Raises ``errors.not_found`` when nothing is saved there, ``errors.corrupt`` naming the file
    on any mismatch, :class:`FolderBusyError` when a save holds the lock past ``timeout``.
    ``lock=False`` (folders written once, like shipped artefacts) reads without the lock, so
    nothing is written beside the folder, and leaves any repair to the next save.
    """
    target = Path(target).resolve()
    with _locked(target, timeout, writing=False) if lock else contextlib.nullcontext():
        if lock:
            with contextlib.suppress(OSError):  # a read-only location: read what is there
                _repair(target)
        source = _find_saved(target, errors)
        yield _verify(source, format_name, versions, errors)


def verify_folder(target: str | os.PathLike, *, format_name: str, versions: Collection[int],
                  errors: Errors = Errors()) -> VerifiedFolder:
    """:func:`open_folder` without holding the lock afterwards (checks only)."""
    with open_folder(target, format_name=format_name, versions=versions, errors=errors) as folder:
        return folder


def read_json(folder: VerifiedFolder, name: str) -> dict:
    """A verified JSON file of ``folder`` that must hold an object."""
    path = folder.file(name)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise folder.errors.corrupt(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise folder.errors.corrupt(f"{path} does not hold a JSON object")
    return value


def reseal(target: str | os.PathLike) -> None:
    """Record the current sha256 of every listed file in the manifest of the saved folder ``target``.

    For tests and tools that change a saved file on purpose; everything else is saved with
    :func:`save_folder`. Loaders still range-check every value they read.
    """
    path = Path(target) / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for name, entry in manifest["files"].items():
        entry.update(sha256=sha256_file(path.parent / name), bytes=(path.parent / name).stat().st_size)
    write_json(path, manifest)


def _manifest(work: Path, known: Mapping[str, str], format_name: str, format_version: int) -> dict:
    files = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        name = path.relative_to(work).as_posix()
        if name == MANIFEST_FILE:
            raise StorageError(f"{MANIFEST_FILE} is written by the storage module, not by the caller")
        fsync_file(path)
        files[name] = {"sha256": known.get(name) or sha256_file(path), "bytes": path.stat().st_size}
    return {"format": format_name, "format_version": int(format_version), "files": files}


def _verify(source: Path, format_name: str, versions: Collection[int], errors: Errors) -> VerifiedFolder:
    path = source / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise errors.corrupt(f"{source} is not a {errors.what}: {MANIFEST_FILE} is missing (or it was saved "
                             f"by a version without checksums: save it again)") from None
    except (OSError, ValueError) as exc:
        raise errors.corrupt(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise errors.corrupt(f"{source} is not a {errors.what}: it holds {found!r}, expected {format_name!r}")
    version, files = manifest.get("format_version"), manifest.get("files")
    if version not in versions or isinstance(version, bool):
        raise errors.corrupt(f"{source}: {format_name} version {version!r}; this recipe reads {sorted(versions)}")
    if not isinstance(files, dict):
        raise errors.corrupt(f"{path}: 'files' is not a JSON object")
    hashes = {}
    for name, entry in files.items():
        hashes[name] = _check_file(source, name, entry, errors)
    return VerifiedFolder(source, version, hashes, errors)


def _check_file(source: Path, name: str, entry: object, errors: Errors) -> str:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or name in ("", MANIFEST_FILE):
        raise errors.corrupt(f"{source / MANIFEST_FILE} lists a file outside the folder: {name!r}")
    want = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(want, str):
        raise errors.corrupt(f"{source / MANIFEST_FILE}: no sha256 for {name}")
    path = source / rel
    if not path.is_file():
        raise errors.corrupt(f"{path} is missing (listed in {MANIFEST_FILE})")
    got = sha256_file(path)
    if got != want:
        raise errors.corrupt(f"{path}: sha256 {got[:16]}... differs from {want[:16]}... recorded in "
                             f"{MANIFEST_FILE}: the file was truncated or changed after saving")
    return got


@contextlib.contextmanager
def _locked(target: Path, timeout: float, *, writing: bool) -> Iterator[None]:
    lock: filelock.FileLock | None = filelock.FileLock(target.with_name(f".{target.name}.lock"), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FolderBusyError(f"{target} is held by another process (lock {lock.lock_file}); gave up "
                              f"after {timeout:g} s") from None
    except OSError as exc:
        if writing:
            raise StorageError(f"cannot lock {target} for saving: {exc}") from exc
        logger.debug("reading %s unlocked: %s", target, exc)  # e.g. a read-only install
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _old_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _repair(target: Path) -> None:
    """Step 0 of the protocol: undo what an interrupted save left (call with the lock held)."""
    old = _old_path(target)
    if old.exists() and target.exists():
        shutil.rmtree(old)
    elif old.exists():
        logger.warning("an interrupted save left %s; restoring it to %s", old, target)
        os.rename(old, target)
        fsync_dir(target.parent)
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        logger.info("removing %s, left by an interrupted save", leftover)
        shutil.rmtree(leftover)


def _find_saved(target: Path, errors: Errors) -> Path:
    if target.is_dir():
        return target
    if _old_path(target).is_dir():
        logger.warning("%s is missing but an interrupted save left %s; loading that", target, _old_path(target))
        return _old_path(target)
    raise errors.not_found(f"no {errors.what} at {target}")
