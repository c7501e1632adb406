"""results.json, table.md and PNG plots from the run files of benchmarks/repository_scale.py."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [  # (header, key, format)
    ("index", "kind", "{}"), ("prompts", "prompt_dtype", "{}"), ("N", "size", "{:,}"),
    ("add µs/edit", "add_us_per_edit", "{:.1f}"), ("add max call s", "add_max_call_s", "{:.2f}"),
    ("remove µs/edit (1% batch)", "remove_batch_us_per_edit", "{:.2f}"),
    ("remove 1 id ms p50", "remove_single_ms_p50", "{:.3f}"),
    ("1 query ms p50 / p95", ("single_ms_p50", "single_ms_p95"), "{:.3f} / {:.3f}"),
    ("batch-64 ms/query p50 / p95", ("batch_ms_per_query_p50", "batch_ms_per_query_p95"), "{:.3f} / {:.3f}"),
    ("recall@1", "recall_at_1", "{:.4f}"), ("nlist / nprobe", ("nlist", "nprobe"), "{} / {}"),
    ("RSS built MB", "rss_built_mb", "{:,.0f}"), ("peak RSS MB", "peak_rss_mb", "{:,.0f}"),
    ("bytes/edit (RSS)", "bytes_per_edit_rss", "{:,.0f}"), ("bytes/edit (counted)", "bytes_per_edit_counted", "{:,.0f}"),
    ("save s", "save_s", "{:.2f}"), ("load s", "load_s", "{:.2f}"), ("disk MB", "disk_mb", "{:,.0f}"),
]


def load_runs(out: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted((out / "per_run").glob("*.json"))]
    for r in runs:
        r["rss_built_mb"] = (r["rss_built_bytes"] - r["rss_baseline_bytes"]) / 2**20
        r["peak_rss_mb"] = r["peak_rss_bytes"] / 2**20
        r["disk_mb"] = r["disk_bytes"] / 2**20
    return sorted(runs, key=lambda r: (r["prompt_dtype"] != "float32", r["prompt_dtype"], r["kind"], r["size"]))


def _cell(run: dict, key, fmt: str) -> str:
    values = [run.get(k) for k in (key if isinstance(key, tuple) else (key,))]
    if any(v is None for v in values):
        return "-"
    return fmt.format(*values)


def table(runs: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in runs]
    return "\n".join(lines)


def sweep_table(runs: list[dict]) -> str:
    lines = ["| index | prompts | N | nlist | nprobe | recall@1 | 1 query ms p50 | batch-64 ms/query p50 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for row in r.get("nprobe_sweep", []):
            lines.append(f"| {r['kind']} | {r['prompt_dtype']} | {r['size']:,} | {r['nlist']} | {row['nprobe']} "
                         f"| {row['recall_at_1']:.4f} "
                         f"| {row['single_ms_p50']:.3f} | {row['batch_ms_per_query_p50']:.3f} |")
    return "\n".join(lines)


def write_report(out: Path, target_ms: float) -> None:
    runs = load_runs(out)
    if not runs:
        return
    first = runs[0]
    (out / "results.json").write_text(json.dumps({"machine": first["machine"], "runs": runs}, indent=2))
    notes = (f"Machine: {first['machine']['cpu']}, {first['machine']['cores']} cores, load average at start "
             f"{[round(x, 2) for x in first['machine']['loadavg']]} (other jobs share the cores); "
             f"faiss threads {first['threads']}, OMP_NUM_THREADS={first['omp_num_threads_env']}, "
             f"BLAS threshold {first['blas_threshold']} (queries x D). Keys D={first['args']['key_dim']}, prompts "
             f"{first['args']['prompt_shape'].replace(',', ' x ')}. Target: <= {target_ms} ms/query batched at 1M.\n")
    (out / "table.md").write_text("# Knowledge repository at scale\n\n" + notes + "\n" + table(runs)
                                  + "\n\n## IVF: nprobe sweep\n\n" + sweep_table(runs) + "\n")
    plots(out, runs, target_ms)


COLOURS = {"flat": "C0", "ivf": "C1", "auto": "C2"}
LINES = {"float32": "-", "float16": "--", "bfloat16": ":"}


def plots(out: Path, runs: list[dict], target_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["kind"], r["prompt_dtype"]), []).append(r)

    def panel(ax, key: str, title: str, ylabel: str, logy: bool = True) -> None:
        for (kind, dtype), rs in groups.items():
            ax.plot([r["size"] for r in rs], [r[key] for r in rs], marker="o", ls=LINES.get(dtype, "-"),
                    color=COLOURS.get(kind), label=f"{kind}, {dtype} prompts")
        ax.set(xscale="log", yscale="log" if logy else "linear", xlabel="entries", ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    panel(a1, "single_ms_p50", "One query (p50)", "ms per query")
    panel(a2, "batch_ms_per_query_p50", "Batches of 64 (p50, per query)", "ms per query")
    for a in (a1, a2):
        a.axhline(target_ms, color="grey", lw=0.8, ls=":")
    fig.suptitle(f"Search latency, 1 thread (dotted: {target_ms} ms target)")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    panel(a1, "rss_built_mb", "RSS growth of the built repository", "MB")
    panel(a2, "bytes_per_edit_rss", "RSS growth per stored edit (dots: counted bytes)", "bytes per edit", logy=False)
    for (kind, dtype), rs in groups.items():
        a2.plot([r["size"] for r in rs], [r["bytes_per_edit_counted"] for r in rs], ls="none", marker=".",
                color=COLOURS.get(kind))
    a2.set_ylim(0, 16_000)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)

    sweeps = [r for r in runs if r.get("nprobe_sweep")]
    if sweeps:
        fig, ax = plt.subplots(figsize=(7, 5))
        for r in sweeps:
            rows = r["nprobe_sweep"]
            ax.plot([x["batch_ms_per_query_p50"] for x in rows], [x["recall_at_1"] for x in rows], "o-",
                    label=f"{r['kind']} N={r['size']:,} ({r['prompt_dtype']}), nlist {r['nlist']}")
            for x in rows:
                ax.annotate(str(x["nprobe"]), (x["batch_ms_per_query_p50"], x["recall_at_1"]), fontsize=6)
        ax.set(xscale="log", xlabel="batch-64 ms per query", ylabel="recall@1 vs exact", title="IVF: nprobe sweep")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "ivf_recall.png", dpi=120)
        plt.close(fig)
