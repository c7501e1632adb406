"""Turn sequential-loop summaries into a printed table and a PNG plot (metrics against T, or bars for one T)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

MAIN = ("reliability", "generality", "locality", "portability")


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def format_table(summaries: Sequence[dict], title: str = "") -> str:
    """One row per T: each metric as teacher-forced / free-generation exact match, plus timings."""
    keys = [k for k in MAIN if any(k in s["tf"] for s in summaries)]
    all_groups = sorted({k for s in summaries for k in s["tf"] if "/" in k})
    # a kind's groups are worth columns only when it has more than one
    groups = [g for g in all_groups if sum(h.split("/")[0] == g.split("/")[0] for h in all_groups) > 1]
    cols = keys + groups
    head = ["T", "cases"] + [f"{c} tf/em" for c in cols] + ["edit s (med)", "score ms/q", "gen ms/q"]
    lines = [title] if title else []
    rows = []
    for s in summaries:
        cells = [str(s["T"]), str(s["cases"])]
        cells += [f"{_fmt(s['tf'].get(c))}/{_fmt(s['em'].get(c))}" for c in cols]
        cells += [f"{s['edit_time_s']['median']:.3f}", f"{s['score_ms_per_query']:.1f}",
                  f"{s['generate_ms_per_query']:.1f}"]
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines.append(" | ".join(h.rjust(w) for h, w in zip(head, widths)))
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def metrics_figure(summaries: Sequence[dict], title: str = ""):
    """The figure ``plot_metrics`` saves: a line per metric against T, or a bar chart when there is one T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summaries:
        raise ValueError("plot_metrics needs at least one summary (one per T), got none")
    keys = [k for k in MAIN if any(k in s["tf"] for s in summaries)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if len(summaries) == 1:
        _bars(ax, summaries[0], keys)
        ax.set_title(f"{title} (T = {summaries[0]['T']})" if title else f"T = {summaries[0]['T']}")
    else:
        _lines(ax, summaries, keys)
        ax.set_title(title)
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _bars(ax, summary: dict, keys: Sequence[str]) -> None:
    """Two bars per metric, teacher-forced and exact match, for a run with a single T."""
    width = 0.38
    for j, (mode, label) in enumerate((("tf", "teacher-forced"), ("em", "exact match"))):
        ys = [summary[mode].get(k) for k in keys]
        xs = [i + (j - 0.5) * width for i in range(len(keys))]
        ax.bar(xs, [float("nan") if y is None else y for y in ys], width, color=f"C{j}", label=label)
    ax.set_xticks(range(len(keys)), keys)
    ax.legend(fontsize=7, loc="lower left")


def _lines(ax, summaries: Sequence[dict], keys: Sequence[str]) -> None:
    """Each metric (solid: teacher-forced, dashed: exact match) against the number of edits."""
    ts = [s["T"] for s in summaries]
    for i, key in enumerate(keys):
        for mode, style in (("tf", "-o"), ("em", "--s")):
            ys = [s[mode].get(key) for s in summaries]
            if any(y is not None for y in ys):
                ax.plot(ts, [float("nan") if y is None else y for y in ys], style, color=f"C{i}",
                        label=f"{key} ({'teacher-forced' if mode == 'tf' else 'exact match'})")
    if ts[-1] / max(ts[0], 1) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("number of sequential edits T")
    ax.legend(fontsize=7, loc="lower left")


def plot_metrics(summaries: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Save ``metrics_figure`` as a PNG: each metric against T, or a bar chart for a single T."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(summaries, title)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
