"""The on-disk format of a KnowledgeRepository and the checks on what enters it: constants, errors,
the checks that ``load`` applies to ``repository.json`` and ``tensors.safetensors`` once
``recipe.storage`` has verified their checksums (see ``KnowledgeRepository.save`` for the files), and
the checks on ids and arrays given to ``add``, ``search`` and ``remove``."""
from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipe.errors import RecipeError
from recipe.retrieval.key_index import INDEX_KINDS
from recipe.retrieval.tensor_file import TensorFile, TensorFileError
from recipe.storage import Errors, FolderCorruptError, FolderNotFoundError, VerifiedFolder, read_json

FORMAT_NAME = "recipe.knowledge_repository"
FORMAT_VERSION = 3  # 3: every file covered by manifest.json (1 and 2, without it, are refused)
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


class RepositoryNotFoundError(RepositoryError, FolderNotFoundError):
    """No saved repository (nor the leftover of an interrupted save) at the given directory."""


class RepositoryCorruptError(RepositoryError, FolderCorruptError):
    """A saved repository is unreadable: bad or missing JSON, checksum mismatch, wrong shapes or values."""


ERRORS = Errors(not_found=RepositoryNotFoundError, corrupt=RepositoryCorruptError, what="knowledge repository")


class RepositoryMismatchError(RepositoryError):
    """A saved repository was made for something else: ``expect_info`` disagrees with its info."""


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def read_meta(folder: VerifiedFolder) -> dict:
    """``repository.json`` of a verified folder, every field type- and range-checked."""
    path = folder.file(META_FILE)
    meta = read_json(folder, META_FILE)
    shape = meta.get("prompt_shape")
    checks = {
        "key_dim": is_int(meta.get("key_dim")) and meta["key_dim"] > 0,
        "count": is_int(meta.get("count")) and meta["count"] >= 0,
        "next_id": is_int(meta.get("next_id")) and meta["next_id"] >= 0,
        "prompt_shape": isinstance(shape, list) and len(shape) == 2 and all(is_int(s) and s > 0 for s in shape),
        "prompt_dtype": meta.get("prompt_dtype") in PROMPT_DTYPES,
        "info": isinstance(meta.get("info"), dict),
        "index": meta.get("index") in INDEX_KINDS,
        "nprobe": is_int(meta.get("nprobe")) and meta["nprobe"] > 0,
        "ivf_trained_at": is_int(meta.get("ivf_trained_at")) and meta["ivf_trained_at"] >= 0,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise RepositoryCorruptError(f"{path}: invalid fields {bad} (values {[meta.get(b) for b in bad]})")
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
    """The tensor file of a verified repository folder, holding the tensors ``meta`` describes."""

    def __init__(self, path: Path, meta: dict) -> None:
        try:
            super().__init__(path)
        except (OSError, TensorFileError) as exc:
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


def as_id(value: object) -> int:
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        edit_id = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise RepositoryInputError(f"an id must be an int, got {describe(value)}") from None
    if not 0 <= edit_id < 2**63 - 1:
        raise RepositoryInputError(f"ids must be non-negative int64 (-1 marks an empty search slot), got {edit_id}")
    return edit_id


def as_array(x: Any, what: str, shape: tuple[int | None, ...], *, copy: bool = False) -> np.ndarray:
    """A finite float32 C-contiguous numpy array of ``shape`` (None: any size) from float numpy or torch."""
    if isinstance(x, torch.Tensor) and torch.is_floating_point(x):
        x = x.detach().to("cpu", torch.float32).numpy()
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise RepositoryInputError(f"{what} must be a float numpy array or torch.Tensor, got {describe(x)}")
    if x.ndim != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        wanted = tuple("N" if want is None else want for want in shape)
        raise RepositoryInputError(f"{what} must have shape {wanted}, got {tuple(x.shape)}".replace("'", ""))
    x = np.array(x, dtype=np.float32, order="C", copy=True if copy else None)
    if not np.isfinite(x).all():
        raise RepositoryInputError(f"{what} contain NaN or inf")
    return x


def describe(x: object) -> str:
    return type(x).__name__ + (f" of dtype {x.dtype}" if hasattr(x, "dtype") else "")


def preview(ids: Sequence[int], limit: int = 10) -> str:
    return f"[{', '.join(map(str, ids[:limit]))}{', ...' if len(ids) > limit else ''}] ({len(ids)} in all)"
