"""PromptStore: the continuous prompts of a knowledge repository, id -> (l, H), in fixed-size blocks.

Why blocks: one tensor per edit costs ~700 bytes of object overhead on top of l x H x 4 bytes of data
(3 x 576 float32: 7.6 KB per edit, not 6.9 KB), and one growing tensor doubles its memory while it
reallocates. Rows live in blocks of ``block_rows`` rows (48 MiB each), allocated as needed and never
moved except by a compaction; rows freed by removals are reused by later adds. Blocks are big enough
for glibc to mmap them: the OS commits their pages only when rows are written, and they never sit
between short-lived buffers on the heap (8 MiB heap blocks left ~30% of the heap fragmented). Memory
is therefore ~``rows handed out x l x H x itemsize`` (at most the peak count since the last
compaction), plus ~100 bytes per id for the dict.

The dict ``id -> row`` keeps insertion order (Python dicts do), which is the order of ``ids()``.

``fork()`` gives a second store with the same contents for the cost of copying the dict: both share
the blocks until one of them writes into a shared block, which it first copies (copy on write). A
snapshot is saved from a fork on another thread while the original goes on changing.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

BLOCK_BYTES = 48 << 20  # above glibc's largest mmap threshold (32 MiB): blocks are mmapped, never heap


class PromptStore:
    """Prompts of shape ``shape`` (l, H) in ``dtype``; rows addressed by stable int ids."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, block_rows: int | None = None) -> None:
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), dtype
        row_bytes = self.shape[0] * self.shape[1] * torch.empty((), dtype=dtype).element_size()
        self.block_rows = int(block_rows or max(16, -(-BLOCK_BYTES // row_bytes)))
        self._row_bytes = row_bytes
        self._blocks: list[torch.Tensor] = []  # each (block_rows, l, H)
        self._rows: dict[int, int] = {}  # id -> row, insertion order
        self._free: list[int] = []  # rows freed by removals, reused first
        self._used = 0  # rows [0, _used) are live or free; later rows were never handed out
        self._shared: set[int] = set()  # blocks a fork also holds: copied before this store writes into them

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, edit_id: int) -> bool:
        return edit_id in self._rows

    def ids(self) -> list[int]:
        return list(self._rows)

    @property
    def capacity(self) -> int:
        return len(self._blocks) * self.block_rows

    @property
    def nbytes(self) -> int:
        """Bytes of the rows handed out so far (the touched part of the blocks; the dict not included)."""
        return self._used * self._row_bytes

    def add(self, ids: Sequence[int], prompts: torch.Tensor) -> None:
        """Store ``prompts`` (n, l, H), already in ``dtype``, under new ``ids`` (unchecked)."""
        n = len(ids)
        reused = [self._free.pop() for _ in range(min(n, len(self._free)))]
        fresh = range(self._used, self._used + n - len(reused))
        self._used = fresh.stop
        while self.capacity < self._used:
            self._blocks.append(torch.empty((self.block_rows, *self.shape), dtype=self.dtype))
        rows = np.asarray(reused + list(fresh), dtype=np.int64)
        self._scatter(rows, prompts)
        self._rows.update(zip(ids, rows.tolist()))

    def remove(self, ids: Sequence[int]) -> None:
        """Free the rows of ``ids`` (all known); compact when more than half the capacity is free."""
        self._free.extend(self._rows.pop(i) for i in ids)
        if len(self._free) > max(self.block_rows, self.capacity // 2):
            self._compact()

    def get(self, ids: Sequence[int]) -> torch.Tensor:
        """The prompts of ``ids`` (all known), in that order: (n, l, H) in ``dtype``, a copy."""
        return self._gather(np.fromiter((self._rows[i] for i in ids), dtype=np.int64, count=len(ids)))

    def chunks(self, chunk_rows: int) -> Iterator[torch.Tensor]:
        """Every prompt in ``ids()`` order, as copies of at most ``chunk_rows`` rows each."""
        rows = np.fromiter(self._rows.values(), dtype=np.int64, count=len(self._rows))
        for s in range(0, len(rows), chunk_rows):
            yield self._gather(rows[s:s + chunk_rows])

    def fork(self) -> PromptStore:
        """A store with the same prompts, sharing the blocks copy-on-write (no prompt is copied now)."""
        other = PromptStore(self.shape, self.dtype, self.block_rows)
        other._blocks, other._rows, other._free, other._used = list(self._blocks), dict(self._rows), list(self._free), self._used
        self._shared = set(range(len(self._blocks)))
        other._shared = set(self._shared)
        return other

    def _scatter(self, rows: np.ndarray, values: torch.Tensor) -> None:
        for part, block, offsets in self._by_block(rows):
            if block in self._shared:  # a fork reads this block: write into a copy of our own
                self._blocks[block] = self._blocks[block].clone()
                self._shared.discard(block)
            self._blocks[block][offsets] = values[part]

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        if len(rows) == 1:  # the hot path at inference: one retrieved prompt
            block, offset = divmod(int(rows[0]), self.block_rows)
            return self._blocks[block][offset:offset + 1].clone()  # (1, l, H)
        out = torch.empty((len(rows), *self.shape), dtype=self.dtype)  # (n, l, H)
        for part, block, offsets in self._by_block(rows):
            out[part] = self._blocks[block][offsets]
        return out

    def _by_block(self, rows: np.ndarray) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        """(positions in ``rows``, block, row offsets in the block) for each block that ``rows`` touch."""
        blocks, offsets = np.divmod(rows, self.block_rows)
        order = np.argsort(blocks, kind="stable")
        for part in np.split(order, np.flatnonzero(np.diff(blocks[order])) + 1):
            if len(part):
                yield torch.from_numpy(part), int(blocks[part[0]]), torch.from_numpy(offsets[part])

    def _compact(self) -> None:
        """Rewrite the live rows into fresh blocks, in ``ids()`` order; the old blocks are freed."""
        fresh = PromptStore(self.shape, self.dtype, self.block_rows)
        ids = self.ids()
        for s, chunk in zip(range(0, len(ids), self.block_rows), self.chunks(self.block_rows)):
            fresh.add(ids[s:s + self.block_rows], chunk)
        self._blocks, self._rows, self._free, self._used = fresh._blocks, fresh._rows, fresh._free, fresh._used
        self._shared = set()  # fresh blocks: no fork holds them
