"""KnowledgeRepository: RECIPE's edit store, a FAISS inner-product index of retrieval keys plus the
continuous prompt of every edit, with stable ids, per-edit removal and crash-safe save/load.

One entry (one edit) is
- an id: a non-negative int64 that never changes while the entry lives. Auto-assigned ids increase
  and are never handed out twice, not even after removals or a save/load round trip;
- a key (D,) float32, the knowledge representation r_k. Queries score keys by plain inner product;
  nothing is normalised (scale both sides as the retriever was trained, e.g. by 1/sqrt(D));
- a prompt (l, H), the continuous prompt prepended to the LM input when the entry wins, held in
  memory and on disk in ``prompt_dtype`` (float32 by default: bit-exact) and returned as float32.

Memory per entry: 4 D bytes of key + ~50 bytes of FAISS ids/maps + l H itemsize bytes of prompt +
~100 bytes of Python dict. With D = 512, l x H = 3 x 576 (benchmarks/results/scale): 9.0 KB counted,
10.3-10.7 KB of RSS growth at 100k-300k entries with float32 prompts; 5.6 KB counted, 6.1 KB RSS (flat)
and 7.3 KB RSS (IVF: its lists grow by doubling) at 1M entries with float16 prompts.

Not thread-safe. Saves and loads of one directory from several processes take turns (a file lock).
"""
from __future__ import annotations

import itertools
import json
import logging
import operator
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import torch

from recipe.retrieval.key_index import DEFAULT_INDEX, DEFAULT_NPROBE, INDEX_KINDS, IndexKind, KeyIndex
from recipe.retrieval.prompt_store import PromptStore
from recipe.retrieval.repository_format import (  # noqa: F401  (errors and file names re-exported)
    ERRORS,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    PROMPT_DTYPES,
    TENSOR_FILE,
    CheckedTensorFile,
    DuplicateIdError,
    RepositoryCorruptError,
    RepositoryError,
    RepositoryInputError,
    RepositoryMismatchError,
    RepositoryNotFoundError,
    UnknownIdError,
    as_array,
    as_id,
    check_info,
    describe,
    is_int,
    preview,
    read_meta,
)
from recipe.retrieval.tensor_file import Stream as _Stream
from recipe.retrieval.tensor_file import write as write_tensor_file
from recipe.storage import open_folder, save_folder, write_json

logger = logging.getLogger(__name__)

IO_CHUNK = 16_384  # entries read or written at a time by save/load


