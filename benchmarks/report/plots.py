"""The report's figures: one panel per dataset (or quantity), one line per editor, every line in the legend."""
from __future__ import annotations

from pathlib import Path

from benchmarks.report import tables
from benchmarks.report.results import Results

HARDWARE = "2-core CPU; SmolLM2-135M-Instruct, fp32 de-quantised from Q4_1"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = "os^vD<>PXh*"  # one per editor line


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return path


def editors(results: Results, path: Path) -> Path:
    """Rows: reliability, generality, locality (teacher-forced); columns: zsRE, CounterFact; x: T."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(tables.METRICS), len(tables.DATASETS), figsize=(10, 10), sharex=True, squeeze=False)
    names = list(tables.HEADLINE_RUNS["zsre"])
    for col, (dataset, title) in enumerate(tables.DATASETS.items()):
        for row, metric in enumerate(tables.METRICS):
            ax = axes[row][col]
            for k, editor in enumerate(names):
                cells = [(t, tables.headline_cell(results, dataset, editor, t)) for t in tables.COLUMNS]
                points = [(t, c[1]["tf"][metric]) for t, c in cells if c is not None]  # runs not made: no point
                ax.plot([t for t, _ in points], [y for _, y in points], marker=MARKERS[k], color=f"C{k}",
                        label=editor)
            ax.set_xscale("log")
            ax.set_xticks(tables.COLUMNS, [f"{t:,}" for t in tables.COLUMNS])
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(f"{title}: {metric}")
            if row == len(tables.METRICS) - 1:
                ax.set_xlabel("T, edits applied one by one before scoring")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    fig.suptitle(f"Every editor against the number of edits (teacher-forced; {HARDWARE})", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    return _save(fig, path)


def general(results: Results, path: Path) -> Path:
    """WikiText perplexity after T edits, one panel per dataset the edits came from, one line per editor."""
    plt = _pyplot()
    rows = results.general()
    base = next(r for r in rows if r["T"] == 0)["scores"]["wikitext"]["ppl"]
    fig, axes = plt.subplots(1, len(tables.DATASETS), figsize=(10, 4.2), sharey=True, squeeze=False)
    names = [e for e in tables.EDITOR_NAMES if e != "unedited"]
    steps = sorted({r["T"] for r in rows})
    for ax, (dataset, title) in zip(axes[0], tables.DATASETS.items()):
        for k, editor in enumerate(names):
            points = sorted((r["T"], r["scores"]["wikitext"]["ppl"]) for r in rows
                            if r["editor"] == editor and r["dataset"] == dataset)
            if points:  # T = 0, 100, 1,000 evenly spaced
                ax.plot([0] + [steps.index(t) for t, _ in points], [base] + [p for _, p in points],
                        marker=MARKERS[k], color=f"C{k}", label=tables.EDITOR_NAMES[editor], alpha=0.85)
        ax.set_yscale("log")
        ax.set_xticks(range(len(steps)), [f"{t:,}" for t in steps])
        ax.set_xlabel("T, edits applied before measuring")
        ax.set_title(f"edits from {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("WikiText perplexity (log scale)")
    fig.suptitle(f"Language modelling after lifelong editing ({HARDWARE})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def trajectory(results: Results, runs: dict[str, str], path: Path) -> Path:
    """One line per run of ``runs`` (label -> trajectory run name) in four panels: reliability of the latest
    50 edits (do new edits take?), of the first 50 (are they kept?), locality and WikiText perplexity."""
    plt = _pyplot()
    panels = (("recent", "latest 50 edits: reliability"), ("early", "first 50 edits: reliability"),
              ("locality", "locality"), ("wikitext_ppl", "WikiText perplexity (10 paragraphs)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4))
    for k, (label, name) in enumerate(runs.items()):
        probes = results.trajectory(name)
        xs = [p["edits"] for p in probes]
        for ax, (key, _) in zip(axes, panels):
            ax.plot(xs, [float("nan") if p[key] is None else p[key] for p in probes],
                    marker=MARKERS[k], ms=3, label=label)
    for ax, (key, title) in zip(axes, panels):
        if key == "wikitext_ppl":
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits applied")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"1,000 sequential zsRE edits probed every 50, teacher-forced ({HARDWARE})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
