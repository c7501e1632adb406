"""Score a `recipe eval` run as a user sees it: each question on its latest answer.

    python benchmarks/latest_answer.py runs/recipe-zsre-supersede --dataset zsre [--data-dir DIR]

A dataset that edits one question several times is scored by the field over all cases, so once every
edit is applied at most one of a question's answers can be right (``seen_split.json``'s ``ceiling``:
0.813 on zsRE, whose 404 cases that share a subject nearly always restate one question in other words).
A user who edits a fact again expects its latest answer. This keeps, per round, only the last case of
each question and scores those (``recipe.eval.sequential.latest_answer_summary``), two ways:

- ``question``: cases restate each other when their edit prompts share a question key (the rule
  RECIPE's default supersede applies);
- ``subject``: when they share a subject (casefolded), which is how zsRE restates a question.

Writes ``latest_answer.json`` beside the run's files: {way: {"T<T>": summary}}, each summary with
``restated_cases_left_out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipe.data import load_dataset
from recipe.eval.sequential import latest_answer_summary

METRICS = ("reliability", "generality", "locality")


def summarise(run: Path, subjects: dict[str, str | None]) -> dict:
    out: dict = {"question": {}, "subject": {}}
    by_subject = lambda row: {s} if (s := subjects.get(row["case_id"])) else set()  # noqa: E731
    for path in sorted(run.glob("T*.jsonl"), key=lambda p: int(p.stem[1:])):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        T = int(path.stem[1:])
        out["question"][path.stem] = latest_answer_summary(T, rows)
        out["subject"][path.stem] = latest_answer_summary(T, rows, keys=by_subject)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--dataset", required=True, help="the run's dataset (for each case's subject)")
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    subjects = {c.case_id: (c.requests[0].subject or "").strip().casefold() or None
                for c in load_dataset(args.dataset, args.data_dir)}
    result = summarise(args.run, subjects)
    (args.run / "latest_answer.json").write_text(json.dumps(result, indent=1))
    for way, by_t in result.items():
        for t, s in by_t.items():
            cells = ", ".join(f"{m} {s['tf'][m]:.3f}/{s['em'][m]:.3f}" for m in METRICS)
            print(f"{t} by {way}: {s['cases']} cases kept ({s['restated_cases_left_out']} restated later left out): {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