class KnowledgeRepository:
    """Keys in a :class:`KeyIndex` (exact flat or IVF), prompts in a :class:`PromptStore`.

    Invariants: ``ids()`` lists every entry once in insertion order, which is also the row order of
    saved files and, for a flat index, FAISS's storage order (flat removal keeps it), so a save/load
    round trip reproduces search results, ties included. ``add`` only buffers keys; the buffer goes
    into FAISS in one batch before any search, removal, ``keys()`` or save, and whenever it holds
    ``flush_size`` keys: adding one edit at a time stays cheap and every entry is searchable at once.

    ``index``: "flat" searches exactly; "ivf" and "auto" switch to an approximate IVF index from
    ``IVF_MIN_KEYS`` and ``AUTO_IVF_KEYS`` entries on, training and retraining it as the repository
    grows (see ``recipe.retrieval.key_index``); ``nprobe`` IVF lists are scanned per query.

    BLAS: faiss 1.15 scans with SIMD loops while queries x D < ``faiss.cvar.distance_compute_blas_threshold``
    (default 128000, i.e. 250 queries at D = 512) and calls sgemm above. Measured at 100k x 512 keys on
    one core: one query 19 ms scanned, 54 ms with BLAS; 64 queries 14 ms/query scanned, 2-3 ms/query
    with BLAS; the crossover is 3-6 queries. Before each search the (process-global) threshold is
    set to ``blas_min_queries * D`` (None: left alone).

    GPU (``use_gpu``, default: whether faiss sees a GPU): searches of a flat index run on a GPU copy
    whose row -> id map stays on the CPU; "auto" then stays flat. Adds are appended to both; a
    removal drops the GPU copy, rebuilt from the CPU index (the source of truth) at the next search.
    """

    def __init__(
        self,
        key_dim: int,
        prompt_shape: tuple[int, int],
        *,
        info: dict | None = None,
        use_gpu: bool | None = None,
        prompt_dtype: str = "float32",  # prompts in memory and on disk: float32 (bit-exact), float16 or bfloat16
        flush_size: int = 1024,  # buffered keys that trigger a flush into FAISS
        blas_min_queries: int | None = 4,  # batches from this size search with BLAS; None: leave faiss as is
        index: IndexKind = DEFAULT_INDEX,  # "flat" (exact), "ivf" or "auto" (flat below AUTO_IVF_KEYS entries)
        nprobe: int = DEFAULT_NPROBE,  # IVF lists scanned per query
    ) -> None:
        prompt_shape = tuple(prompt_shape)
        if not is_int(key_dim) or key_dim <= 0 or not is_int(flush_size) or flush_size <= 0:
            raise RepositoryInputError(f"key_dim and flush_size must be positive ints, got {key_dim!r}, {flush_size!r}")
        if len(prompt_shape) != 2 or not all(is_int(s) and s > 0 for s in prompt_shape):
            raise RepositoryInputError(f"prompt_shape must be (l, H), positive ints, got {prompt_shape!r}")
        if prompt_dtype not in PROMPT_DTYPES:
            raise RepositoryInputError(f"prompt_dtype must be one of {sorted(PROMPT_DTYPES)}, got {prompt_dtype!r}")
        if index not in INDEX_KINDS or not is_int(nprobe) or nprobe <= 0:
            raise RepositoryInputError(f"index must be one of {INDEX_KINDS} and nprobe a positive int, "
                                       f"got {index!r}, {nprobe!r}")
        if blas_min_queries is not None and (not is_int(blas_min_queries) or blas_min_queries <= 0):
            raise RepositoryInputError(f"blas_min_queries must be a positive int or None, got {blas_min_queries!r}")
        if not isinstance({} if info is None else info, dict):
            raise RepositoryInputError(f"info must be a dict, got {type(info).__name__}")
        try:  # a normalised copy: tuples become lists, exactly as they will be saved
            self.info: dict = json.loads(json.dumps({} if info is None else info, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise RepositoryInputError(f"info must be JSON-able: {exc}") from exc
        self.key_dim, self.prompt_shape = int(key_dim), (int(prompt_shape[0]), int(prompt_shape[1]))
        self.prompt_dtype, self.flush_size, self.index_kind = prompt_dtype, int(flush_size), index
        self._blas_threshold = None if blas_min_queries is None else int(blas_min_queries) * self.key_dim
        n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.uses_gpu = n_gpus > 0 if use_gpu is None else bool(use_gpu)
        if self.uses_gpu and (n_gpus == 0 or not hasattr(faiss, "StandardGpuResources")):
            raise RepositoryError("use_gpu=True, but faiss sees no GPU (install faiss-gpu-cu12 instead of faiss-cpu)")
        gpu_res = faiss.StandardGpuResources() if self.uses_gpu else None
        self._index = KeyIndex(self.key_dim, index, nprobe=int(nprobe), gpu_resources=gpu_res)
        self._prompts = PromptStore(self.prompt_shape, PROMPT_DTYPES[prompt_dtype])  # id -> (l, H), insertion order
        self._pending_ids: list[np.ndarray] = []  # chunks of (n,) int64 not yet in FAISS
        self._pending_keys: list[np.ndarray] = []  # chunks of (n, D) float32
        self._n_pending = 0
        self._next_id = 0  # greater than every id ever added

    def __len__(self) -> int:
        return len(self._prompts)

    def __contains__(self, edit_id: object) -> bool:
        try:
            return operator.index(edit_id) in self._prompts  # type: ignore[arg-type]
        except TypeError:
            return False

    @property
    def nprobe(self) -> int:
        return self._index.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if not is_int(value) or value <= 0:
            raise RepositoryInputError(f"nprobe must be a positive int, got {value!r}")
        self._index.set_nprobe(value)

    @property
    def is_approximate(self) -> bool:
        """Whether searches currently go through the IVF (approximate) rather than the flat index."""
        self._flush()
        return self._index.is_ivf

    def ids(self) -> list[int]:
        """Every id, in insertion order (the order of saved files and of a flat index's storage)."""
        return self._prompts.ids()

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``keys`` (FAISS, estimated), ``prompts`` (blocks, exact) and ``total``."""
        self._flush()
        keys, prompts = self._index.nbytes(), self._prompts.nbytes
        return {"keys": keys, "prompts": prompts, "total": keys + prompts}

    def add(self, keys: Any, prompts: Any, ids: Sequence[int] | None = None) -> list[int]:
        """Add N entries: keys (N, D), prompts (N, l, H); numpy or torch, any float dtype, finite.

        ``ids`` must be N distinct non-negative ints not in the repository; by default the next N
        never-used ids are assigned. Returns the ids. On any error nothing is added.
        """
        keys_np = as_array(keys, "keys", (None, self.key_dim), copy=True)  # (N, D) float32
        n = keys_np.shape[0]
        prompts_t = torch.from_numpy(as_array(prompts, "prompts", (n, *self.prompt_shape)))  # (N, l, H) float32
        stored = prompts_t.to(self._prompts.dtype)  # (N, l, H), a view when float32
        if self.prompt_dtype != "float32" and not torch.isfinite(stored).all():
            raise RepositoryInputError(f"prompts overflow {self.prompt_dtype}; use prompt_dtype='float32'")
        new_ids = self._new_ids(ids, n)
        if n == 0:
            return []
        self._pending_ids.append(np.asarray(new_ids, dtype=np.int64))
        self._pending_keys.append(keys_np)
        self._n_pending += n
        self._prompts.add(new_ids, stored)  # copies into the store's own blocks
        self._next_id = max(self._next_id, max(new_ids) + 1)
        if self._n_pending >= self.flush_size:
            self._flush()
        return new_ids

    def remove(self, ids: Iterable[int]) -> None:
        """Remove entries by id. Every id must exist; otherwise UnknownIdError and nothing changes."""
        wanted = sorted({as_id(i) for i in ids})
        self._check_known(wanted, "remove")
        if not wanted:
            return
        self._flush()  # buffered keys go into FAISS first: one place to remove from
        removed = self._index.remove(np.asarray(wanted, dtype=np.int64))
        if removed != len(wanted):  # FAISS and the prompt store disagree: a bug, not bad input
            raise RuntimeError(f"FAISS removed {removed} of {len(wanted)} ids; repository is inconsistent")
        self._prompts.remove(wanted)
        self._rebalance()

    def search(self, queries: Any, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-k entries by inner product for queries (B, D), numpy or torch, any float dtype.

        Returns scores (B, k) float32 and ids (B, k) int64, best first. Slots beyond the number of
        entries (all of them when the repository is empty) hold id -1 and score -inf; an IVF index
        can also leave slots empty when the lists it scans hold fewer than k entries.
        """
        q = as_array(queries, "queries", (None, self.key_dim))  # (B, D) float32
        if not is_int(k) or k < 1:
            raise RepositoryInputError(f"k must be a positive int, got {k!r}")
        self._flush()
        if len(self) == 0 or q.shape[0] == 0:
            return np.full((q.shape[0], k), -np.inf, np.float32), np.full((q.shape[0], k), -1, np.int64)
        if self._blas_threshold is not None:
            faiss.cvar.distance_compute_blas_threshold = self._blas_threshold
        scores, ids = self._index.search(q, k)  # (B, k) each
        scores, ids = np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)
        scores[ids < 0] = -np.inf  # faiss pads with -FLT_MAX
        return scores, ids

    def get_prompts(self, ids: Iterable[int]) -> torch.Tensor:
        """The prompts of ``ids``, stacked in the given order: (n, l, H) float32, a copy."""
        wanted = [as_id(i) for i in ids]
        self._check_known(wanted, "get prompts of")
        if not wanted:
            return torch.empty((0, *self.prompt_shape), dtype=torch.float32)
        return self._prompts.get(wanted).float()  # (n, l, H)

    def keys(self, ids: Iterable[int] | None = None) -> np.ndarray:
        """The keys of ``ids`` (default: all, in ``ids()`` order): (n, D) float32, a copy."""
        self._flush()
        if ids is None:
            return self._index.keys_in_order(self._ordered_ids())
        wanted = [as_id(i) for i in ids]
        self._check_known(wanted, "get keys of")
        if not wanted:
            return np.empty((0, self.key_dim), dtype=np.float32)
        return self._index.reconstruct(np.asarray(wanted, dtype=np.int64))  # (n, D)

    def save(self, directory: str | os.PathLike, *, info: Mapping[str, Any] | None = None,
             extra: tuple[Sequence[int], np.ndarray, torch.Tensor] | None = None) -> Path:
        """Write the repository to ``directory`` atomically (``recipe.storage``); returns its absolute path.

        Files: ``tensors.safetensors`` with ids (N,) int64, keys (N, D) float32 and prompts
        (N, l, H) in ``prompt_dtype``, rows in ``ids()`` order, plus for an IVF ivf_centroids
        (nlist, D) float32 and ivf_lists (N,) int64 (the list of each row), streamed in chunks so
        that saving needs no second copy of the prompts; ``repository.json`` with key_dim,
        prompt_shape, prompt_dtype, count, next_id, index, nprobe, ivf_trained_at and info;
        ``manifest.json`` with the format, its version and the sha256 of both files. No pickle.
        A crash at any point leaves the previous repository (or the new one) loadable; another
        process saving or loading the same directory waits for this save.
        """
        return self._writer(False, info, extra)(directory)

    def snapshot(self, *, info: Mapping[str, Any] | None = None,
                 extra: tuple[Sequence[int], np.ndarray, torch.Tensor] | None = None) -> Callable[[Any], Path]:
        """``writer(directory)`` saving the repository as it is at this call, from any thread, while this
        one goes on changing: what ``save`` would have written now. Cheap: the keys are copied (one
        N x D float32 copy), the prompts are shared block by block until this repository writes into
        one (``PromptStore.fork``). ``info`` replaces the saved info; ``extra`` = (ids, keys (n, D),
        prompts (n, l, H)) are saved after the entries (then as a flat index: a loaded IVF is retrained)."""
        return self._writer(True, info, extra)

    def _writer(self, frozen: bool, info: Mapping[str, Any] | None,
                extra: tuple[Sequence[int], np.ndarray, torch.Tensor] | None) -> Callable[[Any], Path]:
        self._flush()
        ordered = self._ordered_ids()  # (N,) int64, the entries' ids
        flat_ids = self._index.flat_ids()
        if self._index.ntotal != len(ordered) or (flat_ids is not None and not np.array_equal(flat_ids, ordered)):
            raise RuntimeError("FAISS and the prompt store disagree on the ids; refusing to save")
        if frozen:
            keys = self._index.keys_in_order(ordered)  # (N, D), a copy
            key_chunks = lambda: (torch.from_numpy(keys[s:s + IO_CHUNK]) for s in range(0, len(ordered), IO_CHUNK))  # noqa: E731
            prompt_chunks = self._prompts.fork().chunks
        else:
            key_chunks = lambda: (torch.from_numpy(c) for c in self._index.key_chunks(ordered, IO_CHUNK))  # noqa: E731
            prompt_chunks = self._prompts.chunks
        ids, next_id, ivf = ordered, self._next_id, None
        if extra is not None and len(extra[0]):
            extra_ids = np.asarray(extra[0], dtype=np.int64)
            extra_keys = np.ascontiguousarray(extra[1], dtype=np.float32)
            extra_prompts = torch.as_tensor(extra[2]).to(self._prompts.dtype)
            base_keys, base_prompts = key_chunks, prompt_chunks
            key_chunks = lambda: itertools.chain(base_keys(), [torch.from_numpy(extra_keys)])  # noqa: E731
            prompt_chunks = lambda c: itertools.chain(base_prompts(c), [extra_prompts])  # noqa: E731
            ids, next_id = np.concatenate([ordered, extra_ids]), max(next_id, int(extra_ids.max()) + 1)
        elif self._index.is_ivf:
            ivf = self._index.ivf_state(ordered)  # (centroids, list of each key)
        n, (l, h) = len(ids), self.prompt_shape
        tensors: dict[str, torch.Tensor | _Stream] = {"ids": torch.from_numpy(ids)}
        if ivf is not None:
            tensors.update(ivf_centroids=torch.from_numpy(ivf[0]), ivf_lists=torch.from_numpy(ivf[1]))
        tensors["keys"] = _Stream(torch.float32, (n, self.key_dim), key_chunks)
        tensors["prompts"] = _Stream(self._prompts.dtype, (n, l, h), lambda: prompt_chunks(IO_CHUNK))
        meta = {"key_dim": self.key_dim, "prompt_shape": list(self.prompt_shape), "prompt_dtype": self.prompt_dtype,
                "count": n, "next_id": next_id, "index": self.index_kind, "nprobe": self.nprobe,
                "ivf_trained_at": self._index.trained_at if ivf is not None else 0,
                "info": json.loads(json.dumps(self.info)) if info is None else dict(info)}

        def write_into(work: Path) -> dict[str, str]:
            digest = _write_tensors(work / TENSOR_FILE, tensors)
            _write_json(work / META_FILE, meta)
            return {TENSOR_FILE: digest}

        def write(directory: str | os.PathLike) -> Path:
            target = save_folder(directory, write_into, format_name=FORMAT_NAME, format_version=FORMAT_VERSION)
            logger.info("saved %d repository entries to %s", n, target)
            return target

        return write

    @classmethod
    def load(cls, directory: str | os.PathLike, expect_info: Mapping[str, Any] | None = None, *,
             use_gpu: bool | None = None, index: IndexKind | None = None,
             nprobe: int | None = None) -> KnowledgeRepository:
        """Load what ``save`` wrote, verified before anything is read (``recipe.storage``).

        Checks, in order: the manifest and the sha256 of every file, the JSON fields, shapes and
        counts, then every value (ids unique and non-negative, next_id above them, keys and
        prompts finite, IVF lists in range). ``index`` and ``nprobe`` default to the saved ones; a
        saved IVF is restored as it was (centroids and lists), not retrained. Every key of
        ``expect_info`` must be in the saved info with an equal value, else RepositoryMismatchError
        naming the key and both values. A missing repository raises RepositoryNotFoundError, a
        damaged one RepositoryCorruptError naming the file. Entries are read in chunks: loading
        needs no second copy of them.
        """
        with open_folder(directory, format_name=FORMAT_NAME, versions=(FORMAT_VERSION,), errors=ERRORS) as folder:
            meta = read_meta(folder)
            if expect_info is not None:
                check_info(meta["info"], expect_info, folder.path)
            repo = cls(meta["key_dim"], meta["prompt_shape"], info=meta["info"], use_gpu=use_gpu,
                       prompt_dtype=meta["prompt_dtype"], index=index or meta["index"], nprobe=nprobe or meta["nprobe"])
            with CheckedTensorFile(folder.file(TENSOR_FILE), meta) as tensors:
                repo._fill(tensors, meta["ivf_trained_at"], meta["next_id"])
        logger.info("loaded %d repository entries from %s", len(repo), folder.path)
        return repo

    def _fill(self, tensors: CheckedTensorFile, trained_at: int, next_id: int) -> None:
        """Load every entry of a checked tensor file into this empty repository, chunk by chunk."""
        ids = tensors.read("ids").numpy()  # (N,) int64
        if len(ids) and (ids.min() < 0 or len(np.unique(ids)) != len(ids)):
            raise RepositoryCorruptError(f"{tensors.path}: ids are negative or repeated")
        if len(ids) and next_id <= ids.max():
            raise RepositoryCorruptError(f"{tensors.path.parent / META_FILE}: next_id {next_id} is not above the "
                                         f"largest saved id {int(ids.max())}: later adds would reuse ids")
        lists = None
        if trained_at and self._index.ivf_min_keys is not None:  # restore the saved IVF rather than retrain
            self._index.restore_ivf(tensors.read("ivf_centroids").numpy(), trained_at)
            lists = tensors.read("ivf_lists").numpy()  # (N,)
        for s in range(0, len(ids), IO_CHUNK):
            chunk = ids[s:s + IO_CHUNK]
            keys = tensors.read("keys", s, s + len(chunk)).numpy()  # (c, D)
            prompts = tensors.read("prompts", s, s + len(chunk))  # (c, l, H) in prompt_dtype
            if not (np.isfinite(keys).all() and torch.isfinite(prompts).all()):
                raise RepositoryCorruptError(f"{tensors.path}: keys or prompts contain NaN or inf")
            try:
                if lists is None:
                    self._index.add(keys, chunk)
                else:
                    self._index.add_assigned(keys, chunk, lists[s:s + len(chunk)])
            except (ValueError, RuntimeError) as exc:
                raise RepositoryCorruptError(f"{tensors.path}: invalid IVF lists: {exc}") from exc
            self._prompts.add(chunk.tolist(), prompts)
        self._next_id = int(next_id)
        self._rebalance()

    def _ordered_ids(self) -> np.ndarray:
        return np.fromiter(self._prompts.ids(), dtype=np.int64, count=len(self._prompts))  # (N,)

    def _rebalance(self) -> None:
        """Train, retrain or drop the IVF when the size calls for it (see KeyIndex.wanted_rebuild)."""
        train_on = self._index.wanted_rebuild()
        if train_on is not None:
            self._index.rebuild(self._ordered_ids(), train_on)

    def _new_ids(self, ids: Sequence[int] | None, n: int) -> list[int]:
        if ids is None:
            return list(range(self._next_id, self._next_id + n))
        new_ids = [as_id(i) for i in ids]
        if len(new_ids) != n:
            raise RepositoryInputError(f"got {len(new_ids)} ids for {n} keys")
        repeated = sorted(i for i, count in Counter(new_ids).items() if count > 1)
        if repeated:
            raise DuplicateIdError(f"ids repeated within one add: {preview(repeated)}")
        existing = sorted(i for i in new_ids if i in self._prompts)
        if existing:
            raise DuplicateIdError(f"ids already in the repository: {preview(existing)}")
        return new_ids

    def _check_known(self, ids: Sequence[int], action: str) -> None:
        unknown = sorted({i for i in ids if i not in self._prompts})
        if unknown:
            raise UnknownIdError(f"cannot {action} ids not in the repository: {preview(unknown)}; nothing changed")

    def _flush(self) -> None:
        """Move the buffered keys into FAISS in one batch, then retrain the index if its size calls for it."""
        if not self._n_pending:
            return
        ids, keys = np.concatenate(self._pending_ids), np.concatenate(self._pending_keys)  # (n,), (n, D)
        self._index.add(keys, ids)
        self._pending_ids, self._pending_keys, self._n_pending = [], [], 0
        self._rebalance()


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor | _Stream]) -> str:
    """Write the safetensors file (streamed, fsynced), return its sha256."""
    return write_tensor_file(path, tensors, {"format": FORMAT_NAME})


def _write_json(path: Path, meta: dict) -> None:
    write_json(path, meta)
