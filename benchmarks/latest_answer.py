"""Score a `recipe eval` run as a user sees it: each question on its latest answer.

    python benchmarks/latest_answer.py runs/recipe-zsre-supersede --dataset zsre

A dataset that edits one question several times (zsRE: 404 of 1,037 cases share their subject with
another edit) is scored by the field over all cases, so once every edit is applied at most one of a
question's answers can be right (``seen_split.json``'s ``ceiling``). With an editor that supersedes
restated facts, the user asks a question and expects its latest answer: this keeps, per round, only
the last case of each question key (``recipe.eval.sequential.latest_answer_summary``) and writes
``latest_answer.json`` beside the run's files: one summary per T, plus ``restated_cases_left_out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipe.eval.sequential import latest_answer_summary

METRICS = ("reliability", "generality", "locality")


def summarise(run: Path) -> dict:
    out = {}
    for path in sorted(run.glob("T*.jsonl"), key=lambda p: int(p.stem[1:])):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.stem] = latest_answer_summary(int(path.stem[1:]), rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--dataset", help="the run's dataset (unused: the rows carry their prompts)")
    p.add_argument("--data-dir", help="unused; accepted like every analysis")
    args = p.parse_args(argv)
    result = summarise(args.run)
    (args.run / "latest_answer.json").write_text(json.dumps(result, indent=1))
    for t, s in result.items():
        cells = ", ".join(f"{m} {s['tf'][m]:.3f}/{s['em'][m]:.3f}" for m in METRICS)
        print(f"{t}: {s['cases']} cases kept ({s['restated_cases_left_out']} restated later left out): {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
