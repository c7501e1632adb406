"""The key statistics of ROME, MEMIT and AlphaEdit: ``C = E[k kᵀ]``, the uncentred second moment of the
inputs of a layer's MLP output projection over a body of text (ROME §3.1, MEMIT eq. 14).

The text comes from a :class:`CovarianceSource` (WikiText for real runs, random tokens in tests); the
result is cached on disk per model / layer / sample count (:class:`KeyCovariance`). The first computation
for a model runs the LM over thousands of paragraphs (minutes on a CPU): it is announced in the log and
shown with a progress bar.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recipe.errors import RecipeError
from recipe.lm import EditedLM

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from a hook once the wanted activation is captured: the layers above never run."""


class CovarianceSource(Protocol):
    """Text for the key statistics: ``n_samples`` token-id sequences for ``lm``."""

    tag: str  # names the data in the cache file name ("wikitext", ...)
    cacheable: bool  # False: statistics live on the object only (cheap test sources)

    def samples(self, lm: EditedLM, n_samples: int) -> list[list[int]]: ...


@dataclass(frozen=True)
class WikiTextSource:
    """The first ``n_samples`` WikiText-2 paragraphs (``load_wikitext``), each cut to ``max_tokens``."""

    data_dir: str | Path | None = None  # None: $RECIPE_DATA_DIR
    split: str = "test"
    max_tokens: int = 128
    tag: str = "wikitext"
    cacheable: bool = True

    def samples(self, lm: EditedLM, n_samples: int) -> list[list[int]]:
        from recipe.data import load_wikitext

        paragraphs = load_wikitext(self.data_dir, self.split)[:n_samples]
        return [lm.tokenizer(p, add_special_tokens=False).input_ids[: self.max_tokens] for p in paragraphs]


@dataclass(frozen=True)
class RandomTokenSource:
    """Uniformly random token sequences under a fixed seed: for tests (never cached on disk)."""

    length: int = 16
    seed: int = 0
    tag: str = "random"
    cacheable: bool = False

    def samples(self, lm: EditedLM, n_samples: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, len(lm.tokenizer), (n_samples, self.length), generator=gen).tolist()


COVARIANCE_SOURCES: dict[str, Callable[[], CovarianceSource]] = {"wikitext": WikiTextSource,
                                                                  "random-tokens": RandomTokenSource}


class KeyCovariance:
    """``C = E[k kᵀ]`` of the ``mlp_out`` input per layer (float64, (d_in, d_in)), from ``source``.

    Cached under ``$RECIPE_CACHE/covariance/<model>/<layer>-<n_samples>.safetensors`` (sources other
    than WikiText add ``-<tag>``) and on the object; a second run reads the file and never asks the source.
    """

    def __init__(self, lm: EditedLM, source: CovarianceSource, n_samples: int, batch_size: int = 16):
        if n_samples < 1:
            raise RecipeError(f"n_cov_samples must be >= 1, got {n_samples}")
        self.lm, self.source, self.n_samples, self.batch_size = lm, source, n_samples, batch_size
        self._stats: dict[int, Tensor] = {}

    def path(self, layer: int) -> Path:
        from recipe.models import cache_dir

        tag = "" if self.source.tag == "wikitext" else f"-{self.source.tag}"
        model = self.lm.spec.name.replace("/", "--")
        return cache_dir() / "covariance" / model / f"{layer}-{self.n_samples}{tag}.safetensors"

    def __call__(self, layer: int) -> Tensor:
        if layer not in self._stats:
            self._stats[layer] = self._load_or_compute(layer)
        return self._stats[layer]

    def _load_or_compute(self, layer: int) -> Tensor:
        from safetensors.torch import load_file, save_file

        path = self.path(layer)
        if self.source.cacheable and path.exists():
            log.info("key covariance of layer %d from %s", layer, path)
            return load_file(path)["mom2"].to(self.lm.device)
        try:
            samples = self.source.samples(self.lm, self.n_samples)
        except RecipeError as err:
            raise RecipeError(f"no cached key covariance at {path} and its text is not available: {err}") from None
        mom2 = self._second_moment(layer, samples)
        if self.source.cacheable:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"mom2": mom2.cpu().contiguous()}, str(path),
                      metadata={"model": self.lm.spec.name, "layer": str(layer), "samples": str(len(samples))})
        return mom2

    @torch.no_grad()
    def _second_moment(self, layer: int, samples: list[list[int]]) -> Tensor:
        samples = [s for s in samples if s]
        if not samples:
            raise RecipeError(f"covariance source {self.source.tag!r} gave no tokens")
        module = self.lm.module(self.lm.spec.mlp_out.format(layer))
        total, count, got = None, 0, {}

        def hook(mod, args):
            got["x"] = args[0]
            raise _StopForward

        log.info("computing the key covariance of layer %d over %d %s samples, once for %s (cached in %s)",
                 layer, len(samples), self.source.tag, self.lm.spec.name,
                 self.path(layer) if self.source.cacheable else "memory")
        handle = module.register_forward_pre_hook(hook)
        try:
            for s in tqdm(range(0, len(samples), self.batch_size), desc=f"key covariance, layer {layer}",
                          unit="batch"):
                batch = samples[s:s + self.batch_size]
                T = max(len(b) for b in batch)
                ids = torch.full((len(batch), T), self.lm.tokenizer.pad_token_id, device=self.lm.device)
                mask = torch.zeros(len(batch), T, dtype=torch.long, device=self.lm.device)
                for r, b in enumerate(batch):
                    ids[r, :len(b)] = torch.tensor(b, device=self.lm.device)
                    mask[r, :len(b)] = 1
                try:
                    self.lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                keys = got["x"][mask.bool()].double()  # (N, d_in)
                total = keys.T @ keys if total is None else total + keys.T @ keys
                count += keys.shape[0]
        finally:
            handle.remove()
        log.info("key covariance of layer %d over %d samples, %d tokens", layer, len(samples), count)
        return total / count  # (d_in, d_in)
