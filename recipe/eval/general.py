"""General ability before and after lifelong editing: MMLU, CommonsenseQA, ANLI, SQuAD 2.0, WikiText.

The sets, their prompts and how each is scored: :mod:`recipe.eval.general_sets`. Here: the registry of
sets, their seeded subsets, and the loop that measures the unedited model and then the model after the
first T cases of the sequential loop's shuffle, for each T.

Each set is shuffled with ``seeded_order`` (the sequential loop's shuffle) and its first ``n`` items
kept (``None``: all); ANLI keeps ``n`` per round. Every headline number has a bootstrap 95% interval
(``ci95``); a multiple-choice set where the unedited model's interval reaches down to the chance level
(``chance``) is listed in ``at_chance``: there its accuracy cannot show damage.

Optionally (``agreement_items``) each measurement also holds ``agreement``: the fraction of general
prompts whose greedy next token is the unedited model's and the mean KL(unedited || edited)
(:mod:`recipe.eval.agreement`); the unedited record is kept in ``out_dir``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from recipe.data.registry import resolve_data_dir
from recipe.editors.base import Editor
from recipe.errors import RecipeError, UnknownNameError
from recipe.eval import agreement as agree
from recipe.eval.editing import apply_edits
from recipe.eval.general_sets import (  # noqa: F401  (items, prompts and scorers, also imported from here)
    Choice, Reading, choice_predictions, choice_prompt, load_anli, load_csqa, load_mmlu, load_squad,
    load_wikitext_test, score_choices, score_squad, score_wikitext, squad_prompt)
from recipe.eval.sequential import seeded_order
from recipe.lm import EditedLM
from recipe.types import EditCase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneralSet:
    """One benchmark: how to load its items, how to score them, and its headline number."""

    load: Callable[[Path], list]
    score: Callable[..., dict]
    metric: str  # the key of score()'s dict shown in tables and plots
    per_group: bool = False  # keep n items per group (ANLI round) instead of n in all


GENERAL_SETS: dict[str, GeneralSet] = {
    "mmlu": GeneralSet(load_mmlu, score_choices, "accuracy"),
    "csqa": GeneralSet(load_csqa, score_choices, "accuracy"),
    "anli": GeneralSet(load_anli, score_choices, "accuracy", per_group=True),
    "squad": GeneralSet(load_squad, score_squad, "inv_ppl"),
    "wikitext": GeneralSet(load_wikitext_test, score_wikitext, "ppl"),
}


def seeded_subset(items: Sequence, n: int | None, seed: int, per_group: bool = False) -> list:
    """The first ``n`` items of the seeded shuffle (of each ``.group`` when ``per_group``)."""
    if not per_group:
        return seeded_order(items, seed)[:n]
    groups = sorted({it.group for it in items})
    return [it for g in groups for it in seeded_order([x for x in items if x.group == g], seed)[:n]]


def load_general(data_dir: str | Path | None = None, sets: Sequence[str] = tuple(GENERAL_SETS),
                 n: int | None = 200, seed: int = 0) -> dict[str, list]:
    """Set name -> its seeded subset of ``n`` items (``None``: the full set)."""
    unknown = [s for s in sets if s not in GENERAL_SETS]
    if unknown or not sets:
        raise UnknownNameError(f"unknown general sets {unknown}; known: {', '.join(GENERAL_SETS)}")
    if n is not None and n < 1:
        raise RecipeError(f"n must be a positive number of items (or None for all), got {n}")
    root = resolve_data_dir(data_dir)
    return {s: seeded_subset(GENERAL_SETS[s].load(root), n, seed, GENERAL_SETS[s].per_group) for s in sets}


# ---- the loop ----------------------------------------------------------------------------------
def measure(lm: EditedLM, items: dict[str, list], max_tokens: int = 512, progress: bool = False) -> dict:
    """``{"scores": {set: dict}, "seconds": {set: s}}`` of the model as it is now."""
    scores, seconds = {}, {}
    for name, its in items.items():
        t0 = time.perf_counter()
        scores[name] = GENERAL_SETS[name].score(lm, its, max_tokens=max_tokens, progress=progress)
        seconds[name] = time.perf_counter() - t0
        log.info("%s: %s in %.1f s", name, scores[name], seconds[name])
    return {"scores": scores, "seconds": seconds}


def run_general(lm: EditedLM, editor: Editor, cases: Sequence[EditCase], edit_counts: Sequence[int],
                items: dict[str, list], *, seed: int = 0, max_tokens: int = 512,
                out_dir: str | Path | None = None, progress: bool = True,
                states: Sequence[tuple[dict, dict]] = (), agreement_items: dict[str, list] | None = None,
                top_k: int = 64) -> dict:
    """Measure the unedited model, then after the first T cases of ``seeded_order(cases, seed)`` for
    each T, applied one case at a time; rolls back at the end (also on error).

    ``states``: ``(state, meta)`` pairs from ``load_state`` (``recipe eval --save-states``); a state
    made after the same first T cases is loaded instead of applying them again (its edit times count).

    Edits accumulate: T=1000 continues from the model measured at T=100 (the same state as applying
    the first 1000 cases afresh, without applying the first 100 twice). Writes ``general.json``,
    ``general.txt`` and ``general.png`` into ``out_dir`` after each measurement.

    ``agreement_items`` (set -> items, as :func:`load_general` gives them): each measurement gains
    ``agreement`` against the unedited model's ``top_k`` next-token record, made before any edit (or
    read from ``out_dir/unedited_next_token.pt`` when it was made for the same weights and prompts).
    """
    counts = sorted({int(t) for t in edit_counts})
    if not counts or counts[0] < 1:
        raise RecipeError(f"edit counts must be positive integers, got {list(edit_counts)}")
    if counts[-1] > len(cases):
        raise RecipeError(f"asked for {counts[-1]} edits but the dataset has only {len(cases)} cases")
    order = seeded_order(cases, seed)[:counts[-1]]
    result = {"editor": editor.name, "model": lm.spec.name, "seed": seed, "max_tokens": max_tokens,
              "items": {name: len(its) for name, its in items.items()}, "runs": []}
    saved = _states_by_T(states, order, seed, counts)
    prompts = agree.agreement_prompts(lm, agreement_items, max_tokens) if agreement_items else []
    if prompts:
        result["agreement_prompts"] = {name: len(its) for name, its in agreement_items.items()}
    edit_s, record = 0.0, None
    try:
        for T in [0] + counts:
            done = result["runs"][-1]["T"] if result["runs"] else 0
            if T in saved:
                state, meta = saved[T]
                editor.rollback()
                editor.load_state_dict(state)
                edit_s, done = float(sum(meta["edit_times"])), T
                log.info("T=%d: loaded a saved %s state instead of applying %d edits", T, editor.name, T)
            with tqdm(total=T - done, desc=f"{editor.name}: edits {done}->{T}", disable=not progress) as bar:
                edit_s += sum(apply_edits(editor, order[done:T], bar=bar))
            result["runs"].append({"T": T, "edit_s": edit_s, **measure(lm, items, max_tokens, progress)})
            if prompts:
                record = _agreement(lm, prompts, record, top_k, out_dir, progress, result["runs"][-1])
            if T == 0:
                result |= chance_levels(result["runs"][0]["scores"])
            if out_dir is not None:
                write_outputs(result, out_dir)
    finally:
        editor.rollback()
    return result


def _agreement(lm: EditedLM, prompts: list[tuple[str, str]], record: dict | None, top_k: int,
               out_dir: str | Path | None, progress: bool, run: dict) -> dict:
    """Adds ``agreement`` to ``run``; the first call (the unedited model) makes or reads the record."""
    t0 = time.perf_counter()
    if record is None:
        path = Path(out_dir) / agree.RECORD_FILE if out_dir is not None else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        record, was_kept = agree.unedited_record(lm, prompts, top_k, path, progress)
        run["agreement"] = agree.compare(lm, prompts, record, progress) if was_kept else agree.identical(prompts, record)
    else:
        run["agreement"] = agree.compare(lm, prompts, record, progress)
    run["seconds"]["agreement"] = time.perf_counter() - t0
    log.info("agreement with the unedited model: %.4f, KL %.4g", run["agreement"]["agreement"], run["agreement"]["kl"])
    return record


def chance_levels(scores: dict) -> dict:
    """``chance`` per multiple-choice set and ``at_chance``: those whose (unedited) 95% interval reaches
    down to chance, where a drop cannot be told from guessing."""
    chance = {name: sc["chance"] for name, sc in scores.items() if sc.get("chance") is not None}
    at = [name for name, level in chance.items()
          if scores[name].get("ci95") is None or scores[name]["ci95"][0] <= level]
    return {"chance": chance, "at_chance": at}


def _states_by_T(states: Sequence[tuple[dict, dict]], order: Sequence[EditCase], seed: int,
                 counts: Sequence[int]) -> dict[int, tuple[dict, dict]]:
    """``{T: (state, meta)}``; each state must come from the first T cases of this seed's order."""
    saved = {}
    for state, meta in states:
        T = int(meta.get("T", -1))
        if T not in counts:
            raise RecipeError(f"a saved editor state holds T={T} edits but --edits asks for {list(counts)}")
        ids = [c.case_id for c in order[:T]]
        if meta.get("seed") != seed or meta.get("start") != 0 or meta.get("case_ids") != ids:
            raise RecipeError(f"the saved state with T={T} was made from other cases (another dataset, seed "
                              f"{meta.get('seed')} or round); it cannot stand for the first {T} cases of seed {seed}")
        saved[T] = (state, meta)
    return saved


