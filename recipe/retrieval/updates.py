"""Updates: a new edit that restates a stored fact with another answer supersedes the stored one.

**Restates** means exactly this: the two edits have different knowledge statements and either

1. the same *question key*, or
2. (only with ``RecipeConfig.supersede_margin`` set; off by default) the same subject, both named and equal
   after casefolding, and the new edit's question retrieves the stored entry as its top-1 among the
   entries in use with ``s(q, k) > s(q, r_s) + supersede_margin`` (the Knowledge Sentinel's test with
   a stricter margin), judged before the new edits are stored. This catches restatements worded
   differently ("Who designed X?" after "Which is the designer of X?"). The question key (:func:`question_key`) is the edit's prompt as ``EditRequest`` stores it
(Unicode-normalised, invisible characters dropped), casefolded, runs of whitespace made one space,
and trailing whitespace and punctuation (``. , ; : ! ? …`` and closing quotes) stripped. So "The
capital of France is" and "the capital of  France is:" restate each other, while "What is the
capital of France?" (another wording) or "The president of France is" (another question about the
same subject) do not. An edit whose whole statement is already stored is no restatement but a
duplicate (``RecipeConfig.duplicates``). Within one ``edit()`` call a later request restates an
earlier one the same way.

A superseded entry leaves the retrieval index (it can no longer be retrieved) but keeps its record,
key and prompt vectors here, on the :class:`Shelf`; its record names the edit that superseded it
(``EditRecord.superseded_by``). Removing that edit puts the older entry back into the index
(:func:`after_removal`); in a chain A -> B -> C, removing C brings back B, removing B and C brings
back A, and removing B alone leaves A superseded by C.

The margin 4.0 was chosen on validation pairs carved from training files (shipped checkpoint):
paraphrases of counterfact-train edits as restatements (0.647 caught at 4.0, 0.896 at 2.0) against
Relation_Specificity probes of ripple-recent-train and ripple-cf-train, other questions about the
same subject (0.000 and 0.006 wrongly caught at 4.0; 0.012 and 0.022 at 2.0). It stays off by default
(``None``: only the question key counts, with no false supersede measured on any set): among
CounterFact edits that share a subject but not a prompt, 0.192 cross 4.0, and while many of those are
the same fact reworded, some are different facts, and a wrong supersede hides a fact a user stored.
Edits loaded from saves written before question keys were stored have no key and never take part.
"""
from __future__ import annotations

import string
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from recipe.types import EditId

_TRAILING = string.punctuation.replace(")", "").replace("]", "") + "…¿¡«»“”‘’ \t"


def question_key(prompt: str) -> str:
    """The text two edits must share to restate one fact (module docstring): casefolded, single-spaced,
    without trailing whitespace or punctuation. Empty when the prompt is only punctuation."""
    return " ".join(prompt.casefold().split()).rstrip(_TRAILING)


class Shelf:
    """The keys and prompt vectors of superseded entries, out of the index until restored."""

    def __init__(self) -> None:
        self._entries: dict[EditId, tuple[np.ndarray, torch.Tensor]] = {}  # id -> key (D,), prompt (l, H)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._entries

    def ids(self) -> list[EditId]:
        return list(self._entries)

    def put(self, edit_id: EditId, key: np.ndarray, prompt: torch.Tensor) -> None:
        self._entries[edit_id] = (key, prompt)

    def take(self, edit_id: EditId) -> tuple[np.ndarray, torch.Tensor]:
        return self._entries.pop(edit_id)

    def discard(self, ids: Iterable[EditId]) -> None:
        for i in ids:
            self._entries.pop(i, None)

    def stacked(self) -> tuple[np.ndarray, torch.Tensor]:
        """Every shelved (key, prompt), in ``ids()`` order: (n, D), (n, l, H)."""
        keys, prompts = zip(*self._entries.values())
        return np.stack(keys), torch.stack(prompts)

    def clear(self) -> None:
        self._entries.clear()


def after_removal(superseded_by: Mapping[EditId, EditId], removed: set[EditId]) -> tuple[dict, list]:
    """What removing ``removed`` does to the superseded entries that stay (``superseded_by``: every
    superseded id -> the id that superseded it): ({id: its new superseder}, [ids to restore])."""
    relinked, restore = {}, []
    for old, newer in superseded_by.items():
        if old in removed or newer not in removed:
            continue
        while newer in removed:  # follow the chain past removed entries
            newer = superseded_by.get(newer)
        if newer is None:
            restore.append(old)
        else:
            relinked[old] = newer
    return relinked, restore
