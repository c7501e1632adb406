"""Edit time of one editor under two versions of the code, side by side on the same machine load.

    git worktree add /tmp/old <commit>
    RECIPE_DATA_DIR=... .venv/bin/python benchmarks/code_speed.py --old /tmp/old --editors tpatcher,memit,rome \\
        --dataset counterfact --edits 4

For each editor, two processes start at once, one importing ``recipe`` from ``--old`` and one from
``--new`` (this checkout by default). Each loads SmolLM2, makes one warm-up edit, times the next
``--edits`` edits of the seed-0 shuffle one by one, then scores the edited prompts teacher-forced.
Reported: the median seconds per edit of each, their ratio, and the largest difference of a prompt's
summed target log-probability between the two (a speed change must not change the edits).
Results: ``benchmarks/results/code_speed/<editor>-<dataset>.json``.

``--editors score``: instead of editing, the unedited model scores (teacher-forced, then free generation)
every query of the first ``--edits`` cases as the sequential loop does; reported per query, with the
largest log-prob difference and how many predictions and continuations are identical.
``--editors padding``: only count the tokens of those queries, and the token slots that batches of 16
fill in the order given and in ``EditedLM.length_order`` (no model forward; this checkout's code).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "code_speed"


def commit(code: str) -> str:
    """The checkout's commit (what a result records instead of this machine's path)."""
    return subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def worker(code: str, editor: str, dataset: str, edits: int, data_dir: str | None) -> dict:
    """Runs in a child process whose ``recipe`` comes from ``code``."""
    sys.path.insert(0, code)
    import random

    import torch

    from recipe.data import load_dataset
    from recipe.editors import load_editor
    from recipe.lm import EditedLM
    from recipe.models import load_model

    torch.set_num_threads(1)
    cases = load_dataset(dataset, data_dir)
    random.Random(0).shuffle(cases)
    cases = cases[:edits + 1]
    model, tokenizer, spec = load_model("smollm2-135m")
    lm = EditedLM(model, tokenizer, spec)
    ed = load_editor(editor, lm, None)
    ed.edit(cases[0].requests)  # warm-up: covariance / caches
    times = []
    for c in cases[1:]:
        t = time.perf_counter()
        ed.edit(c.requests)
        times.append(time.perf_counter() - t)
    requests = [r for c in cases for r in c.requests]
    with torch.no_grad():
        logp, _, _, mask = lm.target_logprobs([r.prompt for r in requests], [r.target_new for r in requests],
                                              prefixes=None)
    return {"code": commit(code), "times": times, "median": statistics.median(times), "logp": (logp * mask).sum(1).tolist()}


def score_worker(code: str, dataset: str, n_cases: int, data_dir: str | None) -> dict:
    """Runs in a child process whose ``recipe`` comes from ``code``: the loop's scoring of n_cases cases."""
    sys.path.insert(0, code)
    import random

    import torch

    from recipe.data import load_dataset
    from recipe.eval.sequential import _queries, _score_queries
    from recipe.lm import EditedLM
    from recipe.models import load_model

    torch.set_num_threads(1)
    cases = load_dataset(dataset, data_dir)
    random.Random(0).shuffle(cases)
    qs = _queries(cases[:n_cases])
    model, tokenizer, spec = load_model("smollm2-135m")
    scores, gens, (score_s, gen_s) = _score_queries(EditedLM(model, tokenizer, spec), qs, True)
    return {"code": commit(code), "queries": len(qs), "score_ms_per_query": 1000 * score_s / len(qs),
            "generate_ms_per_query": 1000 * gen_s / len(qs),
            "logp": [sum(x.logprobs) for x in scores], "predicted": [list(x.predicted_ids) for x in scores],
            "generations": gens}


