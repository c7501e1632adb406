"""The on-disk format of a KnowledgeRepository: constants, errors, the crash-safe save protocol, and
the checks that ``load`` applies to ``repository.json`` and ``tensors.safetensors`` (see
``KnowledgeRepository.save`` for the files and the protocol)."""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipe.errors import RecipeError
from recipe.retrieval.key_index import INDEX_KINDS
from recipe.retrieval.tensor_file import TensorFile, TensorFileError

logger = logging.getLogger("recipe.retrieval.repository")

FORMAT_NAME = "recipe.knowledge_repository"
FORMAT_VERSION = 2  # 2 adds index, nprobe, ivf_trained_at and, for an IVF, its centroids and lists
META_FILE = "repository.json"
TENSOR_FILE = "tensors.safetensors"
PROMPT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RepositoryError(RecipeError):
    """Base class of the errors KnowledgeRepository raises."""


class RepositoryInputError(RepositoryError, ValueError):
    """A key, prompt, query, id or option has the wrong type, shape or value (NaN, inf, id < 0)."""


class DuplicateIdError(RepositoryInputError):
    """An id given to ``add`` is repeated or already in the repository."""


class UnknownIdError(RepositoryInputError, LookupError):
    """An id given to ``remove``, ``get_prompts`` or ``keys`` is not in the repository."""


class RepositoryNotFoundError(RepositoryError, FileNotFoundError):
    """No saved repository (nor the leftover of an interrupted save) at the given directory."""


class RepositoryCorruptError(RepositoryError):
    """A saved repository is unreadable: bad or missing JSON, checksum mismatch, wrong shapes."""


class RepositoryMismatchError(RepositoryError):
    """A saved repository was made for something else: ``expect_info`` disagrees with its info."""


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def old_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    if os.name == "posix":  # elsewhere a directory cannot be opened for fsync
        fsync_file(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_target(target: Path, marker: str = META_FILE) -> None:
    """Step 0 of the save protocol: repair what an interrupted save left; refuse foreign dirs (non-empty
    directories without ``marker``, the file every save writes)."""
    old = old_path(target)
    if old.exists() and target.exists():
        shutil.rmtree(old)
    elif old.exists():
        logger.warning("an interrupted save left %s; restoring it to %s", old, target)
        os.rename(old, target)
        fsync_dir(target.parent)
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists() and not target.is_dir():
        raise RepositoryError(f"cannot save to {target}: it exists and is not a directory")
    if target.is_dir() and not (target / marker).exists() and any(target.iterdir()):
        raise RepositoryError(f"refusing to replace {target}: a non-empty directory without {marker}")


def save_atomically(target: Path, write_into: Callable[[Path], None], marker: str = META_FILE) -> None:
    """Steps 0-4 of the protocol in ``KnowledgeRepository.save``; ``write_into(work)`` writes and fsyncs the files."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prepare_target(target, marker)
    work = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    work.mkdir()
    try:
        write_into(work)
        fsync_dir(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = old_path(target)
    if target.exists():
        os.rename(target, old)
        fsync_dir(target.parent)
    os.rename(work, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def find_saved(target: Path) -> Path:
    if target.is_dir():
        return target
    if old_path(target).is_dir():
        logger.warning("%s is missing but an interrupted save left %s; loading that", target, old_path(target))
        return old_path(target)
    raise RepositoryNotFoundError(f"no knowledge repository at {target}")


def read_meta(source: Path) -> dict:
    path = source / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryCorruptError(f"{source} has no {META_FILE}: not a saved repository") from None
    except (OSError, ValueError) as exc:
        raise RepositoryCorruptError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise RepositoryCorruptError(f"{path}: 'format' is not {FORMAT_NAME!r}")
    shape = meta.get("prompt_shape")
    checks = {
        "format_version": is_int(meta.get("format_version")) and 1 <= meta["format_version"] <= FORMAT_VERSION,
        "key_dim": is_int(meta.get("key_dim")) and meta["key_dim"] > 0,
        "count": is_int(meta.get("count")) and meta["count"] >= 0,
        "next_id": is_int(meta.get("next_id")) and meta["next_id"] >= 0,
        "prompt_shape": isinstance(shape, list) and len(shape) == 2 and all(is_int(s) and s > 0 for s in shape),
        "prompt_dtype": meta.get("prompt_dtype") in PROMPT_DTYPES,
        "info": isinstance(meta.get("info"), dict),
        "tensor_file": meta.get("tensor_file") == TENSOR_FILE,
        "sha256": isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64,
        "index": meta.get("index", "flat") in INDEX_KINDS,  # the format 2 fields; format 1 was flat only
        "nprobe": is_int(meta.get("nprobe", 1)) and meta.get("nprobe", 1) > 0,
        "ivf_trained_at": is_int(meta.get("ivf_trained_at", 0)) and meta.get("ivf_trained_at", 0) >= 0,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:  # format_version above FORMAT_VERSION: written by a newer recipe
        raise RepositoryCorruptError(
            f"{path}: invalid fields {bad} (values {[meta.get(b) for b in bad]}; format {FORMAT_VERSION} expected)")
    return meta


def check_info(saved: dict, expect_info: Mapping[str, Any], source: Path) -> None:
    expected = json.loads(json.dumps(dict(expect_info)))  # compare as saved: tuples become lists
    for key, want in expected.items():
        if key not in saved:
            raise RepositoryMismatchError(
                f"{source}: saved info has no {key!r} (expected {want!r}); it has {sorted(saved)}")
        if saved[key] != want:
            raise RepositoryMismatchError(f"{source}: saved info[{key!r}] is {saved[key]!r}, expected {want!r}")


class CheckedTensorFile(TensorFile):
    """The checked tensor file of a saved repository: sha256 as recorded, tensors as ``meta`` says."""

    def __init__(self, path: Path, meta: dict) -> None:
        if not path.is_file():
            raise RepositoryCorruptError(f"{path} is missing")
        digest = sha256_file(path)
        if digest != meta["sha256"]:
            raise RepositoryCorruptError(f"{path}: sha256 {digest[:16]}... differs from {meta['sha256'][:16]}... "
                                         f"recorded in {META_FILE}: the file was truncated or changed after saving")
        try:
            super().__init__(path)
        except TensorFileError as exc:
            raise RepositoryCorruptError(str(exc)) from exc
        try:
            self._check(meta)
        except BaseException:
            self._f.close()
            raise

    def _check(self, meta: dict) -> None:
        n, d, (l, h) = meta["count"], meta["key_dim"], meta["prompt_shape"]
        expected = {"keys": ((n, d), torch.float32), "prompts": ((n, l, h), PROMPT_DTYPES[meta["prompt_dtype"]]),
                    "ids": ((n,), torch.int64)}
        if meta.get("ivf_trained_at", 0):
            nlist = self.entries.get("ivf_centroids", (None, (0,), 0))[1][0]
            expected.update(ivf_centroids=((nlist, d), torch.float32), ivf_lists=((n,), torch.int64))
        if set(self.entries) != set(expected):
            raise RepositoryCorruptError(f"{self.path} holds tensors {sorted(self.entries)}, expected {sorted(expected)}")
        for name, (shape, dtype) in expected.items():
            got_dtype, got_shape = self.info(name)
            if got_shape != shape or got_dtype != dtype:
                raise RepositoryCorruptError(f"{self.path}: {name!r} is {got_shape} {got_dtype}, expected {shape} "
                                             f"{dtype} (count {n} in {META_FILE})")

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        try:
            return super().read(name, start, stop)
        except TensorFileError as exc:
            raise RepositoryCorruptError(str(exc)) from exc
