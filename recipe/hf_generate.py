"""``EditedLM.generate`` with the wrapped model's own signature: token ids in, what HF ``generate`` returns out.

``lm.generate(input_ids=..., attention_mask=..., **kwargs)`` returns what ``lm.model.generate`` returns
for the same call (ids of prompt + new tokens, or a ``GenerateOutput`` with ``return_dict_in_generate``),
with greedy search, sampling, beams, ``num_return_sequences``, logits processors, stopping criteria and
streamers, plus the edits:

1. Retrieval sees each row's prompt text: its real tokens (``attention_mask``) decoded; where the ids
   come from the tokenizer's chat template, only the last user message (:func:`query_text`). Generated
   tokens are never seen: prefixes are chosen once, before generation.
2. Rows without a prefix (no edits, a rejected query): when no row has one, the call goes to the stock
   ``generate`` unchanged, so the output is the base model's, bit for bit.
3. With a prefix, row ``i`` is laid out left-padded as ``[pad ; prefix_i ; prompt_i]``: ``inputs_embeds``
   carry the prefix's embeddings and the prompt's token embeddings, the attention mask covers both, and
   position ids (``cumsum(mask) - 1``, computed by ``generate`` from that mask) run over prefix and
   prompt as in :meth:`EditedLM.embed`. ``input_ids`` of the same width go along, so logits processors
   (``repetition_penalty``) and stopping criteria see the prompt's tokens and the new ones as they do
   on the base model: the prefix's columns repeat the row's first prompt token (a token the row already
   holds, so no penalty changes) and padding stays padding. The result is the caller's ids + the new
   tokens, the shape the base model returns; ``max_length``/``min_length`` keep counting the caller's ids.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from recipe.errors import RecipeError


def chat_markers(tokenizer) -> tuple[str, str] | None:
    """``(opening, closing)``: the chat template's text just before a user message and just after it,
    found by rendering marker messages; None without a chat template (or one that refuses them)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    a, b, c = "\x01user-a\x01", "\x01assistant-b\x01", "\x01user-c\x01"
    try:
        one = tokenizer.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True,
                                            tokenize=False)
        three = tokenizer.apply_chat_template(
            [{"role": "user", "content": a}, {"role": "assistant", "content": b}, {"role": "user", "content": c}],
            add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may reject any conversation; then no markup is stripped
        return None
    if a not in one or c not in three:
        return None
    opening = _common_suffix(one[:one.index(a)], three[three.index(b) + len(b):three.index(c)])
    closing = _common_prefix(one[one.index(a) + len(a):], three[three.index(c) + len(c):])
    return (opening, closing) if opening else None


def _common_suffix(x: str, y: str) -> str:
    n = 0
    while n < min(len(x), len(y)) and x[-1 - n] == y[-1 - n]:
        n += 1
    return x[len(x) - n:]


def _common_prefix(x: str, y: str) -> str:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return x[:n]


def query_text(tokenizer, ids: list[int], markers: tuple[str, str] | None) -> str:
    """The text retrieval sees for one prompt: the last user message where the ids hold chat markup,
    else the decoded ids without special tokens."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if markers is None or markers[0] not in text:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()
    opening, closing = markers
    content = text[text.rindex(opening) + len(opening):]
    if closing and closing in content:
        return content[:content.index(closing)].strip()
    for k in range(len(closing), 0, -1):  # a prompt without the generation prompt ends in part of it
        if content.endswith(closing[:k]):
            return content[:-k].strip()
    return content.strip()


def _check_ids(input_ids: Any, attention_mask: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise RecipeError(f"input_ids must be a (batch, length) tensor of token ids, got {shape}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise RecipeError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    if (attention_mask.sum(-1) == 0).any():
        raise RecipeError("a row of attention_mask is all zeros: every prompt needs at least one token")
    return input_ids, attention_mask


def _layout(lm, input_ids: Tensor, mask: Tensor, prefs: list[Tensor | None]) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded ``[pad ; prefix_i ; prompt_i]``: ids (B, T'), ``inputs_embeds`` (B, T', H), mask (B, T')."""
    embed = lm.model.get_input_embeddings()
    rows, pad = [], lm.tokenizer.pad_token_id
    for ids, m, pre in zip(input_ids, mask, prefs):
        real = ids[m.bool()]  # (n,) the prompt's tokens
        emb = embed(real)  # (n, H)
        l = 0 if pre is None else pre.shape[0]
        if pre is not None:
            emb = torch.cat([pre.to(device=emb.device, dtype=emb.dtype), emb], dim=0)  # (l + n, H)
        rows.append((torch.cat([real[:1].expand(l), real]), emb, bool((m == 0).any())))
    T = max(r[0].shape[0] for r in rows)
    ids_out = input_ids.new_full((len(rows), T), pad if pad is not None else 0)  # (B, T')
    embeds = rows[0][1].new_zeros(len(rows), T, rows[0][1].shape[1])  # (B, T', H)
    mask_out = torch.zeros_like(ids_out)  # (B, T')
    for i, (ids, emb, padded) in enumerate(rows):
        n = ids.shape[0]
        ids_out[i, T - n:], embeds[i, T - n:], mask_out[i, T - n:] = ids, emb, 1
        if not padded and n < T:  # the base row had no padding: no pad token for the penalties to see
            ids_out[i, :T - n] = ids[0]
    return ids_out, embeds, mask_out


class _PromptAsGiven:
    """A streamer proxy whose first ``put`` (the prompt) is the caller's ids, not the prefixed layout."""

    def __init__(self, streamer, input_ids: Tensor):
        self.streamer, self.input_ids = streamer, input_ids

    def put(self, value: Tensor) -> None:
        if self.input_ids is not None:
            value, self.input_ids = self.input_ids, None
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


def _lengths_of_caller(lm, kwargs: dict, extra: int) -> dict:
    """``max_length``/``min_length`` count the caller's ids: shift them by the ``extra`` prefix columns."""
    if "max_new_tokens" in kwargs and kwargs["max_new_tokens"] is not None:
        kwargs.pop("max_length", None)
    else:
        config = kwargs.get("generation_config") or lm.model.generation_config
        kwargs["max_length"] = (kwargs.get("max_length") or config.max_length) + extra
    min_length = kwargs.get("min_length") or (kwargs.get("generation_config") or lm.model.generation_config).min_length
    if min_length:
        kwargs["min_length"] = min_length + extra
    return kwargs


@torch.no_grad()
def generate_like_hf(lm, input_ids: Tensor, attention_mask: Tensor | None = None, prefixes="auto", **kwargs):
    """``lm.model.generate(input_ids=..., attention_mask=..., **kwargs)`` with the edits: see the module doc."""
    input_ids, mask = _check_ids(input_ids, attention_mask)
    markers = chat_markers(lm.tokenizer)
    queries = [query_text(lm.tokenizer, ids[m.bool()].tolist(), markers) for ids, m in zip(input_ids, mask)]
    prefs = lm._resolve_prefixes(queries, prefixes)
    if all(p is None for p in prefs):
        return lm.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    ids, embeds, new_mask = _layout(lm, input_ids, mask, prefs)
    extra = ids.shape[1] - input_ids.shape[1]
    kwargs = _lengths_of_caller(lm, dict(kwargs), extra)
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = _PromptAsGiven(kwargs["streamer"], input_ids)
    out = lm.model.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=new_mask, **kwargs)
    sequences = out if isinstance(out, Tensor) else out.sequences  # (B * k, T' + new)
    copies = sequences.shape[0] // input_ids.shape[0]  # num_return_sequences
    sequences = torch.cat([input_ids.repeat_interleave(copies, 0), sequences[:, ids.shape[1]:]], dim=1)
    if isinstance(out, Tensor):
        return sequences
    out.sequences = sequences
    return out
