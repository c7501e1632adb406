"""One table and one plot over every sequential-edit run kept under benchmarks/results/.

    .venv/bin/python benchmarks/editors_table.py [--out benchmarks/results/editors]

Reads each ``*/summary.json`` + ``run.json`` written by ``recipe eval`` (copied there by
``python -m benchmarks.run``: the foundation, recipe, baselines and baselines-1000 experiments) and writes ``table.md`` (editor × dataset × T:
reliability, generality, locality as teacher-forced / free-generation exact match, edit time, peak
memory, cases scored) and ``editors.png`` (each metric against T, one line per editor).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results"


def _arg(argv: list[str], flag: str, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default


def collect(root: Path = ROOT) -> list[dict]:
    rows = []
    for summary in sorted(root.glob("*/*/summary.json")):
        run = json.loads((summary.parent / "run.json").read_text()) if (summary.parent / "run.json").exists() else {}
        argv = run.get("argv", [])
        if not argv:  # not a `recipe eval` folder (e.g. a hand-made comparison): reported on its own
            continue
        editor, dataset = _arg(argv, "--editor", "ft"), _arg(argv, "--dataset", "?")
        if "statement_separator" in " ".join(argv) or summary.parent.name.startswith(("ablation-", "v1-")):
            continue  # ablations and the superseded v1 RECIPE checkpoint are reported on their own
        if "--config" in argv:  # a non-default config is another line in the table
            editor = f"{editor} ({Path(_arg(argv, '--config')).stem})"
        sets = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]  # other settings: their own line
        shown = [x for x in sets if not x.startswith(("duplicates=", "verifier="))]
        if any(x.startswith("verifier=") for x in sets):  # RECIPE + the EditVerifier
            editor = f"{editor} + verifier"
        if summary.parent.name.startswith("tpatcher-one-"):  # the earlier T-Patcher, before per-token neurons
            shown.append("neurons=one")
        if shown:
            editor = f"{editor} ({', '.join(shown)})"
        if _arg(argv, "--model", "smollm2-135m") != "smollm2-135m":  # other models: their own lines
            editor = f"{editor} [{_arg(argv, '--model')}]"
        for s in json.loads(summary.read_text()):
            rows.append({"editor": editor, "dataset": dataset, "run": f"{summary.parent.parent.name}/{summary.parent.name}",
                         "no_generation": "--no-generation" in argv, **s})
    return rows


def _cell(s: dict, key: str) -> str:
    tf, em = s["tf"].get(key), s["em"].get(key)
    if tf is None:
        return "—"
    return f"{tf:.3f} / {em:.3f}" if em is not None else f"{tf:.3f} / —"


def table(rows: list[dict]) -> str:
    lines = ["| editor | dataset | T | cases (rounds) | reliability | generality | locality | edit s (median) | "
             "peak RSS MB | run |", "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["editor"], r["T"], -r["cases"])):
        peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "—"
        lines.append(f"| {r['editor']} | {r['dataset']} | {r['T']} | {r['cases']} ({r['rounds']}) | "
                     f"{_cell(r, 'reliability')} | {_cell(r, 'generality')} | {_cell(r, 'locality')} | "
                     f"{r['edit_time_s']['median']:.3f} | {peak} | {r['run']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    metrics = ("reliability", "generality", "locality")
    editors = sorted({r["editor"] for r in rows})
    colors = plt.get_cmap("tab20").colors
    style = {e: {"color": colors[k % len(colors)], "marker": "osD^v<>"[k % 7], "linestyle": ("-", "--", ":")[k % 3]}
             for k, e in enumerate(editors)}  # one look per editor in every panel
    fig, axes = plt.subplots(len(datasets), 3, figsize=(12, 3.2 * len(datasets) + 1.6), squeeze=False)
    for i, d in enumerate(datasets):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            for e in sorted({r["editor"] for r in rows if r["dataset"] == d}):
                best = {}  # T -> the row with the most cases
                for r in rows:
                    if r["dataset"] == d and r["editor"] == e and r["tf"].get(m) is not None:
                        if r["T"] not in best or r["cases"] > best[r["T"]]["cases"]:
                            best[r["T"]] = r
                ts = sorted(best)
                if ts:
                    ax.plot(ts, [best[t]["tf"][m] for t in ts], label=e, **style[e])
            ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{d}: {m} (teacher-forced)")
            ax.set_xlabel("T (edits applied before scoring)")
    handles = [plt.Line2D([], [], **style[e]) for e in editors]
    fig.legend(handles, editors, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 1.5 / (3.2 * len(datasets) + 1.6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT)
    p.add_argument("--out", type=Path, default=ROOT / "editors")
    args = p.parse_args(argv)
    rows = collect(args.results)
    if not rows:
        raise SystemExit(f"no summary.json under {args.results}")
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    plot(rows, args.out / "editors.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
