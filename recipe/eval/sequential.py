"""The lifelong sequential-edit loop (RECIPE / GRACE protocol), the same for every editor.

For each T in ``edit_counts``: take the first T cases of one seeded shuffle, apply their edits one
case at a time (each on top of all earlier ones), score all T cases on the final model, then
``rollback()``. The unedited model's answers to the locality probes are recorded once, before any
edit. Writes ``T<T>.jsonl`` (one line per case) and ``summary.json`` into ``out_dir``.

Scoring columns (:mod:`recipe.eval.metrics`): ``tf`` teacher-forced, ``em`` exact match of a short
greedy continuation (``free_generation``), ``ns`` natural-stop generation (``natural_stop``: off by
default, so earlier runs and their numbers stay as they were).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from tqdm.auto import tqdm

from recipe.editors.base import Editor
from recipe.editors.state_file import save_state
from recipe.errors import RecipeError
from recipe.eval.editing import apply_edits
from recipe.eval.metrics import (exact_match, generate_for, generate_natural, generation_budget, locality_accuracy,
                                  natural_stop_hit)
from recipe.eval.resume import (check_identity, completed_rounds, model_fingerprint, resume_round, round_meta,
                                run_identity)
from recipe.lm import EditedLM, TargetScore
from recipe.retrieval.updates import question_key
from recipe.types import EditCase

log = logging.getLogger(__name__)
Item = TypeVar("Item")


@dataclass(frozen=True)
class _Query:
    """One scored prompt of one case."""

    case: int  # index into the T chosen cases
    kind: str  # "reliability" | "generality" | "locality" | "portability"
    group: str
    prompt: str
    target: str
    answers: tuple[str, ...]
    old: tuple[str, ...] = ()  # old answers a natural-stop hit must not contain (target_true, when known)


def _queries(cases: Sequence[EditCase]) -> list[_Query]:
    qs = []
    for i, c in enumerate(cases):
        for r in c.requests:
            qs.append(_Query(i, "reliability", "reliability", r.prompt, r.target_new, (r.target_new,),
                             _known(r.target_true)))
        old = _known(c.requests[0].target_true) if len(c.requests) == 1 else ()  # several edits: whose old answer?
        for kind, probes in (("generality", c.generality), ("locality", c.locality), ("portability", c.portability)):
            for p in probes:
                qs.append(_Query(i, kind, p.group, p.prompt, p.target, p.answers, old if kind == "generality" else ()))
    return qs


def _known(answer: str | None) -> tuple[str, ...]:
    return (answer,) if answer else ()


@dataclass
class SequentialResult:
    summaries: dict[int, dict] = field(default_factory=dict)  # T -> summary


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _score_queries(lm: EditedLM, qs: list[_Query], free_generation: bool, natural_stop: bool = False,
                   progress: bool = False, desc: str = ""):
    """Teacher-forced scores, the texts of each generation column (``{"em": [...], "ns": [...]}``, the
    columns asked for) and the seconds each took (``score``, ``generate``, ``natural_stop``).

    With ``progress`` a bar counts the queries scored (then generated): a lifelong round of 1,000 cases
    has several thousand; ``lm.score`` batches them by length."""
    bar = tqdm(total=len(qs) * (1 + free_generation + natural_stop), desc=f"{desc}scoring queries", unit="q",
               disable=not progress or not qs, leave=False)
    t0 = time.perf_counter()
    scores = lm.score([q.prompt for q in qs], [q.target for q in qs], on_batch=bar.update)
    t1 = time.perf_counter()
    gens = {}
    if free_generation:
        gens["em"] = generate_for(lm, [q.prompt for q in qs], [generation_budget(lm, q.answers) for q in qs], bar=bar)
    t2 = time.perf_counter()
    if natural_stop:
        gens["ns"] = generate_natural(lm, [q.prompt for q in qs], bar=bar)
    bar.close()
    return scores, gens, (t1 - t0, t2 - t1, time.perf_counter() - t2)


def _unedited_record(lm: EditedLM, qs: list[_Query], free_generation: bool, natural_stop: bool, out: Path | None,
                     resume: bool, progress: bool) -> tuple[list[TargetScore], dict[str, list[str]]]:
    """The unedited model's scores (and generations, by column) on the locality probes ``qs``.

    With an output folder they are also kept in ``out/unedited.json`` with a key made of the weights'
    fingerprint and the probes; a resumed run whose key matches reads them instead of scoring again
    (minutes at T = 1,000 on a CPU)."""
    what = [model_fingerprint(lm), free_generation, [(q.prompt, q.target, list(q.answers)) for q in qs]]
    key = hashlib.sha256(json.dumps(what + ([True] if natural_stop else [])).encode()).hexdigest()
    path = out / "unedited.json" if out is not None else None
    if resume and path is not None and path.exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            log.info("unedited model's locality record read from %s", path)
            scores = [TargetScore(*(tuple(v) for v in s)) for s in saved["scores"]]
            gens = {"em": saved["generations"], "ns": saved.get("natural_stop")}
            return scores, {mode: g for mode, g in gens.items() if g is not None}
    log.info("recording the unedited model on %d locality probes", len(qs))
    scores, gens, _ = _score_queries(lm, qs, free_generation, natural_stop, progress=progress, desc="unedited model: ")
    if path is not None:
        tmp = path.with_suffix(".json.tmp")
        extra = {"natural_stop": gens["ns"]} if natural_stop else {}
        tmp.write_text(json.dumps({"key": key, "generations": gens.get("em"), **extra, "scores": [
            [list(s.target_ids), list(s.predicted_ids), list(s.logprobs)] for s in scores]}))
        os.replace(tmp, path)  # a crash never leaves a half-written record
    return scores, gens


def _query_score(q: _Query, mode: str, text: str, unedited: str | None) -> float:
    """One generation column's score of one query: locality compares with the unedited model's text."""
    if q.kind == "locality":
        return float(text == unedited)
    if mode == "ns":
        return float(natural_stop_hit(text, q.answers, q.old))
    return float(exact_match(text, q.answers))


def _case_rows(cases, case_idx, qs, scores, gens, base_scores, base_gens, edit_times) -> list[dict]:
    """Per-case metrics, plus every scored query with its prompt, target, accepted answers and the
    edited model's greedy continuation (``generated``; the unedited model's too for locality probes)
    and, with natural stop, its first ``sentence``. ``gens`` / ``base_gens``: texts by column ("em",
    "ns"); ``case_idx``: the pool index of each case; ``qs``: ``(j, query)`` pairs, j indexing the
    unedited-model records."""
    pos = {c: n for n, c in enumerate(case_idx)}
    modes = ["tf", "em"] + [m for m in gens if m != "em"]
    rows = [{"case_id": c.case_id, "edit_time_s": t, **{m: {} for m in modes}, "queries": []}
            for c, t in zip(cases, edit_times)]
    acc: list[dict[str, dict[str, list[float]]]] = [{m: {} for m in modes} for _ in cases]
    for n, (j, q) in enumerate(qs):
        local = q.kind == "locality"
        tf = locality_accuracy(base_scores[j], scores[n]) if local else scores[n].accuracy
        texts = {m: (g[n], base_gens[m].get(j) if local else None) for m, g in gens.items()}
        values = {"tf": tf} | {m: _query_score(q, m, text, unedited) for m, (text, unedited) in texts.items()}
        keys = {q.kind} | ({f"{q.kind}/{q.group}"} if q.group != q.kind else set())
        for key in keys:
            for m, v in values.items():
                acc[pos[q.case]][m].setdefault(key, []).append(v)
        rows[pos[q.case]]["queries"].append(_query_record(q, values, texts))
    for row, a in zip(rows, acc):
        for mode in modes:
            row[mode] = {k: _mean(v) for k, v in sorted(a[mode].items())}
    return rows


def _query_record(q: _Query, values: dict[str, float], texts: dict[str, tuple[str, str | None]]) -> dict:
    """One scored query as the per-case JSONL keeps it: what was asked, what was wanted, what came out."""
    record = {"kind": q.kind, "group": q.group, "prompt": q.prompt, "target": q.target, "tf": values["tf"]}
    if list(q.answers) != [q.target]:
        record["answers"] = list(q.answers)
    names = {"em": ("generated", "unedited"), "ns": ("sentence", "unedited_sentence")}
    for mode, (text, unedited) in texts.items():
        record |= {names[mode][0]: text, mode: values[mode]}
        if unedited is not None:
            record[names[mode][1]] = unedited
    return record


def proc_status_mb(field: str = "VmHWM") -> float | None:
    """A memory field of /proc/self/status in MB (VmHWM: peak resident, VmRSS: resident now); None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far (VmHWM, MB)."""
    return proc_status_mb("VmHWM")


def _summarise(T: int, rows: list[dict]) -> dict:
    summary: dict = {"T": T, "cases": len(rows), "rounds": len({r["round"] for r in rows})}
    for mode in ("tf", "em") + (("ns",) if any("ns" in r for r in rows) else ()):
        keys = sorted({k for r in rows for k in r[mode]})
        summary[mode] = {k: _mean([r[mode][k] for r in rows if r[mode].get(k) is not None]) for k in keys}
    times = sorted(r["edit_time_s"] for r in rows)
    summary["edit_time_s"] = {"median": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))],
                              "mean": statistics.fmean(times)}
    per_round = {r["round"]: r["round_timing"] for r in rows}.values()
    n_queries = sum(t["queries"] for t in per_round)
    summary["queries"] = n_queries
    summary["score_ms_per_query"] = 1000 * sum(t["score_s"] for t in per_round) / max(n_queries, 1)
    summary["generate_ms_per_query"] = 1000 * sum(t["generate_s"] for t in per_round) / max(n_queries, 1)
    peaks = [t["peak_rss_mb"] for t in per_round if t.get("peak_rss_mb") is not None]
    summary["peak_rss_mb"] = max(peaks) if peaks else None  # the process's resident peak (model included)
    return summary


def latest_answer_summary(T: int, rows: list[dict], keys: Callable[[dict], set] | None = None) -> dict:
    """The user's view of a run (``T<T>.jsonl`` rows of an editor that supersedes restated facts):
    each question scored on its latest answer. A case whose question is restated by a later case of
    its round (same question key, ``recipe.retrieval.updates``, of a reliability prompt) is left out:
    the later case's probes score that question against the latest answer. The summary is
    :func:`_summarise`'s over the kept rows, plus ``restated_cases_left_out``. Rows must be every case
    of a round (no ``score_cases`` sample: an unscored later case would go unseen). ``keys(row)``: the
    keys under which a later case restates this one instead (default: its reliability prompts' question
    keys; e.g. its subject, where a dataset asks one question per subject)."""
    if keys is None:
        keys = lambda row: {question_key(q["prompt"]) for q in row["queries"] if q["kind"] == "reliability"}  # noqa: E731
    kept, seen = [], set()
    for row in reversed(rows):
        mine = {(row["round"], k) for k in keys(row)}
        if not mine & seen:
            kept.append(row)
        seen |= mine
    return {**_summarise(T, kept[::-1]), "restated_cases_left_out": len(rows) - len(kept)}


def _scored_cases(T: int, start: int, score_cases: int | None, seed: int) -> list[int]:
    """Pool indices scored in the round of T edits starting at ``start``: all, or a seeded sample."""
    idx = list(range(start, start + T))
    if score_cases is None or score_cases >= T:
        return idx
    return sorted(random.Random(f"{seed}:{T}:{start}").sample(idx, score_cases))


def _kept_state(out: Path, T: int) -> Path:
    """Where ``save_states`` keeps the editor's state after the first round of T edits."""
    return out / f"state-T{T}"


