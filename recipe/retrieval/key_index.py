"""KeyIndex: top-k inner-product search over (id, key) pairs with stable int64 ids, exact or IVF.

Kinds (``KnowledgeRepository(index=...)``):

- ``"flat"``: ``IndexIDMap2(IndexFlatIP(D))``, exact. Storage order is insertion order (removal keeps
  it), so ``keys()`` is one copy and ties break the same way after a save/load round trip.
- ``"ivf"``: ``IndexIVFFlat`` over an ``IndexFlatIP`` coarse quantizer with a hashtable direct map
  (reconstruct and O(k) removal by id). Approximate: a query scores only the keys of the ``nprobe``
  lists whose centroids score highest. It needs training data: below ``ivf_min_keys`` keys it stays
  an exact flat index; at ``ivf_min_keys`` it is trained on the keys it holds and rebuilt, and
  retrained/rebuilt whenever the count reaches ``RETRAIN_GROWTH`` times the count it was trained on
  (nlist ~ 4 sqrt(N), so lists stay ~sqrt(N)/4 to sqrt(N) long). Below half of ``ivf_min_keys`` it
  goes back to flat.
- ``"auto"``: ``"ivf"`` with ``ivf_min_keys = AUTO_IVF_KEYS``, i.e. exact below that size; always flat
  when searching on a GPU (a GPU scans 1M keys in about a millisecond).

Why these defaults (benchmarks/results/scale, D = 512, one thread on a shared core): an exact flat
scan costs ~13 ms per query in batches of 64 at 1M keys (~70 ms for one query), so "auto" switches to
the IVF at 262,144 keys, where flat is still ~3-4 ms per query batched and exact. nprobe = 64 gives
recall@1 ~0.99 against exact search at 100k-1M keys for ~1.5-3.5 ms per query.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Literal

import faiss
import numpy as np

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "auto"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "auto")
DEFAULT_INDEX: IndexKind = "auto"
IVF_MIN_KEYS = 1024  # "ivf": exact flat search below this many keys (too few to train on)
AUTO_IVF_KEYS = 262_144  # "auto": IVF from this many keys on (see above)
DEFAULT_NPROBE = 64  # IVF lists scanned per query
RETRAIN_GROWTH = 4  # retrain the IVF when the count reaches this multiple of its training count
TRAIN_POINTS_PER_LIST = 64  # k-means sample: this many keys per list (faiss warns below 39)
TRAIN_ITERATIONS = 10
CHUNK = 65_536  # keys moved at a time while rebuilding


def ivf_lists_for(n: int) -> int:
    """nlist for n training keys: the power of two nearest 4 sqrt(n), with >= 39 keys per list."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(nlist, 2 ** int(math.log2(max(1, n // 39)))))