def padding(dataset: str, n_cases: int, data_dir: str | None, batch: int = 16) -> dict:
    """Tokens of the loop's queries for the first n_cases cases, and the slots batches pad them to."""
    import random

    from recipe.data import load_dataset
    from recipe.eval.sequential import _queries
    from recipe.lm import EditedLM
    from recipe.models import load_model

    cases = load_dataset(dataset, data_dir)
    random.Random(0).shuffle(cases)
    qs = _queries(cases[:n_cases])
    lm = EditedLM(*load_model("smollm2-135m"))
    n = [len(lm.prompt_ids(q.prompt)) + len(lm.target_ids(q.target)) for q in qs]
    order = lm.length_order([q.prompt for q in qs], [q.target for q in qs])

    def slots(rows):
        return sum(max(rows[s:s + batch]) * len(rows[s:s + batch]) for s in range(0, len(rows), batch))

    return {"dataset": dataset, "cases": n_cases, "queries": len(qs), "tokens": sum(n), "slots_given": slots(n),
            "slots_length_order": slots([n[i] for i in order])}


def compare(args, editor: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    procs = {side: subprocess.Popen([sys.executable, __file__, "--worker", code, "--editors", editor, "--dataset",
                                     args.dataset, "--edits", str(args.edits), *data], stdout=subprocess.PIPE, env=env)
             for side, code in (("old", args.old), ("new", args.new))}
    got = {}
    for side, p in procs.items():
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{side} worker ({editor}) failed with exit code {p.returncode}")
        got[side] = json.loads(out.decode().strip().splitlines()[-1])
    if editor == "score":
        old, new = got["old"], got["new"]
        return {"editor": editor, "dataset": args.dataset, "cases": args.edits, **got,
                "speedup": old["score_ms_per_query"] / new["score_ms_per_query"],
                "generate_speedup": old["generate_ms_per_query"] / new["generate_ms_per_query"],
                "max_abs_dlogp": max(abs(a - b) for a, b in zip(old["logp"], new["logp"])),
                "same_predictions": sum(a == b for a, b in zip(old["predicted"], new["predicted"])),
                "same_generations": sum(a == b for a, b in zip(old["generations"], new["generations"]))}
    return {"editor": editor, "dataset": args.dataset, "edits": args.edits, **got,
            "speedup": got["old"]["median"] / got["new"]["median"],
            "max_abs_dlogp": max(abs(a - b) for a, b in zip(got["old"]["logp"], got["new"]["logp"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="checkout whose recipe/ is the baseline")
    ap.add_argument("--new", default=str(ROOT), help="checkout to compare (default: this one)")
    ap.add_argument("--editors", default="tpatcher,memit,rome")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--edits", type=int, default=4)
    ap.add_argument("--data-dir", default=os.environ.get("RECIPE_DATA_DIR"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if args.editors == "score":
            print(json.dumps(score_worker(args.worker, args.dataset, args.edits, args.data_dir)))
        else:
            print(json.dumps(worker(args.worker, args.editors, args.dataset, args.edits, args.data_dir)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    editors = args.editors.split(",")
    if editors == ["padding"]:
        r = padding(args.dataset, args.edits, args.data_dir)
        (args.out / f"padding-{args.dataset}.json").write_text(json.dumps(r, indent=1))
        print(f"{r['dataset']}: {r['queries']} queries of {r['cases']} cases, {r['tokens']} tokens; batches of 16 "
              f"pad them to {r['slots_given']} slots in the order given, {r['slots_length_order']} in length order")
        return 0
    if not args.old:
        ap.error("--old is required")
    if editors != ["score"]:
        print("| editor | edits | median s per edit, old | new | speed-up | max abs Δ target log-prob |")
        print("|---|---|---|---|---|---|")
    for editor in editors:
        r = compare(args, editor)
        (args.out / f"{editor}-{args.dataset}.json").write_text(json.dumps(r, indent=1))
        if editor == "score":
            old, new = r["old"], r["new"]
            print(f"scoring {new['queries']} queries of {args.edits} cases, ms per query old / new: teacher-forced "
                  f"{old['score_ms_per_query']:.1f} / {new['score_ms_per_query']:.1f} ({r['speedup']:.2f}×), "
                  f"generation {old['generate_ms_per_query']:.1f} / {new['generate_ms_per_query']:.1f}; "
                  f"max abs Δ log-prob {r['max_abs_dlogp']:.1e}; same predictions {r['same_predictions']}, "
                  f"same continuations {r['same_generations']}", flush=True)
            continue
        print(f"| {editor} | {r['edits']} | {r['old']['median']:.2f} | {r['new']['median']:.2f} | "
              f"{r['speedup']:.2f}× | {r['max_abs_dlogp']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
