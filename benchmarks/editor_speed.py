"""Edit time of the optimising editors with and without their read-once inputs, on the same edits.

    RECIPE_DATA_DIR=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/editor_speed.py --editors rome,memit,tpatcher,grace --edits 5
    .venv/bin/python benchmarks/editor_speed.py --report      # table over every benchmarks/results/editor_speed/*.json

ROME, MEMIT, T-Patcher and GRACE train something per edit with tens of forward/backward passes.
Parts of those passes never change within one edit, and each editor computes them once
(``reuse_inputs``, on by default):

- ROME / MEMIT: the columns before the fact token (``recipe.lm.FrozenPrefix``);
- T-Patcher at the last layer: the norm and head on the layer's output read once (``TPatcherEditor._step``), and the
  memory texts' MLP inputs kept between edits;
- GRACE: only the layers above the codebook (``EditedLM.forward_above``).

For each editor two copies of the model are edited with the first ``--edits`` zsRE edits of the seed-0
shuffle (the order of ``recipe eval``), one with ``reuse_inputs = False`` (full forwards at every
step, the reference) and one with the default, alternately edit by edit so machine load hits both
alike. Reported: median seconds per edit each way and their ratio, and how far the two edited models
are apart on the edit prompts and paraphrases: teacher-forced token accuracy of each and the largest
difference of a target token's log-probability.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parent / "results" / "editor_speed"
EDITORS = ("rome", "memit", "tpatcher", "grace")


def measure(editor_name: str, args) -> dict:
    import torch

    from recipe.data import load_dataset
    from recipe.editors import load_editor
    from recipe.lm import EditedLM
    from recipe.models import load_model

    torch.set_num_threads(args.threads)
    cases = load_dataset("zsre", args.data_dir)
    random.Random(0).shuffle(cases)
    cases = cases[:args.edits]
    sides = {}
    for reuse in (False, True):
        model, tokenizer, spec = load_model(args.model)
        lm = EditedLM(model, tokenizer, spec)
        editor = load_editor(editor_name, lm, None, **json.loads(args.set))
        editor.reuse_inputs = reuse
        sides[reuse] = (lm, editor, [])
    for c in cases:
        for reuse in (False, True):
            _, editor, times = sides[reuse]
            t0 = time.perf_counter()
            editor.edit(c.requests)
            times.append(time.perf_counter() - t0)
    prompts = [r.prompt for c in cases for r in c.requests] + [g.prompt for c in cases for g in c.generality]
    targets = [r.target_new for c in cases for r in c.requests] + [g.target for c in cases for g in c.generality]
    scores = {reuse: sides[reuse][0].score(prompts, targets, prefixes=None) for reuse in (False, True)}
    diff = max(abs(a - b) for s_full, s_fast in zip(scores[False], scores[True])
               for a, b in zip(s_full.logprobs, s_fast.logprobs))
    med = statistics.median
    full_s, fast_s = med(sides[False][2]), med(sides[True][2])
    return {
        "editor": editor_name, "model": spec.name, "edits": len(cases), "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "set": json.loads(args.set),
        "full_s_per_edit": {"median": full_s, "all": sides[False][2]},
        "reuse_s_per_edit": {"median": fast_s, "all": sides[True][2]},
        "speedup": full_s / fast_s,
        "queries": len(prompts),
        "accuracy_full": statistics.fmean(s.accuracy for s in scores[False]),
        "accuracy_reuse": statistics.fmean(s.accuracy for s in scores[True]),
        "max_abs_logprob_diff": diff,
    }


def report(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not rows:
        raise SystemExit(f"no results in {out}")
    lines = ["| editor | edits | s per edit, full forwards | s per edit, read-once inputs | speed-up | "
             "accuracy full / read-once | max abs Δ log-prob | date |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['editor']} | {r['edits']} | {r['full_s_per_edit']['median']:.2f} | "
                     f"{r['reuse_s_per_edit']['median']:.2f} | {r['speedup']:.2f}× | {r['accuracy_full']:.3f} / "
                     f"{r['accuracy_reuse']:.3f} | {r['max_abs_logprob_diff']:.2e} | {r['date']} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--editors", default=",".join(EDITORS), help=f"comma-separated, from {', '.join(EDITORS)}")
    p.add_argument("--edits", type=int, default=5)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--set", default="{}", help="JSON config overrides for every editor, e.g. '{\"steps\": 5}'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $RECIPE_DATA_DIR)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true", help="only rebuild the table from the JSON files in --out")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for name in args.editors.split(","):
            if name not in EDITORS:
                p.error(f"--editors: {name!r} is not one of {', '.join(EDITORS)}")
            result = measure(name, args)
            (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            print(f"{name}: {result['full_s_per_edit']['median']:.2f} -> {result['reuse_s_per_edit']['median']:.2f} s "
                  f"per edit ({result['speedup']:.2f}x), max |Δ logp| {result['max_abs_logprob_diff']:.2e}", flush=True)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
