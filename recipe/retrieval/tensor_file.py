"""Streaming reader and writer of safetensors files, for tensors too large to hold twice in memory.

The layout is the safetensors format (8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``, padded with spaces to 8 bytes, then the
raw little-endian data), so ``safetensors.torch.load_file`` reads what ``write`` writes. ``write``
takes each tensor either whole or as a :class:`Stream` of row chunks and hashes the bytes as it goes;
``TensorFile.read`` reads row ranges with plain file reads (no mmap, so untouched rows cost no memory).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
NAME_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
MAX_HEADER = 100 << 20


class TensorFileError(ValueError):
    """The file is not a readable safetensors file (bad header, offsets, dtype or size)."""


@dataclass(frozen=True)
class Stream:
    """A tensor given as row chunks: ``chunks()`` yields tensors whose concatenation is (shape, dtype)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)  # numpy has no bfloat16
    return memoryview(t.numpy()).cast("B")


def write(path: Path, tensors: dict[str, torch.Tensor | Stream], metadata: dict[str, str]) -> str:
    """Write ``tensors`` in order to ``path`` and fsync it; returns the sha256 of the file."""
    streams = {name: t if isinstance(t, Stream) else Stream(t.dtype, tuple(t.shape), lambda t=t: [t])
               for name, t in tensors.items()}
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, s in streams.items():
        size = _nbytes(s.dtype, s.shape)
        header[name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        def put(data: bytes | memoryview) -> None:
            f.write(data)
            digest.update(data)

        put(struct.pack("<Q", len(head)))
        put(head)
        for name, s in streams.items():
            written = 0
            for chunk in s.chunks():
                if chunk.dtype != s.dtype:
                    raise TypeError(f"{name}: a chunk of dtype {chunk.dtype}, expected {s.dtype}")
                data = _raw(chunk)
                put(data)
                written += len(data)
            if written != _nbytes(s.dtype, s.shape):
                raise RuntimeError(f"{name}: wrote {written} bytes, expected {_nbytes(s.dtype, s.shape)}")
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


class TensorFile:
    """Reads tensors, or row ranges of them, from a safetensors file. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "rb")
        try:
            self.entries = self._read_header()
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _ = self.entries[name]
        return dtype, shape

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor ``name`` (all rows by default), a fresh tensor."""
        dtype, shape, begin = self.entries[name]
        stop = shape[0] if stop is None else stop
        row = _nbytes(dtype, shape[1:])
        storage = torch.int16 if dtype in (torch.float16, torch.bfloat16) else dtype
        out = torch.empty((stop - start, *shape[1:]), dtype=storage)
        self._f.seek(begin + start * row)
        if self._f.readinto(memoryview(out.numpy()).cast("B")) != (stop - start) * row:
            raise TensorFileError(f"{self.path}: {name!r} ends early: the file is truncated")
        return out.view(dtype)

    def _read_header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
        size = os.fstat(self._f.fileno()).st_size
        raw = self._f.read(8)
        if len(raw) != 8 or not 0 < struct.unpack("<Q", raw)[0] <= min(MAX_HEADER, size - 8):
            raise TensorFileError(f"{self.path}: no valid safetensors header")
        n = struct.unpack("<Q", raw)[0]
        try:
            header = json.loads(self._f.read(n))
        except (UnicodeDecodeError, ValueError) as exc:
            raise TensorFileError(f"{self.path}: unreadable safetensors header: {exc}") from exc
        if not isinstance(header, dict):
            raise TensorFileError(f"{self.path}: the safetensors header is not a JSON object")
        entries, data_start, ends = {}, 8 + n, []
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = NAME_DTYPES[spec["dtype"]], tuple(int(s) for s in spec["shape"])
                begin, end = (int(o) for o in spec["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise TensorFileError(f"{self.path}: bad header entry {name!r}: {exc!r}") from exc
            if not shape or min(shape) < 0 or end - begin != _nbytes(dtype, shape) or begin < 0:
                raise TensorFileError(f"{self.path}: header entry {name!r} has inconsistent shape and offsets")
            entries[name] = (dtype, shape, data_start + begin)
            ends.append(data_start + end)
        if max(ends, default=data_start) != size:
            raise TensorFileError(f"{self.path}: {size} bytes, but the header describes {max(ends, default=data_start)}")
        return entries

