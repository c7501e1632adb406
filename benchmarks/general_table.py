"""One table and one plot over every general-ability run kept under benchmarks/results/general/.

    .venv/bin/python benchmarks/general_table.py [--results benchmarks/results/general] [--out ...]

Reads each ``*/general.json`` + ``run.json`` written by ``recipe general`` (copied there by
``python -m benchmarks.run``: the general and general-1000 experiments) and writes ``table.md`` (editor × dataset the edits came
from × T: MMLU, CSQA, ANLI accuracy, SQuAD 2.0 mean 1/perplexity, WikiText perplexity) and
``general.png`` (each score against T, one line per editor and dataset, the unedited model at T = 0).
Runs of one editor and dataset with different T (e.g. T = 100 in one folder, T = 1,000 in another) join
one line; runs over other item counts or seeds than the first one read are refused, since their scores
are not comparable.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results" / "general"
SCORES = (("mmlu", "accuracy", "MMLU"), ("csqa", "accuracy", "CSQA"), ("anli", "accuracy", "ANLI (r1-r3)"),
          ("squad", "inv_ppl", "SQuAD 2.0 1/ppl"), ("wikitext", "ppl", "WikiText ppl"))
WIKITEXT_CAP = 10.0  # in the plot, perplexities above 10 × the unedited one are drawn at the cap and listed


def _dataset(run: dict, folder: str, editor: str) -> str:
    """The dataset the edits came from: run.json's argv, else the folder name general-<editor>-<dataset>[-T]
    (the earliest runs kept no run.json)."""
    argv = run.get("argv", [])
    if "--dataset" in argv:
        return argv[argv.index("--dataset") + 1]
    if run.get("dataset"):
        return run["dataset"]
    prefix = f"general-{editor}-"
    return folder[len(prefix):].split("-")[0] if folder.startswith(prefix) else "?"


def collect(root: Path = ROOT) -> list[dict]:
    """One row per (run folder, T): editor, dataset, T, the five scores, the folder name."""
    rows, setting = [], None
    for path in sorted(root.glob("*/general.json")):
        result = json.loads(path.read_text())
        run_file = path.parent / "run.json"
        run = json.loads(run_file.read_text()) if run_file.exists() else {}
        this = (result.get("model"), result.get("seed"), json.dumps(result.get("items"), sort_keys=True))
        if setting is None:
            setting = this
        elif this != setting:
            raise SystemExit(f"{path}: model/seed/items {this} differ from the other runs' {setting}")
        for r in result["runs"]:
            scores = {name: r["scores"][name][key] for name, key, _ in SCORES}
            rows.append({"editor": result["editor"], "dataset": _dataset(run, path.parent.name, result["editor"]), "T": int(r["T"]),
                         "run": path.parent.name, **scores})
    return rows


def lines_of(rows: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(editor, dataset) -> T -> row; T = 0 (the unedited model) is the same in every run."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        out.setdefault((r["editor"], r["dataset"]), {})[r["T"]] = r
    return out


def _fmt(name: str, value: float) -> str:
    if name == "wikitext":
        return f"{value:.3f}" if value < 1e5 else f"{value:.2e}"
    return f"{value:.3f}"


def table(rows: list[dict]) -> str:
    unedited = {tuple(_fmt(n, r[n]) for n, _, _ in SCORES) for r in rows if r["T"] == 0}
    if len(unedited) > 1:
        raise SystemExit(f"the unedited scores differ between runs: {sorted(unedited)}")
    head = ["| editor | edits from | T | " + " | ".join(label for _, _, label in SCORES) + " | run |",
            "|" + "---|" * (len(SCORES) + 4)]
    body = [f"| unedited | | 0 | " + " | ".join(next(iter(unedited))) + " | |"] if unedited else []
    for (editor, dataset), by_t in sorted(lines_of(rows).items()):
        for t, r in sorted(by_t.items()):
            if t:
                body.append(f"| {editor} | {dataset} | {t} | " + " | ".join(_fmt(n, r[n]) for n, _, _ in SCORES)
                            + f" | general/{r['run']} |")
    return "\n".join(head + body)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = lines_of(rows)
    base = [r["wikitext"] for r in rows if r["T"] == 0]
    cap = WIKITEXT_CAP * (base[0] if base else min(r["wikitext"] for r in rows))  # a broken model is off scale
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(SCORES), figsize=(4 * len(SCORES), 4.2))
    off_scale = []
    for k, ((editor, dataset), by_t) in enumerate(sorted(lines.items())):
        ts = sorted(by_t)
        style = {"color": colors[k % len(colors)], "marker": "osD^v<>"[k % 7],
                 "linestyle": "-" if dataset == "zsre" else "--", "label": f"{editor} ({dataset})"}
        for ax, (name, _, label) in zip(axes, SCORES):
            ys = [by_t[t][name] for t in ts]
            if name == "wikitext":
                off_scale += [f"{editor} ({dataset}) T={t}: {y:.2g}" for t, y in zip(ts, ys) if y > cap]
                ys = [min(y, cap) for y in ys]
            ax.plot(ts, ys, **style)
    for ax, (name, _, label) in zip(axes, SCORES):
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xticks([0, 100, 1000])
        ax.set_xticklabels(["0", "100", "1000"])
        ax.set_xlabel("T (sequential edits)")
        ax.set_title(label)
        if name == "wikitext":
            ax.set_yscale("log")
            ax.axhline(cap, color="grey", linewidth=0.8, linestyle=":")
            if off_scale:
                ax.text(0.02, 0.97, "drawn at the dotted cap:\n" + "\n".join(off_scale), transform=ax.transAxes,
                        va="top", fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT)
    p.add_argument("--out", type=Path, default=ROOT)
    args = p.parse_args(argv)
    rows = collect(args.results)
    if not rows:
        raise SystemExit(f"no general.json under {args.results}")
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    plot(rows, args.out / "general.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
