"""MQuAKE: do the edits of a chain of facts carry over to multi-hop questions?

Each case (MQuAKE-hard: 4 edits that form one chain) is scored after its edits (default: each case on
its own, all its edits in one ``edit`` call, then ``rollback``; ``all_at_once``: every chosen case's
edits applied one case after another, as a lifelong editor holds them, then every case scored):

- ``edit``: each edit's own cloze prompt, greedy exact match of the new answer (as ``recipe eval``);
- ``single_hop``: each edited fact's question (``new_single_hops``), few-shot ``Q: ... A:`` prompting
  with the data folder's ``mquake/prompts/multihop-prompts.txt``, exact match of the first line;
- ``multi_hop``: the case's multi-hop questions in the same few-shot format; a case counts when ANY of
  its questions gets the new answer (MQuAKE's protocol; ``multi_hop/question``: per question);
- ``multi_hop_mello`` (``mello=True``): MeLLo-style decomposition with ``prompts/MeLLo-prompt.txt``:
  the model writes subquestions and answers them; where MeLLo retrieves a fact from its memory, the
  edited model is the memory: the "retrieved fact" is the model's own generated answer, so the chain
  runs on what the edits put into the model (:func:`mello_answers`).

The unedited model's multi-hop accuracy on the ORIGINAL answers (``answer``, ``answer_alias``) is the
floor: what the model knew of the chains before editing.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from recipe.data.common import find_file, read_text
from recipe.data.registry import resolve_data_dir
from recipe.editors.base import Editor
from recipe.errors import RecipeError
from recipe.eval.editing import apply_edits
from recipe.eval.metrics import exact_match, generate_for, generate_until, generation_budget
from recipe.eval.sequential import seeded_order
from recipe.lm import EditedLM
from recipe.types import EditCase

log = logging.getLogger(__name__)
PROMPTS = "the data folder's mquake/prompts/ (MQuAKE's prompts; pass --data-dir or set $RECIPE_DATA_DIR)"
_LINE_END = re.compile(r"\n")
_MELLO_STOP = re.compile(r"Retrieved fact:|Final answer:[^\n]*\n|\n\n|\nQuestion:")
_FINAL = re.compile(r"Final answer:([^\n]*)")
_GENERATED = re.compile(r"Generated answer:([^\n]*)")


@dataclass(frozen=True)
class MquakePrompts:
    """The few-shot demonstrations: ``Q: ... A: ...`` lines and MeLLo's decomposition examples."""

    multihop: str
    mello: str

    @classmethod
    def load(cls, data_dir: str | Path | None = None, demos: int | None = None) -> "MquakePrompts":
        """From ``<data_dir>/mquake/prompts/``; ``demos``: keep only the first that many examples of each."""
        root = resolve_data_dir(data_dir)
        lines = [x for x in read_text(find_file(root, "mquake/prompts/multihop-prompts.txt", PROMPTS)).split("\n")
                 if x.strip()]
        blocks = [b.strip() for b in read_text(find_file(root, "mquake/prompts/MeLLo-prompt.txt", PROMPTS))
                  .split("\n\n") if b.strip()]
        return cls("\n".join(lines[:demos]), "\n\n".join(blocks[:demos]))


def _answer_line(text: str) -> str:
    return text.strip().split("\n")[0]


def ask(lm: EditedLM, demos: str, questions: Sequence[str], max_new_tokens: int = 16, bar=None) -> list[str]:
    """The first line the model writes after ``demos`` + ``Q: <question> A:``, for each question.

    A prefix editor (RECIPE) retrieves on the question alone, as in every other benchmark here: the
    demonstrations are context for the model, not part of the query (in the query they would fill the
    retriever's window and cut the question off)."""
    prompts = [f"{demos}\nQ: {q} A:" for q in questions]
    prefixes = lm.prefix_provider(list(questions)) if lm.prefix_provider is not None else None
    return [_answer_line(t) for t in generate_until(lm, prompts, _LINE_END, max_new_tokens, bar, prefixes=prefixes)]


def mello_answers(lm: EditedLM, demos: str, questions: Sequence[str], max_hops: int = 4,
                  step_tokens: int = 64) -> list[tuple[str, str]]:
    """``(final answer, what the model wrote)`` of a MeLLo-style decomposition of each question.

    The chains advance together: each step generates until "Retrieved fact:", a final answer or a blank
    line; at "Retrieved fact:" the model's own last generated answer is put in as the fact (the
    edited model is the memory) and the model goes on with the intermediate answer. A chain with no
    final answer after ``max_hops`` + 1 steps answers ""."""
    texts = [f"{demos}\n\nQuestion: {q}\n" for q in questions]
    answers = [""] * len(questions)
    active = list(range(len(questions)))
    for _ in range(max_hops + 1):
        if not active:
            break
        still = []
        for i, gen in zip(active, generate_until(lm, [texts[i] for i in active], _MELLO_STOP, step_tokens)):
            cut = _MELLO_STOP.search(gen.lstrip())
            gen = gen[:len(gen) - len(gen.lstrip()) + cut.end()] if cut else gen
            if (final := _FINAL.search(gen)) is not None:
                answers[i], texts[i] = final.group(1).strip(), texts[i] + gen
            elif "Retrieved fact:" in gen:
                said = _GENERATED.findall(gen)
                texts[i] += (gen + f" {said[-1].strip() if said else ''}\nRetrieved fact does not contradict to "
                             "generated answer, so the intermediate answer is:")
                still.append(i)
            else:
                texts[i] += gen
        active = still
    return [(a, t[len(demos):].strip()) for a, t in zip(answers, texts)]


