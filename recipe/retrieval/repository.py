"""KnowledgeRepository: RECIPE's edit store, a FAISS inner-product index of retrieval keys plus the
continuous prompt of every edit, with stable ids, per-edit removal and crash-safe save/load.

One entry (one edit) is
- an id: a non-negative int64 that never changes while the entry lives. Auto-assigned ids increase
  and are never handed out twice, not even after removals or a save/load round trip;
- a key (D,) float32, the knowledge representation r_k. Queries score keys by plain inner product;
  nothing is normalised (scale both sides as the retriever was trained, e.g. by 1/sqrt(D));
- a prompt (l, H) float32, the continuous prompt prepended to the LM input when the entry wins.

Not thread-safe; one writer per directory at a time.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import operator
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import safetensors.torch
import torch

from recipe.errors import RecipeError

logger = logging.getLogger(__name__)

FORMAT_NAME = "recipe.knowledge_repository"
FORMAT_VERSION = 1
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


class KnowledgeRepository:
    """Keys in a FAISS ``IndexIDMap2(IndexFlatIP(D))``, prompts in a dict id -> (l, H) float32 tensor.

    Invariants: ``ids()`` lists every entry once in insertion order, which is also FAISS's storage
    order (flat removal keeps it) and the row order of saved files, so a save/load round trip
    reproduces search results, ties included. ``add`` only buffers keys; the buffer goes into FAISS
    in one batch before any search, removal, ``keys()`` or save, and whenever it holds
    ``flush_size`` keys: adding one edit at a time stays cheap and every entry is searchable at once.

    ``faiss.cvar.distance_compute_blas_threshold`` is process-global; faiss 1.15 defaults it to
    128000 queries, below which it scans query by query instead of calling BLAS (64 queries over
    100k x 384 keys, 2 cores: 178 ms, 35 ms with BLAS). The constructor sets it to ``blas_threshold``
    (None leaves it alone); importing this module changes nothing.

    GPU (``use_gpu``, default: whether faiss sees a GPU): searches run on a GPU copy of the flat
    index whose row -> id map stays on the CPU. Adds are appended to both; a removal drops the GPU
    copy, which is rebuilt from the CPU index (the source of truth) at the next search.
    """

    def __init__(
        self,
        key_dim: int,
        prompt_shape: tuple[int, int],
        *,
        info: dict | None = None,
        use_gpu: bool | None = None,
        prompt_dtype: str = "float32",  # how prompts are saved: float32 (bit-exact), float16 or bfloat16
        flush_size: int = 1024,  # buffered keys that trigger a flush into FAISS
        blas_threshold: int | None = 20,  # faiss's process-global BLAS threshold; None: leave as is
    ) -> None:
        prompt_shape = tuple(prompt_shape)
        if not _is_int(key_dim) or key_dim <= 0 or not _is_int(flush_size) or flush_size <= 0:
            raise RepositoryInputError(f"key_dim and flush_size must be positive ints, got {key_dim!r}, {flush_size!r}")
        if len(prompt_shape) != 2 or not all(_is_int(s) and s > 0 for s in prompt_shape):
            raise RepositoryInputError(f"prompt_shape must be (l, H), positive ints, got {prompt_shape!r}")
        if prompt_dtype not in PROMPT_DTYPES:
            raise RepositoryInputError(f"prompt_dtype must be one of {sorted(PROMPT_DTYPES)}, got {prompt_dtype!r}")
        if not isinstance({} if info is None else info, dict):
            raise RepositoryInputError(f"info must be a dict, got {type(info).__name__}")
        try:  # a normalised copy: tuples become lists, exactly as they will be saved
            self.info: dict = json.loads(json.dumps({} if info is None else info, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise RepositoryInputError(f"info must be JSON-able: {exc}") from exc
        self.key_dim, self.prompt_shape = int(key_dim), (int(prompt_shape[0]), int(prompt_shape[1]))
        self.prompt_dtype, self.flush_size = prompt_dtype, int(flush_size)
        if blas_threshold is not None:
            faiss.cvar.distance_compute_blas_threshold = int(blas_threshold)
        self._flat = faiss.IndexFlatIP(self.key_dim)
        self._index = faiss.IndexIDMap2(self._flat)
        self._prompts: dict[int, torch.Tensor] = {}  # id -> (l, H) float32, insertion order
        self._pending_ids: list[np.ndarray] = []  # chunks of (n,) int64 not yet in FAISS
        self._pending_keys: list[np.ndarray] = []  # chunks of (n, D) float32
        self._n_pending = 0
        self._next_id = 0  # greater than every id ever added
        n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.uses_gpu = n_gpus > 0 if use_gpu is None else bool(use_gpu)
        if self.uses_gpu and (n_gpus == 0 or not hasattr(faiss, "StandardGpuResources")):
            raise RepositoryError("use_gpu=True, but faiss sees no GPU (install faiss-gpu-cu12 instead of faiss-cpu)")
        self._gpu_res = faiss.StandardGpuResources() if self.uses_gpu else None
        self._gpu_index: Any = None  # GPU copy of self._flat; None: rebuild at the next search
        self._gpu_ids = np.empty(0, dtype=np.int64)  # (rows,) id of each GPU row

    def __len__(self) -> int:
        return len(self._prompts)

    def __contains__(self, edit_id: object) -> bool:
        try:
            return operator.index(edit_id) in self._prompts  # type: ignore[arg-type]
        except TypeError:
            return False

    def ids(self) -> list[int]:
        """Every id, in insertion order (the order of FAISS's storage and of saved files)."""
        return list(self._prompts)

    def add(self, keys: Any, prompts: Any, ids: Sequence[int] | None = None) -> list[int]:
        """Add N entries: keys (N, D), prompts (N, l, H); numpy or torch, any float dtype, finite.

        ``ids`` must be N distinct non-negative ints not in the repository; by default the next N
        never-used ids are assigned. Returns the ids. On any error nothing is added.
        """
        keys_np = _as_array(keys, "keys", (None, self.key_dim), copy=True)  # (N, D) float32
        n = keys_np.shape[0]
        prompts_t = torch.from_numpy(_as_array(prompts, "prompts", (n, *self.prompt_shape)))  # (N, l, H) float32
        new_ids = self._new_ids(ids, n)
        if n == 0:
            return []
        self._pending_ids.append(np.asarray(new_ids, dtype=np.int64))
        self._pending_keys.append(keys_np)
        self._n_pending += n
        for edit_id, prompt in zip(new_ids, prompts_t):
            self._prompts[edit_id] = prompt.clone()  # (l, H), own storage so that removal frees it
        self._next_id = max(self._next_id, max(new_ids) + 1)
        if self._n_pending >= self.flush_size:
            self._flush()
        return new_ids

    def remove(self, ids: Iterable[int]) -> None:
        """Remove entries by id. Every id must exist; otherwise UnknownIdError and nothing changes."""
        wanted = sorted({_as_id(i) for i in ids})
        self._check_known(wanted, "remove")
        if not wanted:
            return
        self._flush()  # buffered keys go into FAISS first: one place to remove from
        removed = self._index.remove_ids(np.asarray(wanted, dtype=np.int64))
        if removed != len(wanted):  # FAISS and the prompt store disagree: a bug, not bad input
            raise RuntimeError(f"FAISS removed {removed} of {len(wanted)} ids; repository is inconsistent")
        for edit_id in wanted:
            del self._prompts[edit_id]
        self._gpu_index = None

    def search(self, queries: Any, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-k entries by inner product for queries (B, D), numpy or torch, any float dtype.

        Returns scores (B, k) float32 and ids (B, k) int64, best first. Slots beyond the number of
        entries (all of them when the repository is empty) hold id -1 and score -inf.
        """
        q = _as_array(queries, "queries", (None, self.key_dim))  # (B, D) float32
        if not _is_int(k) or k < 1:
            raise RepositoryInputError(f"k must be a positive int, got {k!r}")
        self._flush()
        if len(self) == 0 or q.shape[0] == 0:
            return np.full((q.shape[0], k), -np.inf, np.float32), np.full((q.shape[0], k), -1, np.int64)
        scores, ids = self._gpu_search(q, k) if self.uses_gpu else self._index.search(q, k)  # (B, k) each
        scores, ids = np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)
        scores[ids < 0] = -np.inf  # faiss pads with -FLT_MAX
        return scores, ids

    def get_prompts(self, ids: Iterable[int]) -> torch.Tensor:
        """The prompts of ``ids``, stacked in the given order: (n, l, H) float32, a copy."""
        wanted = [_as_id(i) for i in ids]
        self._check_known(wanted, "get prompts of")
        if not wanted:
            return torch.empty((0, *self.prompt_shape), dtype=torch.float32)
        return torch.stack([self._prompts[i] for i in wanted])  # (n, l, H)

    def keys(self, ids: Iterable[int] | None = None) -> np.ndarray:
        """The keys of ``ids`` (default: all, in ``ids()`` order): (n, D) float32, a copy."""
        self._flush()
        if ids is None:
            return faiss.vector_to_array(self._flat.codes).view(np.float32).reshape(-1, self.key_dim)
        wanted = [_as_id(i) for i in ids]
        self._check_known(wanted, "get keys of")
        if not wanted:
            return np.empty((0, self.key_dim), dtype=np.float32)
        return self._index.reconstruct_batch(np.asarray(wanted, dtype=np.int64))  # (n, D)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the repository to ``directory`` crash-safely; returns its absolute path.

        Files: ``tensors.safetensors`` with keys (N, D) float32, prompts (N, l, H) in
        ``prompt_dtype`` and ids (N,) int64, rows in ``ids()`` order; ``repository.json`` with
        format, format_version, key_dim, prompt_shape, prompt_dtype, count, next_id, info,
        tensor_file and the sha256 of the tensor file. No pickle.

        Protocol, T = ``directory``, O = sibling ``.T.old``, W = fresh sibling ``.T.tmp-<uuid>``:
        0. repair: O without T means a save died between steps 2 and 3: rename O back to T;
           O beside T means one died after step 3: delete O. Delete leftover W's;
        1. write both files into W, fsync them and W (a crash here leaves only garbage in W);
        2. if T exists, rename T -> O, fsync the parent (O is now the complete old copy);
        3. rename W -> T, fsync the parent (T is now the complete new copy);
        4. delete O.
        At every instant T, or failing that O, holds a complete repository (old or new), and
        ``load`` reads O when T is missing. A non-empty T without ``repository.json`` is refused.
        A reader in another process racing steps 2-3 can get a NotFound or Corrupt error: retry.
        """
        self._flush()
        ids = faiss.vector_to_array(self._index.id_map)  # (N,) int64, storage order
        if ids.tolist() != list(self._prompts):
            raise RuntimeError("FAISS and the prompt store disagree on the ids; refusing to save")
        prompts = self.get_prompts(ids.tolist()).to(PROMPT_DTYPES[self.prompt_dtype])  # (N, l, H)
        if not torch.isfinite(prompts).all():
            raise RepositoryInputError(f"prompts overflow {self.prompt_dtype}; use prompt_dtype='float32'")
        tensors = {"keys": torch.from_numpy(self.keys()), "prompts": prompts, "ids": torch.from_numpy(ids)}
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "key_dim": self.key_dim,
                "prompt_shape": list(self.prompt_shape), "prompt_dtype": self.prompt_dtype, "count": len(ids),
                "next_id": self._next_id, "info": self.info, "tensor_file": TENSOR_FILE}
        target = Path(directory).resolve()
        _save_atomically(target, tensors, meta)
        logger.info("saved %d repository entries to %s", len(ids), target)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike, expect_info: Mapping[str, Any] | None = None, *,
             use_gpu: bool | None = None) -> KnowledgeRepository:
        """Load what ``save`` wrote, checking the JSON fields, the checksum, shapes and counts.

        Every key of ``expect_info`` must be in the saved info with an equal value, else
        RepositoryMismatchError naming the key and both values. When ``directory`` is missing but
        an interrupted save left ``.<name>.old`` beside it, that complete older copy is read,
        without moving anything (the next ``save`` repairs the layout). A missing repository
        raises RepositoryNotFoundError, a damaged one RepositoryCorruptError.
        """
        source = _find_saved(Path(directory).resolve())
        meta = _read_meta(source)
        if expect_info is not None:
            _check_info(meta["info"], expect_info, source)
        tensors = _read_tensors(source, meta)
        repo = cls(meta["key_dim"], meta["prompt_shape"], info=meta["info"], use_gpu=use_gpu,
                   prompt_dtype=meta["prompt_dtype"])
        try:
            repo.add(tensors["keys"], tensors["prompts"].float(), ids=tensors["ids"].tolist())
        except RepositoryInputError as exc:
            raise RepositoryCorruptError(f"{source / TENSOR_FILE}: invalid entries: {exc}") from exc
        repo._flush()
        repo._next_id = max(repo._next_id, meta["next_id"])
        logger.info("loaded %d repository entries from %s", len(repo), source)
        return repo

    def _new_ids(self, ids: Sequence[int] | None, n: int) -> list[int]:
        if ids is None:
            return list(range(self._next_id, self._next_id + n))
        new_ids = [_as_id(i) for i in ids]
        if len(new_ids) != n:
            raise RepositoryInputError(f"got {len(new_ids)} ids for {n} keys")
        repeated = sorted(i for i, count in Counter(new_ids).items() if count > 1)
        if repeated:
            raise DuplicateIdError(f"ids repeated within one add: {_preview(repeated)}")
        existing = sorted(i for i in new_ids if i in self._prompts)
        if existing:
            raise DuplicateIdError(f"ids already in the repository: {_preview(existing)}")
        return new_ids

    def _check_known(self, ids: Sequence[int], action: str) -> None:
        unknown = sorted({i for i in ids if i not in self._prompts})
        if unknown:
            raise UnknownIdError(f"cannot {action} ids not in the repository: {_preview(unknown)}; nothing changed")

    def _flush(self) -> None:
        """Move the buffered keys into FAISS (and into the GPU copy, if built) in one batch."""
        if not self._n_pending:
            return
        ids, keys = np.concatenate(self._pending_ids), np.concatenate(self._pending_keys)  # (n,), (n, D)
        self._index.add_with_ids(keys, ids)
        if self._gpu_index is not None:
            self._gpu_index.add(keys)
            self._gpu_ids = np.concatenate([self._gpu_ids, ids])
        self._pending_ids, self._pending_keys, self._n_pending = [], [], 0

    def _gpu_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._flat)
            self._gpu_ids = faiss.vector_to_array(self._index.id_map)  # (N,) id of each row
        scores, rows = self._gpu_index.search(q, k)  # (B, k) each; rows are positions or -1
        return scores, np.where(rows >= 0, self._gpu_ids[np.clip(rows, 0, None)], -1)  # ids (B, k)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_id(value: object) -> int:
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        edit_id = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise RepositoryInputError(f"an id must be an int, got {_describe(value)}") from None
    if not 0 <= edit_id < 2**63 - 1:
        raise RepositoryInputError(f"ids must be non-negative int64 (-1 marks an empty search slot), got {edit_id}")
    return edit_id


