"""Agreement with the unedited model: does editing change what the model says next on general text?

Over general prompts (the MMLU, CommonsenseQA and ANLI questions up to ``Answer:``, the SQuAD 2.0
questions after their context, the first words of WikiText paragraphs; built as
:mod:`recipe.eval.general_sets` builds them), two numbers:

- ``agreement``: the fraction of prompts whose greedy next token (argmax over the whole vocabulary) is
  the unedited model's;
- ``kl``: the mean KL(unedited || edited) of the next-token distribution. The unedited model's
  distribution is kept as its ``top_k`` most likely tokens plus one bucket for the rest of the
  vocabulary (a full distribution is ~50,000 numbers per prompt), so ``kl`` is the KL between these
  coarsened distributions: a lower bound on the full KL that is exact when the edit moves no
  probability inside the bucket (``tail_mass`` says how much the bucket holds).

Both see the prompts through :class:`EditedLM`, so a prefix editor (RECIPE) is measured as it is used.
The unedited record is computed once and can be kept in a file (:func:`unedited_record`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from recipe.errors import RecipeError
from recipe.eval.general_sets import Choice, Reading, _batches, choice_prompt, squad_prompt, wikitext_pair
from recipe.eval.resume import model_fingerprint
from recipe.lm import EditedLM

log = logging.getLogger(__name__)
RECORD_FILE = "unedited_next_token.pt"


def agreement_prompts(lm: EditedLM, items: dict[str, list], max_tokens: int = 512) -> list[tuple[str, str]]:
    """``(set, prompt)`` for every general item: the prompt its set's scorer reads the answer after."""
    out = []
    for name, its in items.items():
        for it in its:
            if isinstance(it, Choice):
                out.append((name, choice_prompt(lm, it, max_tokens)))
            elif isinstance(it, Reading):
                out.append((name, squad_prompt(lm, it, max_tokens)))
            else:
                out.append((name, wikitext_pair(lm, it, max_tokens)[0]))
    return out


@torch.no_grad()
def next_token_logprobs(lm: EditedLM, prompts: Sequence[str], progress: bool = False
                        ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(indices, log-probabilities (B, V))`` of the token after each prompt, batch by batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    for batch in _batches(order, lm.max_batch, "next-token agreement", progress):
        embeds, mask, pos = lm.embed([prompts[i] for i in batch])  # (B, T, H), (B, T), (B, T)
        logits = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                          use_cache=False).logits[:, -1].float()  # (B, V): left padding puts the prompt's end last
        yield batch, torch.log_softmax(logits, dim=-1)


def _coarse_kl(top_ids: torch.Tensor, top_logprobs: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the unedited top-k tokens plus one bucket for the rest; (B,) for (B, k), (B, k), (B, V)."""
    q_top = edited.gather(1, top_ids)  # (B, k)
    q_tail = edited.scatter(1, top_ids, float("-inf")).logsumexp(-1)  # (B,): log q of the bucket (-inf: empty)
    p_tail = (1 - top_logprobs.exp().sum(-1)).clamp(min=0)  # (B,)
    tail = torch.where((p_tail > 0) & q_tail.isfinite(), p_tail * (p_tail.clamp(min=1e-30).log() - q_tail), torch.zeros_like(p_tail))
    return (top_logprobs.exp() * (top_logprobs - q_top)).sum(-1) + tail


def record_next_tokens(lm: EditedLM, prompts: Sequence[str], top_k: int = 64, progress: bool = False) -> dict:
    """The model's next-token record: ``top_ids`` (N, k) and ``top_logprobs`` (N, k), most likely first."""
    if top_k < 1:
        raise RecipeError(f"top_k must be a positive number of tokens, got {top_k}")
    ids = torch.zeros(len(prompts), top_k, dtype=torch.long)
    logprobs = torch.zeros(len(prompts), top_k)
    for batch, lp in next_token_logprobs(lm, prompts, progress):
        top = lp.topk(top_k, dim=-1)
        ids[batch], logprobs[batch] = top.indices.cpu(), top.values.cpu()
    return {"top_ids": ids, "top_logprobs": logprobs}


def compare(lm: EditedLM, prompts: Sequence[tuple[str, str]], record: dict, progress: bool = False) -> dict:
    """``agreement``, ``kl`` and ``tail_mass`` of the model as it is now against the unedited ``record``,
    over all prompts and per set (``by_set``); ``n`` prompts."""
    same = torch.zeros(len(prompts))
    kl = torch.zeros(len(prompts))
    for batch, lp in next_token_logprobs(lm, [p for _, p in prompts], progress):
        top_ids, top_lp = record["top_ids"][batch].to(lp.device), record["top_logprobs"][batch].to(lp.device)
        same[batch] = (lp.argmax(-1) == top_ids[:, 0]).float().cpu()
        kl[batch] = _coarse_kl(top_ids, top_lp, lp).clamp(min=0).cpu()
    return _summary(prompts, same, kl, record)


def _summary(prompts: Sequence[tuple[str, str]], same: torch.Tensor, kl: torch.Tensor, record: dict) -> dict:
    def stats(idx: list[int]) -> dict:
        return {"agreement": float(same[idx].mean()), "kl": float(kl[idx].mean()), "n": len(idx)}

    sets = list(dict.fromkeys(name for name, _ in prompts))
    by_set = {s: stats([i for i, (name, _) in enumerate(prompts) if name == s]) for s in sets}
    tail = 1 - record["top_logprobs"].exp().sum(-1)  # (N,): probability outside the kept top-k
    return {**stats(list(range(len(prompts)))), "tail_mass": float(tail.mean()), "top_k": record["top_ids"].shape[1],
            "by_set": by_set}


def unedited_record(lm: EditedLM, prompts: Sequence[tuple[str, str]], top_k: int = 64,
                    path: str | Path | None = None, progress: bool = False) -> tuple[dict, bool]:
    """The model's record on ``prompts`` (call it before editing) and whether it was read from ``path``.

    With ``path`` the record is kept there with a key of the weights' fingerprint, the prompts and
    ``top_k``; a later call whose key matches reads it instead of running the model."""
    key = hashlib.sha256(json.dumps([model_fingerprint(lm), top_k, list(prompts)]).encode()).hexdigest()
    if path is not None and Path(path).exists():
        try:
            saved = torch.load(path, weights_only=True)
        except (OSError, RuntimeError) as err:
            log.warning("ignoring an unreadable unedited next-token record %s: %s", path, err)
            saved = {}
        if saved.get("key") == key:
            log.info("unedited next-token record read from %s", path)
            return {"top_ids": saved["top_ids"], "top_logprobs": saved["top_logprobs"]}, True
    record = record_next_tokens(lm, [p for _, p in prompts], top_k, progress)
    if path is not None:
        tmp = Path(path).with_suffix(".tmp")
        torch.save({"key": key, **record}, tmp)
        os.replace(tmp, path)  # a crash never leaves a half-written record
    return record, False


def identical(prompts: Sequence[tuple[str, str]], record: dict) -> dict:
    """:func:`compare` of the unedited model with its own record, without running it again."""
    return _summary(prompts, torch.ones(len(prompts)), torch.zeros(len(prompts)), record)
