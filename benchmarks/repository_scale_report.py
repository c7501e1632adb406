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
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    for r in runs:
        r["rss_built_mb"] = (r["rss_built_bytes"] - r["rss_baseline_bytes"]) / 2**20
        r["peak_rss_mb"] = r["peak_rss_bytes"] / 2**20
        r["disk_mb"] = r["disk_bytes"] / 2**20
    return sorted(runs, key=lambda r: (r["prompt_dtype"], r["kind"], r["size"]))


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
    lines = ["| prompts | N | nlist | nprobe | recall@1 | 1 query ms p50 | batch-64 ms/query p50 |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        for row in r.get("nprobe_sweep", []):
            lines.append(f"| {r['prompt_dtype']} | {r['size']:,} | {r['nlist']} | {row['nprobe']} | {row['recall_at_1']:.4f} "
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


def plots(out: Path, runs: list[dict], target_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["kind"], r["prompt_dtype"]), []).append(r)

    fig, ax = plt.subplots(figsize=(7, 5))
    for (kind, dtype), rs in groups.items():
        sizes = [r["size"] for r in rs]
        ax.plot(sizes, [r["single_ms_p50"] for r in rs], "o-", label=f"{kind} ({dtype}): 1 query p50")
        ax.plot(sizes, [r["batch_ms_per_query_p50"] for r in rs], "s--", label=f"{kind} ({dtype}): batch-64, per query")
    ax.axhline(target_ms, color="grey", lw=0.8, ls=":", label=f"target {target_ms} ms")
    ax.set(xscale="log", yscale="log", xlabel="entries", ylabel="ms per query", title="Search latency (1 thread)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for (kind, dtype), rs in groups.items():
        sizes = [r["size"] for r in rs]
        a1.plot(sizes, [r["rss_built_mb"] for r in rs], "o-", label=f"{kind} ({dtype}): RSS growth")
        a1.plot(sizes, [r["peak_rss_mb"] for r in rs], "x:", label=f"{kind} ({dtype}): peak RSS")
        a2.plot(sizes, [r["bytes_per_edit_rss"] for r in rs], "o-", label=f"{kind} ({dtype}): RSS / N")
        a2.plot(sizes, [r["bytes_per_edit_counted"] for r in rs], "s--", label=f"{kind} ({dtype}): counted / N")
    a1.set(xscale="log", yscale="log", xlabel="entries", ylabel="MB", title="Memory")
    a2.set(xscale="log", xlabel="entries", ylabel="bytes per stored edit", title="Memory per edit")
    for a in (a1, a2):
        a.legend(fontsize=7)
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)

    sweeps = [r for r in runs if r.get("nprobe_sweep")]
    if sweeps:
        fig, ax = plt.subplots(figsize=(7, 5))
        for r in sweeps:
            rows = r["nprobe_sweep"]
            ax.plot([x["batch_ms_per_query_p50"] for x in rows], [x["recall_at_1"] for x in rows], "o-",
                    label=f"N={r['size']:,} ({r['prompt_dtype']}), nlist {r['nlist']}")
            for x in rows:
                ax.annotate(str(x["nprobe"]), (x["batch_ms_per_query_p50"], x["recall_at_1"]), fontsize=6)
        ax.set(xscale="log", xlabel="batch-64 ms per query", ylabel="recall@1 vs exact", title="IVF: nprobe sweep")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "ivf_recall.png", dpi=120)
        plt.close(fig)
