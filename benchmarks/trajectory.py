"""How an editor's scores move as edits pile up: one lifelong run of N edits, probed every K edits.

    RECIPE_DATA_DIR=... OMP_NUM_THREADS=2 .venv/bin/python benchmarks/trajectory.py --editor memit \
        --dataset zsre --edits 1000 --every 50 [--probe-cases 50] [--wikitext 10] [--set KEY=VALUE] [--out DIR]
    .venv/bin/python benchmarks/trajectory.py --plot DIR       # table + plot of what DIR holds

`recipe eval` scores a lifelong round once, after its last edit. This applies the same edits in the same
order (the first N cases of the seed-0 shuffle, one case at a time) and, before the first edit and after
every K, measures teacher-forced:

- ``early``: reliability of the first P edits (do old edits survive the later ones?; before any edit,
  how often the unedited model already predicts their new targets' tokens);
- ``recent``: reliability of the last min(K, P) edits applied (does the model still take new ones?);
- ``locality``: agreement with the unedited model's predictions on the first P cases' locality probes;
- ``wikitext_ppl``: WikiText perplexity on W paragraphs (`recipe general`'s seeded subset).

Each probe is appended to ``DIR/trajectory.jsonl`` and the editor's state saved to ``DIR/trajectory.state``
after it, so the same command run again continues from the last probe. Writes ``trajectory.md`` and
``trajectory.png`` (default DIR: ``runs/trajectory-<editor>-<dataset>``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm  # noqa: E402

from recipe.editors.state_file import load_state, save_state  # noqa: E402
from recipe.errors import RecipeError  # noqa: E402
from recipe.eval.editing import apply_edits  # noqa: E402
from recipe.eval.general_sets import score_wikitext  # noqa: E402
from recipe.eval.metrics import locality_accuracy  # noqa: E402

log = logging.getLogger("benchmarks.trajectory")
METRICS = ("early", "recent", "locality")


def _score(lm, pairs: list[tuple[str, str]]) -> list:
    """``lm.score`` of (prompt, target) pairs ([] for none)."""
    return lm.score([p for p, _ in pairs], [t for _, t in pairs]) if pairs else []


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _reliability(lm, cases) -> float | None:
    return _mean([s.accuracy for s in _score(lm, [(r.prompt, r.target_new) for c in cases for r in c.requests])])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines() if line.strip()]


class Probe:
    """The fixed probes of one run; ``__call__(lm, edits)`` scores the model after ``edits`` edits."""

    def __init__(self, lm, order, probe_cases: int, every: int, wikitext: list[str]):
        self.order, self.every, self.n = order, every, probe_cases
        self.loc = [(p.prompt, p.target) for c in order[:probe_cases] for p in c.locality]
        self.base = _score(lm, self.loc)
        self.wikitext = wikitext

    def __call__(self, lm, edits: int) -> dict:
        t0 = time.perf_counter()
        recent = self.order[max(0, edits - min(self.every, self.n)):edits]
        early = self.order[:min(edits, self.n) if edits else self.n]  # at 0: the unedited model on them
        row = {"edits": edits, "early": _reliability(lm, early),
               "recent": _reliability(lm, recent),
               "locality": _mean([locality_accuracy(b, a) for b, a in zip(self.base, _score(lm, self.loc))]),
               "wikitext_ppl": score_wikitext(lm, self.wikitext)["ppl"] if self.wikitext else None}
        row["probe_s"] = time.perf_counter() - t0
        return row


def _resume(out: Path, editor, meta: dict) -> list[dict]:
    """The probes kept in ``out`` up to the saved state (which is loaded into ``editor``), else []."""
    rows_file, state_dir = out / "trajectory.jsonl", out / "trajectory.state"
    if not any(out.glob("trajectory.state*")) or not rows_file.exists():  # (an atomic save's leftovers too)
        return []
    state, saved = load_state(state_dir)
    theirs = {k: saved.get(k) for k in meta}
    if theirs != meta:
        raise RecipeError(f"{out} holds another trajectory ({theirs}); use another --out or delete it")
    editor.load_state_dict(state)
    return [r for r in _rows(out) if r["edits"] <= saved["applied"]]


def run(lm, editor, order, every: int, probe_cases: int, wikitext: list[str], out: Path, meta: dict,
        progress: bool = True) -> list[dict]:
    """Apply ``order``'s edits one case at a time, probing before the first and after every ``every``."""
    if every < 1 or probe_cases < 1:
        raise RecipeError(f"--every and --probe-cases must be positive, got {every} and {probe_cases}")
    out.mkdir(parents=True, exist_ok=True)
    probe = Probe(lm, order, probe_cases, every, wikitext)  # before any edit: the unedited predictions
    rows = _resume(out, editor, meta)
    if not rows:
        rows = [probe(lm, 0) | {"edit_s": 0.0}]
    (out / "trajectory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = rows[-1]["edits"]
    bar = tqdm(total=len(order), initial=done, desc=f"{editor.name}: edits", disable=not progress)
    edit_s = 0.0

    def probe_every(k: int, times: list[float]) -> None:
        nonlocal edit_s
        edits = done + k + 1
        edit_s += times[-1]
        if edits % every == 0 or edits == len(order):
            row = probe(lm, edits) | {"edit_s": edit_s}
            edit_s = 0.0
            rows.append(row)
            with open(out / "trajectory.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            save_state(editor.state_dict(), out / "trajectory.state", meta | {"applied": edits})
            bar.set_postfix({m: f"{row[m]:.3f}" for m in METRICS if row[m] is not None})

    apply_edits(editor, order[done:], bar=bar, after_each=probe_every)
    bar.close()
    return rows


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}"


def report(out: Path, title: str) -> str:
    """``trajectory.md`` (one row per probe) and ``trajectory.png`` from ``out/trajectory.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(out)
    lines = [f"{title}", "", "| edits | early reliability | recent reliability | locality | WikiText ppl | edit s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['edits']} | {_fmt(r['early'])} | {_fmt(r['recent'])} | {_fmt(r['locality'])} | "
              f"{_fmt(r['wikitext_ppl'])} | {r['edit_s']:.1f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    (out / "trajectory.md").write_text(table)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["edits"] for r in rows]
    for m in METRICS:
        pts = [(x, r[m]) for x, r in zip(xs, rows) if r[m] is not None]
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    left.set(xlabel="edits applied", ylabel="teacher-forced accuracy", ylim=(-0.02, 1.02), title=title)
    left.legend()
    pts = [(x, r["wikitext_ppl"]) for x, r in zip(xs, rows) if r["wikitext_ppl"] is not None]
    if pts:
        right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="black")
        right.set_yscale("log")
    right.set(xlabel="edits applied", ylabel="WikiText perplexity", title="WikiText perplexity")
    fig.tight_layout()
    fig.savefig(out / "trajectory.png", dpi=120)
    plt.close(fig)
    return table


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--editor")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one editor config key (repeatable), as in recipe eval")
    ap.add_argument("--dataset", default="zsre")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--probe-cases", type=int, default=50)
    ap.add_argument("--wikitext", type=int, default=10, help="WikiText paragraphs (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", help="default: $RECIPE_DATA_DIR")
    ap.add_argument("--out")
    ap.add_argument("--plot", metavar="DIR", help="only write the table and plot of DIR")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.plot:
        print(report(Path(args.plot), Path(args.plot).name))
        return 0
    if not args.editor:
        ap.error("--editor is required (or --plot DIR)")

    from recipe.cli import parse_overrides
    from recipe.data import load_dataset
    from recipe.editors import load_editor
    from recipe.editors.base import editor_config
    from recipe.eval.general import load_general
    from recipe.eval.sequential import seeded_order
    from recipe.lm import EditedLM
    from recipe.models import load_model

    config = editor_config(args.editor, None, **parse_overrides(args.set))  # fail before the model loads
    cases = load_dataset(args.dataset, args.data_dir)
    if args.edits > len(cases):
        raise RecipeError(f"--edits {args.edits}: the dataset has only {len(cases)} cases")
    wikitext = load_general(args.data_dir, ["wikitext"], args.wikitext, args.seed)["wikitext"] if args.wikitext else []
    model, tokenizer, spec = load_model(args.model)
    lm = EditedLM(model, tokenizer, spec)
    editor = load_editor(args.editor, lm, config)
    out = Path(args.out or f"runs/trajectory-{args.editor}-{args.dataset}")
    meta = {"editor": args.editor, "dataset": args.dataset, "model": args.model, "edits": args.edits,
            "every": args.every, "probe_cases": args.probe_cases, "wikitext": args.wikitext, "seed": args.seed,
            "set": sorted(args.set)}
    run(lm, editor, seeded_order(cases, args.seed)[:args.edits], args.every, args.probe_cases, wikitext, out, meta)
    (out / "run.json").write_text(json.dumps({"argv": sys.argv[1:] if argv is None else list(argv), **meta}, indent=1))
    settings = "".join(f" --set {pair}" for pair in args.set)
    print(report(out, f"{args.editor}{settings} on {args.dataset} ({args.model}, seed {args.seed})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
