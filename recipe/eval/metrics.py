"""The field's edit metrics, teacher-forced and under free generation.

- Reliability / generality: teacher-forced token accuracy of the expected answer after the edit
  prompt / a probe prompt (fraction of answer tokens whose argmax equals the label, given the gold
  prefix), from :meth:`EditedLM.score`.
- Locality: fraction of a locality probe's answer tokens whose argmax is unchanged from the unedited
  model (same teacher-forced inputs before and after).
- Free generation ("exact match"): greedy decoding of as many tokens as the longest accepted answer
  (+2); a hit when the normalised continuation equals an accepted answer or starts with it followed
  by a word boundary. For locality: the greedy continuation is identical to the unedited model's.
"""
from __future__ import annotations

import re
from typing import Sequence

from recipe.lm import EditedLM, TargetScore

_SPACE = re.compile(r"\s+")


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
