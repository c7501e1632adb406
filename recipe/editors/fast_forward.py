"""Fast paths for the weight editors' training loops: run only what a step changes.

A weight editor optimises something at one decoder layer (ROME/MEMIT's ``δ``, a T-Patcher patch, a
GRACE value) against a fixed batch of prompts and targets. Two shortcuts make each step cheaper
without changing its value:

- :class:`FrozenPrefix`: the columns before the first one a step changes are run once and kept as
  attention keys/values; each step runs only the remaining columns.
- :func:`forward_above`: where a vector added to the layer's MLP output reaches the residual stream
  unchanged (:func:`mlp_output_is_residual`, true for Llama, false for Gemma-3), a step adds it to
  the layer's output read once (:func:`layer_output`) and runs only the layers above.

Everything here takes the :class:`~recipe.lm.EditedLM` as an argument; the LM itself knows nothing
of these shortcuts.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from recipe.errors import RecipeError
from recipe.lm import EditedLM
from recipe.prefix_cache import cache_kwargs, model_cache

_RESIDUAL_FACTS = "_mlp_output_is_residual"  # per-LM memo: layer -> mlp_output_is_residual(layer)


@contextmanager
def layer_output(lm: EditedLM, layer: int) -> Iterator[dict[str, Tensor]]:
    """Within the block, each forward stores decoder ``layer``'s output (B, T, H) under ``"z"``."""
    got: dict[str, Tensor] = {}
    handle = lm.module(f"{lm.spec.layers}.{layer}").register_forward_hook(
        lambda module, args, out: got.__setitem__("z", out[0] if isinstance(out, tuple) else out))
    try:
        yield got
    finally:
        handle.remove()


def mlp_output_is_residual(lm: EditedLM, layer: int) -> bool:
    """Whether a vector added to ``layer``'s MLP output reaches the residual stream unchanged, as in
    Llama, so that adding it to the decoder layer's output is the same (the premise of
    :func:`forward_above`-based shortcuts in ROME/MEMIT, T-Patcher and GRACE). Gemma-3 normalises the
    MLP output: False. Checked once per layer and LM on a probe sentence, against a hook on the MLP,
    and remembered on the LM object (a fact of its architecture)."""
    facts = vars(lm).setdefault(_RESIDUAL_FACTS, {})
    if layer not in facts:
        embeds, mask, pos = lm.embed(["The capital of France is"], prefixes=None)
        add = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0)).to(embeds)
        mlp = lm.module(lm.spec.mlp_out.format(layer).rsplit(".", 1)[0])
        handle = mlp.register_forward_hook(lambda module, args, out: out + add)
        try:
            with torch.no_grad():
                want = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        finally:
            handle.remove()
        with torch.no_grad(), layer_output(lm, layer) as got:
            lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1)
            shortcut = forward_above(lm, layer, got["z"] + add, mask, pos).logits
        facts[layer] = bool(torch.allclose(want, shortcut, rtol=1e-4, atol=1e-3))
    return facts[layer]


def forward_above(lm: EditedLM, layer: int, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor,
                  logits_to_keep: int | Tensor = 0, cache=None):
    """The model's output when ``hidden`` (B, T, H) is the residual stream after decoder ``layer``:
    only the layers above it, the final norm and the head run.

    The decoder's layer list is swapped for its tail during the call (and restored), so the model's
    own forward builds the masks and rotary embeddings (:func:`mlp_output_is_residual` checks it
    against a full forward). ``cache``: keys/values of earlier positions for every layer
    (:class:`FrozenPrefix`)."""
    parent, name = lm.spec.layers.rsplit(".", 1)
    decoder, layers = lm.module(parent), lm.module(lm.spec.layers)
    if not 0 <= layer < len(layers):
        raise RecipeError(f"layer {layer} out of range for a model of {len(layers)} layers")
    setattr(decoder, name, nn.ModuleList(list(layers)[layer + 1:]))
    try:
        return lm.model(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                        logits_to_keep=logits_to_keep, use_cache=cache is not None, **cache_kwargs(lm.model, cache))
    finally:
        setattr(decoder, name, layers)


class FrozenPrefix:
    """Teacher-forced target log-probs of a fixed batch whose first ``split`` columns never change.

    The batch is ``texts`` + ``targets``, left-padded as in :meth:`EditedLM.target_logprobs`. Columns
    ``< split`` (left padding included) are run once without gradient and kept as attention keys/values;
    :meth:`logits` runs only columns ``split..T-1`` on top of them, so any change made at a column
    ``>= split`` (a hook adding ``δ`` there) is seen exactly as in a full forward. ``split = 0``: full
    forwards.

    ``above``: also read the output of decoder layer ``above`` at columns ``>= split`` once, so that
    ``logits(add=...)`` runs only the layers above it on that output plus ``add``
    (:func:`forward_above`): the same as a hook adding ``add`` to that layer's output.
    """

    def __init__(self, lm: EditedLM, texts: Sequence[str], targets: Sequence[str], split: int,
                 above: int | None = None):
        self.lm, self.t_ids = lm, [lm.target_ids(t) for t in targets]
        self.embeds, self.mask, self.pos = lm.embed(list(texts), None, list(targets))  # (B, T, H), (B, T), (B, T)
        self.split = max(0, min(split, self.embeds.shape[1] - max(len(t) for t in self.t_ids) - 1))
        self.kv, self.above, self.z = None, above, None
        with torch.no_grad():
            if self.split:
                out = lm.model(inputs_embeds=self.embeds[:, :self.split], attention_mask=self.mask[:, :self.split],
                               position_ids=self.pos[:, :self.split], use_cache=True, logits_to_keep=1)
                self.kv = [(layer.keys, layer.values) for layer in model_cache(out).layers]
            if above is not None:
                with layer_output(lm, above) as got:
                    self.logits()
                self.z = got["z"].detach()  # (B, T - split, H)

    def _cache(self):
        from transformers import DynamicCache

        return DynamicCache(list(self.kv), config=self.lm.model.config) if self.split else None  # fresh each call

    def logits(self, add: Tensor | None = None) -> Tensor:
        """Logits (B, L, V) of the columns that predict the target slots (L: the longest target;
        :meth:`EditedLM.target_columns`); ``add`` (B, T - split, H): added to the output of decoder layer
        ``above``, running only the layers above it."""
        s, keep = self.split, self.lm.target_columns(max(len(t) for t in self.t_ids))
        if add is not None:
            if self.z is None:
                raise RecipeError("FrozenPrefix.logits(add=...) needs the batch made with above=<layer>")
            return forward_above(self.lm, self.above, self.z + add, self.mask, self.pos[:, s:], keep,
                                 cache=self._cache()).logits
        return self.lm.model(inputs_embeds=self.embeds[:, s:], attention_mask=self.mask, position_ids=self.pos[:, s:],
                             use_cache=bool(s), logits_to_keep=keep, **cache_kwargs(self.lm.model, self._cache())).logits

    def logprobs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """As :meth:`EditedLM.target_logprobs` for the whole batch (differentiable through columns >= split)."""
        return self.lm.gold_logprobs(self.logits(), self.t_ids)