def _as_array(x: Any, what: str, shape: tuple[int | None, ...], *, copy: bool = False) -> np.ndarray:
    """A finite float32 C-contiguous numpy array of ``shape`` (None: any size) from float numpy or torch."""
    if isinstance(x, torch.Tensor) and torch.is_floating_point(x):
        x = x.detach().to("cpu", torch.float32).numpy()
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise RepositoryInputError(f"{what} must be a float numpy array or torch.Tensor, got {_describe(x)}")
    if x.ndim != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        wanted = tuple("N" if want is None else want for want in shape)
        raise RepositoryInputError(f"{what} must have shape {wanted}, got {tuple(x.shape)}".replace("'", ""))
    x = np.array(x, dtype=np.float32, order="C", copy=True if copy else None)
    if not np.isfinite(x).all():
        raise RepositoryInputError(f"{what} contain NaN or inf")
    return x


def _describe(x: object) -> str:
    return type(x).__name__ + (f" of dtype {x.dtype}" if hasattr(x, "dtype") else "")


def _preview(ids: Sequence[int], limit: int = 10) -> str:
    return f"[{', '.join(map(str, ids[:limit]))}{', ...' if len(ids) > limit else ''}] ({len(ids)} in all)"


def _old_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":  # elsewhere a directory cannot be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write the safetensors file, fsync it, return its sha256."""
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                                metadata={"format": FORMAT_NAME})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return _sha256(path)