# ---- outputs -----------------------------------------------------------------------------------
def _columns(result: dict) -> list[tuple[str, str]]:
    """(set, key) of every reported number: the headline metric first, then its groups."""
    cols = []
    for name in result["items"]:
        keys = result["runs"][0]["scores"][name]
        metric = GENERAL_SETS[name].metric
        cols += [(name, metric)] + [(name, k) for k in keys if k.startswith(metric + "/")]
    return cols


def format_general(result: dict) -> str:
    cols = _columns(result)
    head = ["T"] + [name if key == GENERAL_SETS[name].metric else f"{name}/{key.split('/')[-1]}"
                    for name, key in cols] + ["edit s", "eval s"]
    rows = [[str(r["T"])] + [f"{r['scores'][n][k]:.3f}" if r["scores"][n][k] is not None else "-" for n, k in cols]
            + [f"{r['edit_s']:.1f}", f"{sum(r['seconds'].values()):.1f}"] for r in result["runs"]]
    if "agreement_prompts" in result:
        head[-2:-2] = ["agree", "KL"]
        for row, r in zip(rows, result["runs"]):
            row[-2:-2] = [f"{r['agreement']['agreement']:.4f}", f"{r['agreement']['kl']:.2e}"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    title = (f"{result['editor']} on {result['model']}, seed {result['seed']}; items: "
             + ", ".join(f"{k} {v}" for k, v in result["items"].items()))
    lines = [title, " | ".join(h.rjust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    return "\n".join(lines + [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows] + _notes(result))


def _notes(result: dict) -> list[str]:
    """The 95% intervals, what the agreement columns are, and the sets where the unedited model is at chance."""
    notes = ["95% intervals (bootstrap over items):"]
    for r in result["runs"]:
        cis = [f"{name} [{sc['ci95'][0]:.3f}, {sc['ci95'][1]:.3f}]" for name, sc in r["scores"].items()
               if sc.get("ci95") is not None]
        notes.append(f"  T={r['T']}: " + ", ".join(cis))
    if "agreement_prompts" in result:
        notes.append(f"agree: greedy next token unchanged from the unedited model; KL(unedited || edited) over its "
                     f"top-{result['runs'][0]['agreement']['top_k']} tokens + the rest; prompts: "
                     + ", ".join(f"{k} {v}" for k, v in result["agreement_prompts"].items()))
    if result.get("at_chance"):
        notes.append("AT CHANCE: the unedited model's accuracy is not above guessing (its 95% interval reaches chance) "
                     "on " + ", ".join(f"{n} (chance {result['chance'][n]:.3f})" for n in result["at_chance"])
                     + "; these accuracies cannot show damage")
    return notes


def plot_general(result: dict, path: str | Path) -> Path:
    """One panel per set: its headline number against the number of edits (T=0: unedited)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["items"])
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    ts = [r["T"] for r in result["runs"]]
    for ax, name in zip(axes[0], names):
        metric = GENERAL_SETS[name].metric
        ys = [r["scores"][name][metric] for r in result["runs"]]
        ax.plot(range(len(ts)), [float("nan") if y is None else y for y in ys], "-o")
        ax.set_xticks(range(len(ts)), [str(t) for t in ts])
        ax.set_title(f"{name} ({metric})", fontsize=9)
        ax.set_xlabel("edits T", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['editor']} on {result['model']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "general.json").write_text(json.dumps(result, indent=1))
    (out / "general.txt").write_text(format_general(result) + "\n")
    plot_general(result, out / "general.png")