def _apply_round(editor: Editor, chosen: Sequence[EditCase], T: int, start: int, seed: int, out: Path | None,
                 resume: bool, checkpoint_every: int | None, bar) -> list[float]:
    """Apply ``chosen`` one case at a time; every ``checkpoint_every`` cases the editor's state goes to
    ``out/T<T>.round`` so that ``resume`` continues the round from there. Returns the edit times."""
    ckpt = out / f"T{T}.round" if out is not None and checkpoint_every else None
    kept = [_kept_state(out, T)] if out is not None and start == 0 else []  # what --save-states kept
    done = resume_round(editor, ([ckpt] if ckpt else []) + kept, T, start, seed, chosen) if resume else []
    bar.update(len(done))

    def checkpoint(k: int, times: list[float]) -> None:
        applied = len(done) + k + 1
        if ckpt is not None and applied % checkpoint_every == 0 and applied < len(chosen):
            save_state(editor.state_dict(), ckpt, round_meta(T, start, seed, chosen, done + times))

    return done + apply_edits(editor, chosen[len(done):], bar=bar, after_each=checkpoint)


def seeded_order(items: Sequence[Item], seed: int) -> list[Item]:
    """``items`` in the one seeded order every evaluation takes its first T cases (or n probes) from."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


def run_sequential(lm: EditedLM, editor: Editor, cases: Sequence[EditCase], edit_counts: Sequence[int],
                   *, n_cases: int | None = None, seed: int = 0, free_generation: bool = True,
                   natural_stop: bool = False, out_dir: str | Path | None = None, resume: bool = False,
                   progress: bool = True, score_cases: int | None = None, checkpoint_every: int | None = None,
                   save_states: bool = False, identity: dict | None = None) -> SequentialResult:
    """Run the sequential protocol for every T in ``edit_counts``.

    The first ``n_cases`` cases of one seeded shuffle (default: the largest T) are cut into
    consecutive rounds of T cases; each round applies its T edits one case at a time, scores those
    T cases on the final model and rolls back. T=1 over 100 cases is thus 100 single-edit rounds,
    T=100 over 100 cases one lifelong round. The unedited model's answers to the locality probes are
    recorded once, before any edit.

    Each finished round is appended to ``out_dir/T<T>.jsonl`` at once, so a crash loses at most the
    round in progress; with ``resume=True`` the complete rounds found there are kept and skipped.

    ``score_cases`` (for sets too large to score whole on a CPU): every round still applies all its T
    edits, but only a seeded sample of that many of its cases is scored (and only their locality
    probes are recorded before editing).

    ``checkpoint_every`` (slow editors): inside a round, the editor's state is saved to
    ``out_dir/T<T>.round`` after every that many cases, and ``resume`` continues the round from it.
    ``natural_stop``: also score the ``ns`` column (:func:`recipe.eval.metrics.generate_natural`); summaries
    gain an ``ns`` entry and each query row its ``sentence``.
    ``save_states``: the editor's state after the first round of each T (the first T cases of the
    shuffle) is kept in ``out_dir/state-T<T>`` (``recipe general --editor-state`` measures it).

    The run's identity (editor, its config, model, the cases, seed and scoring settings, plus the
    caller's ``identity`` entries such as the dataset's name) goes to ``out_dir/identity.json``;
    ``resume`` refuses a folder that holds another run.
    """
    counts = sorted(set(int(t) for t in edit_counts))
    if not counts or counts[0] < 1:
        raise RecipeError(f"edit counts must be positive integers, got {list(edit_counts)}")
    n_cases = counts[-1] if n_cases is None else int(n_cases)
    if n_cases < counts[-1]:
        raise RecipeError(f"n_cases={n_cases} is smaller than the largest T={counts[-1]}")
    if n_cases > len(cases):
        raise RecipeError(f"asked for {n_cases} cases but the dataset has only {len(cases)}")
    if (resume or save_states) and out_dir is None:
        raise RecipeError("resume and save_states need an output folder")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise RecipeError(f"checkpoint_every must be a positive integer, got {checkpoint_every}")
    if score_cases is not None and score_cases < 1:
        raise RecipeError(f"score_cases must be a positive integer, got {score_cases}")
    pool = seeded_order(cases, seed)[:n_cases]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        check_identity(out, run_identity(lm, editor, cases, seed=seed, free_generation=free_generation,
                                         score_cases=score_cases,
                                         extra={**(identity or {}), **({"natural_stop": True} if natural_stop else {})}),
                       resume)

    scored = {(T, start): _scored_cases(T, start, score_cases, seed)
              for T in counts for start in range(0, n_cases // T * T, T)}
    wanted = {i for idx in scored.values() for i in idx}
    pool_qs = [(j, q) for j, q in enumerate(_queries(pool)) if q.case in wanted]
    loc = [(j, q) for j, q in pool_qs if q.kind == "locality"]
    base_s, base_g = _unedited_record(lm, [q for _, q in loc], free_generation, natural_stop, out, resume, progress)
    base_scores = {j: s for (j, _), s in zip(loc, base_s)}
    base_gens = {mode: {j: g for (j, _), g in zip(loc, texts)} for mode, texts in base_g.items()}

    result = SequentialResult()
    for T in counts:
        rounds = n_cases // T
        path = out / f"T{T}.jsonl" if out is not None else None
        rows, done = completed_rounds(path, pool, T, scored) if resume else ([], 0)
        if path is not None:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        bar = tqdm(total=rounds * T, initial=done, desc=f"{editor.name}: T={T} ({rounds} round(s))",
                   disable=not progress)
        for start in range(done, rounds * T, T):
            chosen, idx = pool[start:start + T], scored[(T, start)]
            keep = set(idx)
            qs = [(j, q) for j, q in pool_qs if q.case in keep]
            edit_times = _apply_round(editor, chosen, T, start, seed, out, resume, checkpoint_every, bar)
            if save_states and start == 0:
                save_state(editor.state_dict(), _kept_state(out, T), round_meta(T, start, seed, chosen, edit_times))
            edit_times = [edit_times[i - start] for i in idx]
            scores, gens, secs = _score_queries(lm, [q for _, q in qs], free_generation, natural_stop,
                                                progress=progress and T > 1, desc=f"{editor.name}: T={T}: ")
            editor.rollback()
            new = _case_rows([pool[i] for i in idx], idx, qs, scores, gens, base_scores, base_gens, edit_times)
            timing = {"queries": len(qs), "score_s": secs[0], "generate_s": secs[1], "peak_rss_mb": peak_rss_mb()}
            if natural_stop:
                timing["natural_stop_s"] = secs[2]
            for r in new:
                r["round"], r["round_timing"] = start // T, timing
            rows += new
            if path is not None:
                with open(path, "a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in new))
                shutil.rmtree(out / f"T{T}.round", ignore_errors=True)
        bar.close()
        result.summaries[T] = _summarise(T, rows)
        if out is not None:
            (out / "summary.json").write_text(json.dumps(list(result.summaries.values()), indent=1))
    return result