class KeyIndex:
    """Keys (D,) float32 under int64 ids; ``search`` scores them by inner product (exact or IVF)."""

    def __init__(self, dim: int, kind: IndexKind = DEFAULT_INDEX, *, nprobe: int = DEFAULT_NPROBE,
                 ivf_min_keys: int | None = None, gpu_resources: Any = None, seed: int = 0) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {kind!r}")
        self.dim, self.kind, self.nprobe, self.seed = int(dim), kind, int(nprobe), seed
        default_min = {"flat": None, "ivf": IVF_MIN_KEYS, "auto": AUTO_IVF_KEYS}[kind]
        self.ivf_min_keys = default_min if ivf_min_keys is None or kind == "flat" else int(ivf_min_keys)
        if kind == "auto" and gpu_resources is not None:
            self.ivf_min_keys = None  # exact search on the GPU is fast enough at any size we can hold
        self._gpu_res = gpu_resources
        self._gpu_index: Any = None  # GPU copy of the flat index; None: rebuild at the next search
        self._gpu_ids = np.empty(0, dtype=np.int64)  # (rows,) id of each GPU row
        self._flat_storage = faiss.IndexFlatIP(self.dim)
        self._index: Any = faiss.IndexIDMap2(self._flat_storage)
        self._quantizer: Any = None  # the IVF's coarse quantizer (kept alive here: faiss does not own it)
        self.trained_at = 0  # key count the IVF was trained on; 0: flat

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_ivf(self) -> bool:
        return self.trained_at > 0

    @property
    def nlist(self) -> int:
        return int(self._index.nlist) if self.is_ivf else 0

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add keys (n, D) float32 C-contiguous under new ids (n,) int64 (unchecked)."""
        self._index.add_with_ids(keys, ids)
        if self._gpu_index is not None:
            self._gpu_index.add(keys)
            self._gpu_ids = np.concatenate([self._gpu_ids, ids])

    def remove(self, ids: np.ndarray) -> int:
        """Remove the (known, distinct) ids (n,) int64; returns how many FAISS removed."""
        self._gpu_index = None
        if self.is_ivf:  # the hashtable direct map removes in O(n), but only through an IDSelectorArray
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            return int(self._index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))))
        return int(self._index.remove_ids(ids))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B, k) and ids (B, k) of the best keys for queries (B, D); -1 pads missing slots."""
        if self._gpu_res is not None and not self.is_ivf:
            return self._gpu_search(queries, k)
        return self._index.search(queries, k)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Keys (n, D) of the (known) ids (n,) int64."""
        return self._index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def keys_in_order(self, ordered_ids: np.ndarray) -> np.ndarray:
        """All keys (N, D), row i the key of ``ordered_ids[i]`` (the repository's insertion order)."""
        if not self.is_ivf:  # flat storage order is insertion order
            return faiss.vector_to_array(self._flat_storage.codes).view(np.float32).reshape(-1, self.dim)
        return self.reconstruct(ordered_ids)

    def flat_ids(self) -> np.ndarray | None:
        """Ids in flat storage order, or None for an IVF (storage order is then per list)."""
        return None if self.is_ivf else faiss.vector_to_array(self._index.id_map)

    def nbytes(self) -> int:
        """Bytes FAISS holds for the keys, ids and (IVF) centroids and direct map (estimate)."""
        n = self.ntotal
        if not self.is_ivf:
            return n * (4 * self.dim + 8 + 40)  # codes, id_map, rev_map (an unordered_map: ~40 B/entry)
        return n * (4 * self.dim + 8 + 40) + self.nlist * 4 * self.dim  # codes, ids, hashtable, centroids

    # ---- kind switching and (re)training -------------------------------------------------------
    def wanted_rebuild(self) -> int | None:
        """None when the index suits its size; else 0 (back to flat) or the count to train an IVF on."""
        n, threshold = self.ntotal, self.ivf_min_keys
        if threshold is None or (self.is_ivf and n < threshold // 2):
            return 0 if self.is_ivf else None
        if n >= threshold and (not self.is_ivf or n >= RETRAIN_GROWTH * self.trained_at):
            return n
        return None

    def rebuild(self, ordered_ids: np.ndarray, train_on: int) -> None:
        """Move every key into a fresh flat index (train_on == 0) or an IVF trained on a sample of them.

        ``ordered_ids`` (N,) int64 lists every id in the repository's insertion order; a flat index
        gets its keys in that order.
        """
        old = self._index
        if train_on == 0:
            logger.info("key index: %d keys back to an exact flat index", len(ordered_ids))
            self._flat_storage = faiss.IndexFlatIP(self.dim)
            self._index, self._quantizer, self.trained_at = faiss.IndexIDMap2(self._flat_storage), None, 0
        else:
            nlist = ivf_lists_for(train_on)
            rng = np.random.default_rng(self.seed)
            n_train = min(len(ordered_ids), TRAIN_POINTS_PER_LIST * nlist)
            sample = np.sort(rng.choice(len(ordered_ids), n_train, replace=False))
            logger.info("key index: training an IVF with %d lists on %d of %d keys", nlist, n_train, train_on)
            self._new_ivf(None, train_on, nlist=nlist, train_keys=old.reconstruct_batch(ordered_ids[sample]))
        self._gpu_index = None
        for s in range(0, len(ordered_ids), CHUNK):
            chunk = np.ascontiguousarray(ordered_ids[s:s + CHUNK])
            self._index.add_with_ids(old.reconstruct_batch(chunk), chunk)
        del old

    def key_chunks(self, ordered_ids: np.ndarray, chunk: int):
        """Every key in ``ordered_ids`` order, as (c, D) float32 arrays of at most ``chunk`` rows."""
        for s in range(0, len(ordered_ids), chunk):
            if self.is_ivf:
                yield self.reconstruct(ordered_ids[s:s + chunk])
            else:  # flat storage order is insertion order
                yield self._flat_storage.reconstruct_n(s, min(chunk, len(ordered_ids) - s))

    def ivf_state(self, ordered_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centroids (nlist, D) and the list of each key, (N,) int64 in ``ordered_ids`` order."""
        invlists = self._index.invlists
        per_list = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                    for i in range(self.nlist)]
        stored = np.concatenate(per_list) if per_list else np.empty(0, np.int64)  # (N,) ids, list by list
        list_of = np.repeat(np.arange(self.nlist, dtype=np.int64), [len(p) for p in per_list])  # (N,)
        order = np.argsort(stored)
        where = order[np.searchsorted(stored, ordered_ids, sorter=order)]
        return self._quantizer.reconstruct_n(0, self.nlist), list_of[where]

    def restore_ivf(self, centroids: np.ndarray, trained_at: int) -> None:
        """Become an empty IVF with these centroids (nlist, D), as trained on ``trained_at`` keys."""
        if self.ntotal:
            raise RuntimeError("restore_ivf needs an empty index")
        self._new_ivf(np.ascontiguousarray(centroids, dtype=np.float32), trained_at)

    def add_assigned(self, keys: np.ndarray, ids: np.ndarray, lists: np.ndarray) -> None:
        """IVF only: add keys (n, D) under ids (n,) to precomputed lists (n,) int64 (no assignment)."""
        keys, ids = np.ascontiguousarray(keys, np.float32), np.ascontiguousarray(ids, np.int64)
        lists = np.ascontiguousarray(lists, np.int64)
        if len(lists) and not (0 <= lists.min() and lists.max() < self.nlist):
            raise ValueError(f"IVF list numbers must lie in [0, {self.nlist})")
        self._index.add_core(len(ids), faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(lists))

    def _new_ivf(self, centroids: np.ndarray | None, trained_at: int, *, nlist: int = 0,
                 train_keys: np.ndarray | None = None) -> None:
        nlist = len(centroids) if centroids is not None else nlist
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if centroids is not None:
            quantizer.add(centroids)
            index.is_trained = True
        else:
            index.cp.niter, index.cp.seed = TRAIN_ITERATIONS, 1234 + self.seed
            index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
            index.train(train_keys)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = min(self.nprobe, nlist)
        self._index, self._quantizer, self._flat_storage, self.trained_at = index, quantizer, None, trained_at

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe = int(nprobe)
        if self.is_ivf:
            self._index.nprobe = min(self.nprobe, self.nlist)

    def _gpu_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._flat_storage)
            self._gpu_ids = faiss.vector_to_array(self._index.id_map)  # (N,) id of each row
        scores, rows = self._gpu_index.search(q, k)  # (B, k) each; rows are positions or -1
        return scores, np.where(rows >= 0, self._gpu_ids[np.clip(rows, 0, None)], -1)  # ids (B, k)
