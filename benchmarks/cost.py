"""Edit and inference cost of one editor on SmolLM2; one process per editor.

    RECIPE_DATA_DIR=... OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost.py --editor recipe [--edits 20]
    .venv/bin/python benchmarks/cost.py --report      # table + plot over every benchmarks/results/cost/*.json

Measures, on the first ``--edits`` zsRE edits of the seed-0 shuffle (the same order as ``recipe eval``):

- edit time per edit (median, p95), edits applied one after another;
- teacher-forced scoring time per query (edit prompts, paraphrases and locality prompts, batch 16);
- ``generate()`` time for exactly ``--new-tokens`` greedy tokens at batch 1 and batch 16, on the
  unedited model (before any edit) and after the edits, on the same prompts: half of them edit
  prompts (RECIPE retrieves a prefix), half unrelated prompts (the sentinel should reject them);
- for editors that leave the weights alone (RECIPE), the unedited model is the same object with no
  prefixes, so both are timed alternately in one loop: the ratio is not confounded by machine load;
  RECIPE is timed twice, with its prefixes' keys/values cached from earlier calls (``generate_ratio``)
  and with the cache emptied before every call (``generate_ratio_cold``: each prefix's first use);
- resident memory after loading and its peak (VmHWM) at the end: editing + inference overhead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("benchmarks.cost")
OUT = Path(__file__).resolve().parent / "results" / "cost"


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _gen_timings(lm, prompts: list[str], new_tokens: int, reps: int, prefixes="auto", cold: bool = False) -> dict:
    """Seconds per generate() call at batch 1 (per prompt) and batch 16 (per batch of 16 prompts).

    ``cold``: the prefix key/value cache is emptied before every call, so each retrieved prefix is
    computed again (a prefix's first use); otherwise prefixes seen before come from the cache.
    """
    from recipe.lm import AUTO

    pre = AUTO if prefixes == "auto" else None  # the editor's prefixes, or none (the unedited model)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def call(batch):
        if cold:
            lm.prefix_cache.clear()
        lm.generate(batch, prefixes=pre, **kw)

    def batch1():
        for p in prompts:
            call([p])

    def batch16():
        for s in range(0, len(prompts), 16):
            call(prompts[s:s + 16])

    b1, b16 = _timed(batch1, reps), _timed(batch16, reps)
    return {"batch1_s_per_prompt": [t / len(prompts) for t in b1],
            "batch16_s_per_batch": [t / max(1, len(prompts) // 16) for t in b16]}


def measure(args) -> dict:
    import torch

    from recipe.data import load_dataset
    from recipe.editors import load_editor
    from recipe.eval.editing import apply_edits
    from recipe.eval.sequential import proc_status_mb
    from recipe.lm import EditedLM
    from recipe.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer, spec = load_model(args.model)
    lm = EditedLM(model, tokenizer, spec, max_batch=16)
    rss_loaded = proc_status_mb("VmRSS")
    cases = load_dataset("zsre", args.data_dir)
    random.Random(0).shuffle(cases)
    cases = cases[:args.edits]
    edit_prompts = [c.requests[0].prompt for c in cases][:16]
    unrelated = [c.locality[0].prompt for c in cases if c.locality][:16]
    gen_prompts = (edit_prompts[:8] + unrelated[:8]) if len(edit_prompts) >= 8 else edit_prompts + unrelated
    score_prompts = ([c.requests[0].prompt for c in cases] + [g.prompt for c in cases for g in c.generality]
                     + [p.prompt for c in cases for p in c.locality])
    score_targets = ([c.requests[0].target_new for c in cases] + [g.target for c in cases for g in c.generality]
                     + [p.target for c in cases for p in c.locality])

    with torch.no_grad():
        lm.generate(gen_prompts[:2], max_new_tokens=2)  # warm-up
        base_gen = _gen_timings(lm, gen_prompts, args.new_tokens, args.reps, prefixes=None)
        base_score = _timed(lambda: lm.score(score_prompts, score_targets, prefixes=None), 1)[0]

    editor = load_editor(args.editor, lm, None, **json.loads(args.set))
    edit_s = apply_edits(editor, cases)
    with torch.no_grad():
        score_s = _timed(lambda: lm.score(score_prompts, score_targets), 1)[0]
        edited_gen = _gen_timings(lm, gen_prompts, args.new_tokens, args.reps)
        interleaved = None
        if args.editor in ("recipe", "none"):  # weights untouched: the unedited model = no prefixes
            sides = (("base", None, False), ("edited", "auto", False), ("edited_cold", "auto", True))
            interleaved = {name: {"batch1_s_per_prompt": [], "batch16_s_per_batch": []} for name, _, _ in sides}
            for _ in range(args.reps):
                for name, pre, cold in sides:
                    t = _gen_timings(lm, gen_prompts, args.new_tokens, 1, prefixes=pre, cold=cold)
                    for k, v in t.items():
                        interleaved[name][k] += v
        retrieved = None
        if hasattr(editor, "last_retrieval"):
            editor._provide(gen_prompts)
            retrieved = sum(r.edit_id is not None for r in editor.last_retrieval)
    med = statistics.median
    result = {
        "editor": args.editor, "model": spec.name, "edits": len(cases), "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                   f"{args.threads}", "new_tokens": args.new_tokens, "reps": args.reps,
        "edit_ms_median": 1e3 * med(edit_s), "edit_ms_p95": 1e3 * _p(edit_s, 0.95),
        "score_ms_per_query": 1e3 * score_s / len(score_prompts),
        "score_ms_per_query_unedited": 1e3 * base_score / len(score_prompts),
        "generate_prompts": {"edit_prompts": len([p for p in gen_prompts if p in edit_prompts]),
                             "unrelated": len([p for p in gen_prompts if p not in edit_prompts]),
                             "retrieved_prefix": retrieved},
        "generate_unedited": {k: med(v) for k, v in base_gen.items()},
        "generate_edited": {k: med(v) for k, v in edited_gen.items()},
        "rss_loaded_mb": rss_loaded, "rss_peak_mb": proc_status_mb("VmHWM"),
    }
    if interleaved is not None:
        result["generate_interleaved"] = {name: {k: med(v) for k, v in d.items()} for name, d in interleaved.items()}
    src = result.get("generate_interleaved", {"base": result["generate_unedited"], "edited": result["generate_edited"]})
    result["generate_ratio"] = {k: src["edited"][k] / src["base"][k] for k in src["base"]}
    if "edited_cold" in src:  # every prefix computed afresh (first use), beside the cached ones above
        result["generate_ratio_cold"] = {k: src["edited_cold"][k] / src["base"][k] for k in src["base"]}
    return result


def report(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not rows:
        raise SystemExit(f"no results in {out}")
    lines = ["| editor | edits | edit ms median | edit ms p95 | score ms/query | generate b1 s/prompt | "
             "generate b16 s/batch | generate ratio b1 / b16 | cold-prefix ratio b1 / b16 | RSS loaded → peak MB |",
             "|" + "---|" * 10]
    for r in rows:
        g, ratio, cold = r["generate_edited"], r["generate_ratio"], r.get("generate_ratio_cold")
        cold_cell = f"{cold['batch1_s_per_prompt']:.3f} / {cold['batch16_s_per_batch']:.3f}" if cold else "n/a"
        lines.append(f"| {r['editor']} | {r['edits']} | {r['edit_ms_median']:.1f} | {r['edit_ms_p95']:.1f} | "
                     f"{r['score_ms_per_query']:.1f} | {g['batch1_s_per_prompt']:.3f} | {g['batch16_s_per_batch']:.3f} | "
                     f"{ratio['batch1_s_per_prompt']:.3f} / {ratio['batch16_s_per_batch']:.3f} | {cold_cell} | "
                     f"{r['rss_loaded_mb']:.0f} → {r['rss_peak_mb']:.0f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    _plot(rows, out / "cost.png")
    return table


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["editor"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].bar(names, [r["edit_ms_median"] for r in rows])
    ax[0].set_yscale("log")
    ax[0].set_ylabel("edit time per edit, ms (median)")
    ax[1].bar(names, [r["generate_ratio"]["batch16_s_per_batch"] for r in rows])
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set_ylabel("generate() time, edited / unedited (batch 16)")
    for a in ax:
        a.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--editor", help="editor name (see `recipe list`)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--set", default="{}", help='editor config overrides as JSON, e.g. \'{"steps": 20}\'')
    p.add_argument("--edits", type=int, default=20, help="zsRE edits applied one after another")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--reps", type=int, default=3, help="repetitions of each generate timing (median kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true", help="only write table.md + cost.png from the saved JSON")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.report:
        print(report(args.out))
        return 0
    if not args.editor:
        p.error("--editor is required unless --report")
    result = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.editor}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