def _hits(texts: Sequence[str], answers: Sequence[Sequence[str]]) -> list[float]:
    return [float(exact_match(t, a)) for t, a in zip(texts, answers)]


def _multi_hop(case: EditCase, original: bool) -> tuple[list[str], tuple[str, ...]]:
    """The case's multi-hop questions and the answers that count: the new ones, or the original ones."""
    probes = [p for p in case.generality if p.group == "multi_hop"]
    if not probes:
        raise RecipeError(f"MQuAKE case {case.case_id} has no multi-hop questions")
    if original:
        answers = tuple(a for a in [case.meta.get("answer"), *case.meta.get("answer_alias", ())] if a)
        if not answers:
            raise RecipeError(f"MQuAKE case {case.case_id} has no original answer ('answer') for the floor")
        return [p.prompt for p in probes], answers
    return [p.prompt for p in probes], probes[0].answers


def score_cases(lm: EditedLM, demos: MquakePrompts, cases: Sequence[EditCase], *, original: bool = False,
                mello: bool = False, edits: bool = True, progress: bool = False) -> list[dict]:
    """One row per case: each metric of the module docstring, with the texts the model wrote.
    ``original``: score the multi-hop questions against the original answers (the floor)."""
    rows = [{"case_id": c.case_id} for c in cases]
    bar = tqdm(total=len(cases), desc="mquake: scoring cases", disable=not progress, leave=False)
    for row, case in zip(rows, cases):
        questions, answers = _multi_hop(case, original)
        said = ask(lm, demos.multihop, questions)
        hits = _hits(said, [answers] * len(questions))
        row["multi_hop"] = {"accuracy": max(hits), "per_question": hits, "answers": said}
        if mello:
            chains = mello_answers(lm, demos.mello, questions)
            hits = _hits([a for a, _ in chains], [answers] * len(questions))
            row["multi_hop_mello"] = {"accuracy": max(hits), "per_question": hits, "chains": [t for _, t in chains]}
        if edits:
            hops = [p for p in case.portability if p.group == "single_hop"]
            said = ask(lm, demos.multihop, [p.prompt for p in hops])
            row["single_hop"] = {"accuracy": _mean(_hits(said, [p.answers for p in hops])), "answers": said}
            budgets = [generation_budget(lm, [r.target_new]) for r in case.requests]
            said = generate_for(lm, [r.prompt for r in case.requests], budgets)
            row["edit"] = {"accuracy": _mean(_hits(said, [[r.target_new] for r in case.requests])), "answers": said}
        bar.update(1)
    bar.close()
    return rows


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(rows: Sequence[dict]) -> dict:
    """Mean of each metric over the cases (``multi_hop/question``: over every question)."""
    out = {}
    for key in ("edit", "single_hop", "multi_hop", "multi_hop_mello"):
        if rows and key in rows[0]:
            out[key] = _mean([r[key]["accuracy"] for r in rows if r[key]["accuracy"] is not None])
            if "per_question" in rows[0][key]:
                out[f"{key}/question"] = _mean([h for r in rows for h in r[key]["per_question"]])
    return out


def run_mquake(lm: EditedLM, editor: Editor, cases: Sequence[EditCase], prompts: MquakePrompts, *,
               n_cases: int | None = None, seed: int = 0, all_at_once: bool = False, mello: bool = False,
               out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """The floor (unedited model, original answers), then the edited model's scores; rolls back at the
    end (also on error). Writes ``mquake.json`` into ``out_dir``."""
    chosen = seeded_order(cases, seed)[:n_cases]
    if not chosen:
        raise RecipeError("no MQuAKE cases to score")
    floor = score_cases(lm, prompts, chosen, original=True, mello=mello, edits=False, progress=progress)
    rows: list[dict] = []
    try:
        if all_at_once:
            times = apply_edits(editor, chosen, bar=tqdm(total=len(chosen), desc=f"{editor.name}: all edits",
                                                         disable=not progress))
            rows = score_cases(lm, prompts, chosen, mello=mello, progress=progress)
        else:
            times = []
            for case in tqdm(chosen, desc=f"{editor.name}: case by case", disable=not progress):
                times += apply_edits(editor, [case])
                rows += score_cases(lm, prompts, [case], mello=mello)
                editor.rollback()
    finally:
        editor.rollback()
    for row, t in zip(rows, times):
        row["edit_time_s"] = t
    result = {"editor": editor.name, "model": lm.spec.name, "seed": seed, "cases": len(chosen),
              "edits": sum(len(c.requests) for c in chosen), "all_at_once": all_at_once,
              "floor": summarise(floor), "edited": summarise(rows), "rows": rows, "floor_rows": floor}
    log.info("mquake: floor %s; edited %s", result["floor"], result["edited"])
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "mquake.json").write_text(json.dumps(result, indent=1))
    return result


def format_mquake(result: dict) -> str:
    """The summary as a few lines of text."""
    how = "all edits at once" if result["all_at_once"] else "each case's edits alone"
    lines = [f"{result['editor']} on {result['model']}: {result['cases']} MQuAKE cases, {result['edits']} edits "
             f"({how}), seed {result['seed']}"]
    for name, scores in (("unedited, original answers (floor)", result["floor"]), ("edited, new answers", result["edited"])):
        lines.append(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if v is not None))
    return "\n".join(lines)
