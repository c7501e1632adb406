"""benchmarks/repository_scale.py end to end at a tiny scale: the JSON, the table and the plots."""
from __future__ import annotations

import json

import numpy as np


def test_small_benchmark_writes_results_table_and_plots(tmp_path, benchmark_script):
    bench = benchmark_script("repository_scale")
    out = tmp_path / "scale"
    argv = ["--sizes", "1000,2000", "--kinds", "flat,ivf", "--out", str(out), "--threads", "1",
            "--key-dim", "64", "--prompt-shape", "3,32", "--centres", "64", "--queries", "200",
            "--single-queries", "20", "--batches", "2", "--time-budget", "1", "--nprobes", "1,4",
            "--work-dir", str(tmp_path / "work"), "--in-process"]
    assert bench.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {(r["kind"], r["size"]): r for r in results["runs"]}
    assert set(runs) == {("flat", 1000), ("flat", 2000), ("ivf", 1000), ("ivf", 2000)}
    fields = ["add_us_per_edit", "remove_batch_us_per_edit", "remove_single_ms_p50", "single_ms_p50", "single_ms_p95",
              "batch_ms_per_query_p50", "batch_ms_per_query_p95", "recall_at_1", "bytes_per_edit_rss",
              "bytes_per_edit_counted", "peak_rss_bytes", "save_s", "load_s", "disk_bytes", "threads"]
    for run in runs.values():
        assert all(np.isfinite(run[f]) for f in fields), run
        assert run["threads"] == 1 and run["load_same_top1"] and run["count_after_remove"] == run["size"] * 0.99
        assert run["bytes_per_edit_counted"] >= 64 * 4 + 3 * 32 * 4  # key + float32 prompt at least
    assert runs[("flat", 2000)]["recall_at_1"] == 1.0 and not runs[("flat", 2000)]["approximate"]
    ivf = runs[("ivf", 2000)]
    assert ivf["approximate"] and ivf["nlist"] > 1 and ivf["recall_at_1"] >= 0.9
    sweep = {row["nprobe"]: row["recall_at_1"] for row in ivf["nprobe_sweep"]}
    assert set(sweep) >= {1, 4} and sweep[1] <= sweep[max(sweep)] and sweep[max(sweep)] >= 0.9
    table = (out / "table.md").read_text()
    assert "| ivf | float32 | 2,000 |" in table and "nprobe sweep" in table
    for png in ("latency.png", "memory.png", "ivf_recall.png"):
        assert (out / png).stat().st_size > 1000

    assert bench.main(argv) == 0  # resumable: every run file exists, nothing is redone
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
