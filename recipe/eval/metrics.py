"""The field's edit metrics, teacher-forced and under free generation.

- Reliability / generality: teacher-forced token accuracy of the expected answer after the edit
  prompt / a probe prompt (fraction of answer tokens whose argmax equals the label, given the gold
  prefix), from :meth:`EditedLM.score`.
- Locality: fraction of a locality probe's answer tokens whose argmax is unchanged from the unedited
  model (same teacher-forced inputs before and after).
- Free generation ("exact match"): greedy decoding of as many tokens as the longest accepted answer
  (+2); a hit when the normalised continuation equals an accepted answer or starts with it followed
  by a word boundary. For locality: the greedy continuation is identical to the unedited model's.
- Natural stop ("ns", WILD's protocol): greedy decoding until EOS or the end of the first sentence, at
  most ``NATURAL_STOP_CAP`` tokens; a hit when an accepted answer occurs in that sentence (at word
  boundaries) and the old answer, when known, does not (outside the new answer's own text). For
  locality: the sentence is identical to the unedited model's.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from recipe.lm import AUTO, EditedLM, TargetScore

_SPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")  # a full stop, ! or ? before a space or the end; a line break
NATURAL_STOP_CAP = 32  # most new tokens of a natural-stop generation


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text).strip().strip(".,;:!?\"'").strip().casefold()


def exact_match(generated: str, answers: Sequence[str]) -> bool:
    """True when the continuation equals one answer, or starts with it at a word boundary."""
    gen = normalise(generated)
    for ans in answers:
        a = normalise(ans)
        if a and (gen == a or (gen.startswith(a) and not gen[len(a)].isalnum())):
            return True
    return False


def locality_accuracy(before: TargetScore, after: TargetScore) -> float:
    """Fraction of positions whose argmax is unchanged (same teacher-forced input)."""
    same = sum(a == b for a, b in zip(before.predicted_ids, after.predicted_ids))
    return same / len(before.predicted_ids)


def generation_budget(lm: EditedLM, answers: Sequence[str]) -> int:
    """New tokens to generate for an exact-match check of ``answers``."""
    return max(len(lm.target_ids(a)) for a in answers) + 2


def generate_for(lm: EditedLM, prompts: Sequence[str], budgets: Sequence[int], bar=None) -> list[str]:
    """Greedy continuations, one budget per prompt (one ``lm.generate`` call per budget, which batches
    its prompts by length). ``bar``: a progress bar advanced after each batch."""
    out: list[str | None] = [None] * len(prompts)
    for budget in sorted(set(budgets)):
        idx = [i for i, b in enumerate(budgets) if b == budget]
        texts = lm.generate([prompts[i] for i in idx], max_new_tokens=budget,
                            on_batch=bar.update if bar is not None else None)
        for i, t in zip(idx, texts):
            out[i] = t
    return out  # type: ignore[return-value]


def first_sentence(text: str) -> str:
    """``text`` (leading whitespace dropped) up to the end of its first sentence: through the first ``.``,
    ``!`` or ``?`` that a space or the end follows, or up to the first line break; all of it when neither
    occurs. An abbreviation ends a sentence too ("U.S. Army" -> "U.S.")."""
    text = text.lstrip()
    end = _SENTENCE_END.search(text)
    return text if end is None else text[:end.end()].strip()


def _spans(text: str, answer: str) -> list[tuple[int, int]]:
    """Where the normalised ``answer`` occurs in the normalised ``text`` between word boundaries."""
    if not answer:
        return []
    return [m.span() for m in re.finditer(rf"(?<!\w){re.escape(answer)}(?!\w)", text)]


def natural_stop_hit(sentence: str, answers: Sequence[str], old_answers: Sequence[str] = ()) -> bool:
    """True when an accepted answer occurs in ``sentence`` and no old answer occurs outside it
    (an old answer inside the new one, "New York" in "New York City", does not count)."""
    text = normalise(sentence)
    spans = [sp for a in answers for sp in _spans(text, normalise(a))]
    if not spans:
        return False
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + " | " + text[end:]
    return not any(_spans(text, normalise(old)) for old in old_answers if old)


class _TextStop(StoppingCriteria):
    """Stops each row once its new text (leading whitespace dropped) matches ``pattern``; the batch ends
    when every row has."""

    def __init__(self, tokenizer, pattern: re.Pattern):
        self.tokenizer, self.pattern = tokenizer, pattern

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        # input_ids (B, n): the new tokens only (EditedLM generates from embeddings)
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return torch.tensor([self.pattern.search(t.lstrip()) is not None for t in texts], device=input_ids.device)


def generate_until(lm: EditedLM, prompts: Sequence[str], pattern: re.Pattern, max_new_tokens: int,
                   bar=None, prefixes=AUTO) -> list[str]:
    """Greedy continuations that stop at EOS, once their text matches ``pattern`` (the text may run a
    little past the match: cut it there) or after ``max_new_tokens``. ``bar``: advanced per batch.
    ``prefixes``: as :meth:`EditedLM.generate` (default: retrieved for each prompt)."""
    return lm.generate(prompts, max_new_tokens=max_new_tokens, eos_token_id=lm.tokenizer.eos_token_id, prefixes=prefixes,
                       stopping_criteria=StoppingCriteriaList([_TextStop(lm.tokenizer, pattern)]),
                       on_batch=bar.update if bar is not None else None)


def generate_natural(lm: EditedLM, prompts: Sequence[str], bar=None) -> list[str]:
    """The first sentence of each greedy continuation that stops at EOS, at a sentence end or after
    ``NATURAL_STOP_CAP`` tokens (:func:`first_sentence`). ``bar``: advanced after each batch."""
    return [first_sentence(t) for t in generate_until(lm, prompts, _SENTENCE_END, NATURAL_STOP_CAP, bar)]
