"""Split a `recipe eval` run's per-case results by whether the edit's new target occurs in training.

    python benchmarks/seen_split.py runs/recipe-zsre --dataset zsre [--data-dir DIR]

A target is "seen" when it is the target_new of some training edit (train.data.TRAIN_DATASETS,
compared case-insensitively after stripping). A second split: "shared subject" cases have a subject
that another edit of the same set gives a *different* new target (zsRE edits one question several
times with different answers; once all are applied, at most one of them can be right for the
shared question), "unique subject" cases do not. Writes ``seen_split.json`` beside the run's files
and prints one table per T: teacher-forced / exact-match means for each group.

``conflicts`` in the JSON bounds what any editor can score once the whole set is applied: an editor
that holds one answer per (subject, question), as a consistent knowledge base does, gets at most
``ceiling`` = sum over subjects of the commonest target's count / cases right. It groups by subject
alone; in zsRE the edits that share a subject nearly always ask the same question (546 of the 574
same-subject pairs have prompts at MiniLM cosine >= 0.8), so the bound is close to exact there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for `train`

from recipe.data import load_dataset
from train.data import TRAIN_DATASETS

METRICS = ("reliability", "generality", "locality")


def training_targets(data_dir: str | None) -> set[str]:
    return {r.target_new.strip().casefold() for name in TRAIN_DATASETS
            for case in load_dataset(name, data_dir) for r in case.requests}


def split(run: Path, dataset: str, data_dir: str | None) -> dict:
    seen_targets = training_targets(data_dir)
    eval_cases = load_dataset(dataset, data_dir)
    target_of = {c.case_id: [r.target_new for r in c.requests] for c in eval_cases}
    targets_of_subject: dict[str, set[str]] = {}
    for c in eval_cases:
        for r in c.requests:
            targets_of_subject.setdefault(_norm(r.subject), set()).add(_norm(r.target_new))
    shared = {c.case_id for c in eval_cases
              if any(r.subject and len(targets_of_subject[_norm(r.subject)]) > 1 for r in c.requests)}
    out: dict = {"conflicts": conflicts(eval_cases)}
    for path in sorted(run.glob("T*.jsonl"), key=lambda p: int(p.stem[1:])):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        groups: dict[str, list[dict]] = {"seen": [], "never-seen": [], "unique subject": [], "shared subject": []}
        for r in rows:
            seen = all(t.strip().casefold() in seen_targets for t in target_of[r["case_id"]])
            groups["seen" if seen else "never-seen"].append(r)
            groups["shared subject" if r["case_id"] in shared else "unique subject"].append(r)
        out[path.stem] = {
            name: {"cases": len(g), **{f"{mode}/{m}": mean_known([r[mode].get(m) for r in g])
                                        for mode in ("tf", "em") for m in METRICS}}
            for name, g in groups.items()}
    return out


def conflicts(cases) -> dict:
    """How many cases share their subject with an edit to another answer, and the ceiling it implies."""
    by_subject: dict[str, list[str]] = {}
    for c in cases:
        r = c.requests[0]
        by_subject.setdefault(_norm(r.subject) or c.case_id, []).append(_norm(r.target_new))
    several = [ts for ts in by_subject.values() if len(ts) > 1]
    best = sum(max(ts.count(t) for t in set(ts)) for ts in by_subject.values())
    return {"cases": len(cases), "subjects": len(by_subject), "subjects_with_several_cases": len(several),
            "cases_in_them": sum(map(len, several)),
            "cases_with_conflicting_answer": sum(len(ts) for ts in several if len(set(ts)) > 1),
            "ceiling": best / max(1, len(cases))}


def _norm(text: str | None) -> str:
    return (text or "").strip().casefold()


def mean_known(xs):
    """The mean of the values that are not None; None when there are none."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    result = split(args.run, args.dataset, args.data_dir)
    (args.run / "seen_split.json").write_text(json.dumps(result, indent=1))
    fmt = lambda x: "  -  " if x is None else f"{x:.3f}"  # noqa: E731
    c = result["conflicts"]
    print(f"conflicts: {c['cases_with_conflicting_answer']} of {c['cases']} cases share their subject with an edit "
          f"to another answer; one-answer-per-subject ceiling {c['ceiling']:.3f}")
    for t, groups in ((k, v) for k, v in result.items() if k != "conflicts"):
        print(f"{t}: " + "   ".join(
            f"{name} ({g['cases']}): " + ", ".join(f"{m} {fmt(g['tf/' + m])}/{fmt(g['em/' + m])}" for m in METRICS)
            for name, g in groups.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
