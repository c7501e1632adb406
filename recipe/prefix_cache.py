"""Attention keys/values of prefixes, computed once and reused by ``EditedLM.generate()`` and ``score()``.

A prefix comes first in its row, so under causal attention its keys and values do not depend on the
prompt after it: they can be computed alone (positions ``0..l-1``, as in the inline layout) and handed
to ``generate`` as a ``DynamicCache`` (:func:`cache_kwargs`). The batch is then laid out as

    [pad ; prefix_i]  (cache, P positions)   +   [pad ; prompt_i]  (prefilled, T positions)

with one attention mask over both, so position ids (``cumsum(mask) - 1``) continue from ``l_i``. The
prefill sees ``B * T`` positions instead of ``B * (P + T)`` (most of which were padding when only some
rows carry a prefix), and a prefix retrieved again is not recomputed at all.

The cache is an LRU keyed by the embedded prefix's bytes (dtype, shape, values: the learned vectors
and the embeddings of its tokens), bounded in MB. It is dropped
whenever the model's parameters change (an in-place write bumps a parameter's version counter; a
swapped module changes the parameter set), so stale keys/values are never used.
"""
from __future__ import annotations

import hashlib
import inspect
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

LayerKV = tuple[Tensor, Tensor]  # keys, values of one layer: (heads, l, head_dim) each


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{keyword: cache}`` for the model's ``forward``/``generate``: ``cache`` where the installed
    transformers takes it (its old name ``past_key_values`` is deprecated there), else ``past_key_values``."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def model_cache(output):
    """The ``Cache`` a forward with ``use_cache=True`` returned, under either name."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def prefix_key(prefix: Tensor) -> bytes:
    """A content key: equal for equal prefixes, whatever tensor object holds them."""
    data = prefix.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes())
    return h.digest()


class PrefixKVCache:
    """LRU of per-prefix keys/values for one model; ``max_mb = 0`` keeps nothing between calls."""

    def __init__(self, model: nn.Module, max_mb: float = 256.0):
        if max_mb < 0:
            raise ValueError(f"max_mb must be >= 0, got {max_mb}")
        self.model = model
        self.max_bytes = int(max_mb * 2**20)
        self._entries: OrderedDict[bytes, tuple[list[LayerKV], int]] = OrderedDict()  # key -> (kv, bytes)
        self.nbytes = 0
        self._weights: int | None = None
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _check_weights(self) -> None:
        state = hash(tuple((id(p), p._version) for p in self.model.parameters()))
        if state != self._weights:
            self.clear()
            self._weights = state

    def get(self, prefixes: Sequence[Tensor]) -> list[list[LayerKV]]:
        """Per prefix, its keys/values for every layer (computed for the ones not cached)."""
        self._check_weights()
        keys = [prefix_key(p) for p in prefixes]
        found: dict[bytes, list[LayerKV]] = {}
        missing: dict[bytes, Tensor] = {}
        for k, p in zip(keys, prefixes):
            if k in self._entries:
                self._entries.move_to_end(k)
                found[k] = self._entries[k][0]
                self.hits += 1
            elif k not in missing:
                missing[k] = p
                self.misses += 1
        if missing:
            for k, kv in zip(missing, self._compute(list(missing.values()))):
                found[k] = kv
                self._store(k, kv)
        return [found[k] for k in keys]

    def batch(self, prefixes: Sequence[Tensor | None]):
        """A ``DynamicCache`` of one batch's prefixes (None: that row has none) and its mask (B, P)."""
        kv = iter(self.get([p for p in prefixes if p is not None]))
        return _batch_cache(self.model, [next(kv) if p is not None else None for p in prefixes])

    def _store(self, key: bytes, kv: list[LayerKV]) -> None:
        size = sum(t.numel() * t.element_size() for pair in kv for t in pair)
        if size > self.max_bytes:
            return
        self._entries[key] = (kv, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.nbytes -= old

    @torch.no_grad()
    def _compute(self, prefixes: list[Tensor]) -> list[list[LayerKV]]:
        """One right-padded forward pass over the prefixes alone, positions 0..l-1 per row."""
        lengths = [p.shape[0] for p in prefixes]
        L, H = max(lengths), prefixes[0].shape[1]
        weight = self.model.get_input_embeddings().weight
        embeds = weight.new_zeros(len(prefixes), L, H)  # (n, L, H)
        mask = torch.zeros(len(prefixes), L, dtype=torch.long, device=weight.device)  # (n, L)
        for i, p in enumerate(prefixes):
            embeds[i, :p.shape[0]] = p.to(device=weight.device, dtype=weight.dtype)
            mask[i, :p.shape[0]] = 1
        pos = torch.arange(L, device=weight.device).expand(len(prefixes), L)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in model_cache(out).layers]  # (n, h, L, d) each
        return [[(k[i, :, :n].clone(), v[i, :, :n].clone()) for k, v in layers] for i, n in enumerate(lengths)]


def _batch_cache(model: nn.Module, per_row: Sequence[list[LayerKV] | None]):
    """A ``DynamicCache`` holding each row's prefix keys/values left-padded to P, and its mask (B, P)."""
    from transformers import DynamicCache

    lengths = [kv[0][0].shape[1] if kv is not None else 0 for kv in per_row]
    P = max(lengths)
    ref = next(kv for kv in per_row if kv is not None)
    data = []
    for layer, (k0, v0) in enumerate(ref):
        keys = k0.new_zeros(len(per_row), k0.shape[0], P, k0.shape[2])  # (B, h, P, d)
        values = v0.new_zeros(len(per_row), v0.shape[0], P, v0.shape[2])
        for i, kv in enumerate(per_row):
            if kv is not None:
                keys[i, :, P - lengths[i]:] = kv[layer][0]
                values[i, :, P - lengths[i]:] = kv[layer][1]
        data.append((keys, values))
    mask = torch.zeros(len(per_row), P, dtype=torch.long, device=ref[0][0].device)
    for i, n in enumerate(lengths):
        mask[i, P - n:] = 1
    return DynamicCache(data, config=model.config), mask