def _write_json(path: Path, meta: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _prepare_target(target: Path) -> None:
    """Step 0 of the save protocol: repair what an interrupted save left; refuse foreign dirs."""
    old = _old_path(target)
    if old.exists() and target.exists():
        shutil.rmtree(old)
    elif old.exists():
        logger.warning("an interrupted save left %s; restoring it to %s", old, target)
        os.rename(old, target)
        _fsync_dir(target.parent)
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists() and not target.is_dir():
        raise RepositoryError(f"cannot save to {target}: it exists and is not a directory")
    if target.is_dir() and not (target / META_FILE).exists() and any(target.iterdir()):
        raise RepositoryError(f"refusing to replace {target}: a non-empty directory without {META_FILE}")


def _save_atomically(target: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Steps 0-4 of the protocol in ``KnowledgeRepository.save``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _prepare_target(target)
    work = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    work.mkdir()
    try:
        _write_json(work / META_FILE, {**meta, "sha256": _write_tensors(work / TENSOR_FILE, tensors)})
        _fsync_dir(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = _old_path(target)
    if target.exists():
        os.rename(target, old)
        _fsync_dir(target.parent)
    os.rename(work, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _find_saved(target: Path) -> Path:
    if target.is_dir():
        return target
    if _old_path(target).is_dir():
        logger.warning("%s is missing but an interrupted save left %s; loading that", target, _old_path(target))
        return _old_path(target)
    raise RepositoryNotFoundError(f"no knowledge repository at {target}")


def _read_meta(source: Path) -> dict:
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
        "format_version": _is_int(meta.get("format_version")) and 1 <= meta["format_version"] <= FORMAT_VERSION,
        "key_dim": _is_int(meta.get("key_dim")) and meta["key_dim"] > 0,
        "count": _is_int(meta.get("count")) and meta["count"] >= 0,
        "next_id": _is_int(meta.get("next_id")) and meta["next_id"] >= 0,
        "prompt_shape": isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape),
        "prompt_dtype": meta.get("prompt_dtype") in PROMPT_DTYPES,
        "info": isinstance(meta.get("info"), dict),
        "tensor_file": meta.get("tensor_file") == TENSOR_FILE,
        "sha256": isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:  # format_version above FORMAT_VERSION: written by a newer recipe
        raise RepositoryCorruptError(
            f"{path}: invalid fields {bad} (values {[meta.get(b) for b in bad]}; format {FORMAT_VERSION} expected)")
    return meta


def _check_info(saved: dict, expect_info: Mapping[str, Any], source: Path) -> None:
    expected = json.loads(json.dumps(dict(expect_info)))  # compare as saved: tuples become lists
    for key, want in expected.items():
        if key not in saved:
            raise RepositoryMismatchError(
                f"{source}: saved info has no {key!r} (expected {want!r}); it has {sorted(saved)}")
        if saved[key] != want:
            raise RepositoryMismatchError(f"{source}: saved info[{key!r}] is {saved[key]!r}, expected {want!r}")


def _read_tensors(source: Path, meta: dict) -> dict[str, torch.Tensor]:
    path = source / TENSOR_FILE
    if not path.is_file():
        raise RepositoryCorruptError(f"{path} is missing")
    digest = _sha256(path)
    if digest != meta["sha256"]:
        raise RepositoryCorruptError(f"{path}: sha256 {digest[:16]}... differs from {meta['sha256'][:16]}... "
                                     f"recorded in {META_FILE}: the file was truncated or changed after saving")
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on malformed files
        raise RepositoryCorruptError(f"{path} is not a readable safetensors file: {exc}") from exc
    n, (l, h) = meta["count"], meta["prompt_shape"]
    expected = {"keys": ((n, meta["key_dim"]), torch.float32),
                "prompts": ((n, l, h), PROMPT_DTYPES[meta["prompt_dtype"]]), "ids": ((n,), torch.int64)}
    if set(tensors) != set(expected):
        raise RepositoryCorruptError(f"{path} holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
            raise RepositoryCorruptError(f"{path}: {name!r} is {tuple(tensors[name].shape)} {tensors[name].dtype}, "
                                         f"expected {shape} {dtype} (count {n} in {META_FILE})")
    return tensors
