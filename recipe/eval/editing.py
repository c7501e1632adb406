"""Apply edits one case at a time, on top of all earlier ones, and time each: the loop every
evaluation shares (the sequential benchmark, general ability, trajectories, cost)."""
from __future__ import annotations

import time
from typing import Callable, Sequence

from recipe.editors.base import Editor
from recipe.types import EditCase


def apply_edits(editor: Editor, cases: Sequence[EditCase], *, bar=None,
                after_each: Callable[[int, list[float]], None] | None = None) -> list[float]:
    """Apply each case's requests with one ``editor.edit`` call, in order; returns the seconds each took.

    ``bar``: a progress bar advanced once per case. ``after_each(k, times)``: called after case ``k``
    (0-based, into ``cases``) with the times so far, e.g. to checkpoint or probe the model."""
    times: list[float] = []
    for k, case in enumerate(cases):
        t0 = time.perf_counter()
        editor.edit(case.requests)
        times.append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
        if after_each is not None:
            after_each(k, times)
    return times
