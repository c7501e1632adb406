"""Markdown tables built from the results: every number in them is read from a results file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.report.results import Results

DATASETS = {"zsre": "zsRE", "counterfact": "CounterFact"}
MODES = {"tf": "teacher-forced token accuracy", "em": "greedy exact match",
         "ns": "natural-stop generation (until EOS or the first sentence's end)"}
COLUMNS = (1, 10, 100, 1000)
METRICS = ("reliability", "generality", "locality")


def _weights(name: str, dataset: str) -> tuple[str, ...]:
    return tuple(f"baselines/{name}-{dataset}-{size}" for size in ("small", "100", "1000"))


# editor -> the runs whose summaries fill its row, per dataset (first N cases of the seed-0 shuffle)
HEADLINE_RUNS: dict[str, dict[str, tuple[str, ...]]] = {
    "zsre": {
        "FT-L": ("foundation/ft-zsre", "baselines/ft-zsre-1000"),
        "FT-M": _weights("ftm", "zsre"),
        "MEND": ("baselines/mend-zsre", "baselines/mend-zsre-100", "baselines/mend-zsre-1000"),
        "ROME": _weights("rome", "zsre"),
        "MEMIT": _weights("memit", "zsre"),
        "AlphaEdit": _weights("alphaedit", "zsre"),
        "WISE": _weights("wise", "zsre"),
        "T-Patcher": _weights("tpatcher", "zsre"),
        "GRACE": _weights("grace", "zsre"),
        "RECIPE": ("recipe/recipe-zsre", "recipe/recipe-zsre-lifelong"),
    },
    "counterfact": {
        "FT-L": _weights("ft", "counterfact"),
        "FT-M": _weights("ftm", "counterfact"),
        "MEND": _weights("mend", "counterfact"),
        "ROME": _weights("rome", "counterfact"),
        "MEMIT": _weights("memit", "counterfact"),
        "AlphaEdit": _weights("alphaedit", "counterfact"),
        "WISE": _weights("wise", "counterfact"),
        "T-Patcher": _weights("tpatcher", "counterfact"),
        "GRACE": _weights("grace", "counterfact"),
        "RECIPE": ("recipe/recipe-counterfact", "recipe/recipe-counterfact-gen"),
    },
}
NOT_RUN = "—"  # a cell whose run is not in the results yet
UNEDITED_RUNS = {"zsre": "foundation/none-zsre", "counterfact": "foundation/none-counterfact"}


def headline_cell(results: Results, dataset: str, editor: str, column: int) -> tuple[str, dict] | None:
    """The run and summary behind one headline cell (None: not run yet); the T = 1,000 column takes the
    smallest T >= 1,000."""
    found = [(run, s) for run in HEADLINE_RUNS[dataset][editor] if results.has(run)
             for T, s in results.summaries(run).items() if T == column or (column == COLUMNS[-1] and T > column)]
    return min(found, key=lambda rs: (rs[1]["T"], -rs[1]["cases"])) if found else None


def _triple(summary: dict, mode: str) -> str:
    """The three metrics of ``mode``; NOT_RUN when the run did not score that mode (natural stop is opt-in)."""
    if mode not in summary:
        return NOT_RUN
    return " / ".join(f"{summary[mode][m]:.3f}" for m in METRICS)


def _grid(results: Results, dataset: str, cell: Callable[[dict], str], cases: bool) -> list[str]:
    head = ["editor"] + [f"T = {t:,}" for t in COLUMNS] + (["cases scored"] if cases else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for editor in HEADLINE_RUNS[dataset]:
        picked = [(headline_cell(results, dataset, editor, t) or (None, None))[1] for t in COLUMNS]
        cells = [NOT_RUN if s is None or cell(s) == NOT_RUN else cell(s) + ("" if s["T"] == t else f" (T = {s['T']:,})")
                 for s, t in zip(picked, COLUMNS)]
        counts = [" / ".join(NOT_RUN if s is None else f"{s['cases']:,}" for s in picked)] if cases else []
        lines.append("| " + " | ".join([editor, *cells, *counts]) + " |")
    return lines


def headline(results: Results, dataset: str, mode: str) -> str:
    """Rows: editors; columns: T; cells: reliability / generality / locality in one mode."""
    title = f"**{DATASETS[dataset]}, {MODES[mode]}** (reliability / generality / locality)"
    return "\n".join([title, "", *_grid(results, dataset, lambda s: _triple(s, mode), cases=True)])


def headline_all(results: Results) -> str:
    return "\n\n".join(headline(results, d, m) for d in DATASETS for m in MODES)


def edit_seconds(results: Results, dataset: str) -> str:
    """Median seconds per edit behind each headline cell."""
    return "\n".join(_grid(results, dataset, lambda s: f"{s['edit_time_s']['median']:.3f}", cases=False))


def unedited(results: Results, dataset: str) -> str:
    (summary,) = results.summaries(UNEDITED_RUNS[dataset]).values()
    return f"{_triple(summary, 'tf')} (exact match {_triple(summary, 'em')})"


def value(results: Results, run: str, T: int, key: str, subset: str | None = None) -> str:
    """One number for the prose, e.g. ``value(r, "recipe/gate-zsre", 1037, "tf/locality")``."""
    if subset:
        split = json.loads((results.root / run / "seen_split.json").read_text())[f"T{T}"][subset]
        return f"{split[key]:.3f}"
    mode, metric = key.split("/", 1)
    return f"{results.summary(run, T)[mode][metric]:.3f}"


def runs_table(results: Results, rows: Sequence[tuple[str, str, int, str | None]], never_seen: bool = True) -> str:
    """Rows ``(label, run, T, subset)``: tf / em per metric (em "—" where a run skipped generation)."""
    extra_head = ["never-seen targets: rel / gen (tf)"] if never_seen else []
    head = ["run", "T", "cases", *METRICS, *extra_head, "edit ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, run, T, subset in rows:
        s = results.summary(run, T)
        if subset and subset.startswith("latest answer by "):  # benchmarks/latest_answer.py, by question or subject
            way = subset.removeprefix("latest answer by ")
            latest = json.loads((results.root / run / "latest_answer.json").read_text())[way][f"T{T}"]
            cases = latest["cases"]
            cells = [_pair(latest["tf"].get(m), latest["em"].get(m)) for m in METRICS]
        elif subset:
            split = json.loads((results.root / run / "seen_split.json").read_text())[f"T{T}"][subset]
            cases = split["cases"]
            cells = [_pair(split.get(f"tf/{m}"), split.get(f"em/{m}")) for m in METRICS]
        else:
            cases = s["cases"]
            cells = [_pair(s["tf"].get(m), s["em"].get(m)) for m in METRICS]
        extra = [_never_seen(results, run, T) if not subset else ""] if never_seen else []
        ms = "" if subset else f"{1000 * s['edit_time_s']['median']:,.0f}"
        lines.append("| " + " | ".join([label, f"{T:,}", f"{cases:,}", *cells, *extra, ms]) + " |")
    return "\n".join(lines)


def metric_table(results: Results, rows: Sequence[tuple[str, str, int]], keys: Sequence[tuple[str, str]]) -> str:
    """Rows ``(label, run, T)``, columns ``(header, key)`` with key ``mode/metric[/group]`` of the run's
    summary at T ("—" where the run has no such value)."""
    lines = ["| run | " + " | ".join(h for h, _ in keys) + " |", "|---|" + "---|" * len(keys)]
    for label, run, T in rows:
        s = results.summary(run, T)
        cells = []
        for _, key in keys:
            mode, metric = key.split("/", 1)
            v = s.get(mode, {}).get(metric)
            cells.append(NOT_RUN if v is None else f"{v:.3f}")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def _pair(tf: float | None, em: float | None) -> str:
    return f"{tf:.3f} / " + ("—" if em is None else f"{em:.3f}")


def _never_seen(results: Results, run: str, T: int) -> str:
    path = results.root / run / "seen_split.json"
    split = json.loads(path.read_text()).get(f"T{T}", {}).get("never-seen") if path.is_file() else None
    if not split or split.get("tf/reliability") is None:
        return ""
    n = split["cases"]
    return f"{split['tf/reliability']:.3f} / {split['tf/generality']:.3f} ({n:,} case{'s' if n != 1 else ''})"


PREFIXES = {"none": "none (unedited model)", "statement": "the statement's tokens, no training",
            "statement + \\n": "statement + `\\n`, no training",
            "recipe-smollm2: vectors": "shipped checkpoint: 3 learned vectors alone",
            "recipe-smollm2: vectors+statement, sep '\\n' (trained)":
                "shipped: vectors + statement + `\\n` (as trained)",
            "recipe-smollm2: vectors+statement, sep '' (not trained)": "shipped: vectors + statement, no separator"}


def prefix_ablation(results: Results) -> str:
    """Oracle-retrieval prefixes on never-seen targets: zsRE and RippleEdits, plus RippleEdits' groups."""
    sets = {name: json.loads((results.root / "prefix_ablation" / f"{name}.json").read_text())
            for name in ("zsre", "ripple-recent-test")}
    groups = ("rephrase", "Subject_Aliasing", "Logical_Generalization", "Reasoning")
    cases = [next(iter(d["variants"].values()))["never-seen"]["cases"] for d in sets.values()]
    head = ["prefix", f"zsRE ({cases[0]} of {sets['zsre']['n']})",
            f"RippleEdits ({cases[1]} of {sets['ripple-recent-test']['n']})", *(f"Ripple {g}" for g in groups)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in PREFIXES.items():
        z, r = (d["variants"][key]["never-seen"] for d in sets.values())
        cells = [f"{z['reliability']:.3f} / {z['generality']:.3f}", f"{r['reliability']:.3f} / {r['generality']:.3f}",
                 *(f"{r['groups'][g]:.3f}" for g in groups)]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


EDITOR_NAMES = {"ft": "FT-L", "ftm": "FT-M", "mend": "MEND", "rome": "ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit", "wise": "WISE",
                "tpatcher": "T-Patcher", "grace": "GRACE", "recipe": "RECIPE", "unedited": "unedited"}


def general(results: Results) -> str:
    """One row per (editor, dataset of the edits, T): the five general-ability scores."""
    head = ["editor", "edits from", "T", "MMLU", "CSQA", "ANLI (r1 / r2 / r3)", "SQuAD 2.0 1/ppl", "WikiText ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(EDITOR_NAMES)
    for r in sorted(results.general(), key=lambda r: (r["T"] > 0, r["T"], order.index(r["editor"]), r["dataset"])):
        sc = r["scores"]
        anli = sc["anli"]
        lines.append("| " + " | ".join([
            EDITOR_NAMES[r["editor"]], DATASETS.get(r["dataset"], ""), f"{r['T']:,}",
            f"{sc['mmlu']['accuracy']:.3f}", f"{sc['csqa']['accuracy']:.3f}",
            f"{anli['accuracy']:.3f} (" + " / ".join(f"{anli[f'accuracy/r{i}']:.3f}" for i in (1, 2, 3)) + ")",
            f"{sc['squad']['inv_ppl']:.3f}", _ppl(sc["wikitext"]["ppl"])]) + " |")
    return "\n".join(lines)


def _ppl(x: float) -> str:
    return f"{x:.2e}" if x >= 1e6 else f"{x:,.3f}"


def trajectory(results: Results, name: str, every: int = 100) -> str:
    """Probes at 0, 50 and every ``every`` edits: early / recent reliability, locality, WikiText ppl."""
    probes = [p for p in results.trajectory(name) if p["edits"] in (0, 50) or p["edits"] % every == 0]
    fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    rows = [("edits", [str(p["edits"]) for p in probes]),
            ("early", [fmt(p["early"], ".3f") for p in probes]),
            ("recent", [fmt(p["recent"], ".3f") for p in probes]),
            ("locality", [fmt(p["locality"], ".3f") for p in probes]),
            ("WikiText ppl", [fmt(p["wikitext_ppl"], ".3f") for p in probes])]
    lines = ["| " + " | ".join([rows[0][0], *rows[0][1]]) + " |", "|" + "---|" * (len(probes) + 1)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows[1:]]
    return "\n".join(lines)


def mquake(results: Results, rows: Sequence[tuple[str, str]]) -> str:
    """One row per (label, run) of MQuAKE-hard: cases and edits applied, how, the floor (the unedited
    model's multi-hop accuracy on the original answers) and the edited model's accuracies on the new ones."""
    lines = ["| run | cases | edits | applied | floor: multi-hop | edit | single-hop | multi-hop (case / question) "
             "| MeLLo multi-hop (case / question) | edit s (median) |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    for label, run in rows:
        r = results.mquake(run)
        e, times = r["edited"], sorted(row["edit_time_s"] for row in r["rows"] if "edit_time_s" in row)
        mello = f"{fmt(e['multi_hop_mello'])} / {fmt(e['multi_hop_mello/question'])}" if "multi_hop_mello" in e else ""
        lines.append(f"| {label} | {r['cases']:,} | {r['edits']:,} | {'all at once' if r['all_at_once'] else 'case by case'} "
                     f"| {fmt(r['floor']['multi_hop'])} | {fmt(e['edit'])} | {fmt(e['single_hop'])} "
                     f"| {fmt(e['multi_hop'])} / {fmt(e['multi_hop/question'])} | {mello} "
                     f"| {fmt(times[len(times) // 2]) if times else ''} |")
    return "\n".join(lines)


def sources(path: Path) -> str:
    """One row per data file of ``recipe/data/sources.json``: where it comes from and its sha256."""
    lines = ["| file | source (repository @ commit: path) | bytes | sha256 |", "|---|---|---|---|"]
    for e in json.loads(path.read_text())["files"]:
        lines.append(f"| `{e['name']}` | [{e['repo']}](https://github.com/{e['repo']}) @ `{e['commit'][:12]}`: "
                     f"`{e['path']}` | {e['size']:,} | `{e['sha256']}` |")
    return "\n".join(lines)


def _serve_load(results: Results) -> dict:
    return json.loads((results.root / "serve" / "serve_load.json").read_text())


def serving(results: Results) -> str:
    """``serve/serve_load.json``: per (editor, stored edits, clients) the medians over the rounds, and the
    median of each round's throughput ratio to ``none`` (its range over the rounds beside it)."""
    head = ["editor", "stored edits", "clients", "rounds", "requests/s", "p50 s", "p95 s", "vs none (range)",
            "edits/s while serving"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _serve_load(results)["summary"]:
        storing = r["edits_per_s"] is not None
        ratio = "" if r["vs_none"] is None else f"{r['vs_none']:.2f} ({r['vs_none_range'][0]:.2f}-{r['vs_none_range'][1]:.2f})"
        clients = f"{r['clients']} (+1 storing edits)" if storing else str(r["clients"])
        lines.append("| " + " | ".join([r["editor"], f"{r['stored_edits']:,}", clients, str(r["rounds"]),
                                        f"{r['requests_per_s']:.2f}", f"{r['p50_s']:.3f}", f"{r['p95_s']:.3f}", ratio,
                                        f"{r['edits_per_s']:.2f}" if storing else ""]) + " |")
    return "\n".join(lines)


def serving_numbers(results: Results) -> dict:
    """Numbers for the serving prose: ``ratio[stored][clients]``, ``fill[stored]`` (seconds, edits/s),
    ``snapshot[stored]`` (capture and write seconds),
    the run's ``seconds`` per cell and ``repeats``."""
    data = _serve_load(results)
    ratio: dict = {}
    for r in data["summary"]:
        if r["vs_none"] is not None:
            ratio.setdefault(r["stored_edits"], {})[r["clients"]] = r["vs_none"]
    fill = {f["stored_edits"]: (f["store_s"], f["stored_now"] / f["store_s"] if f["store_s"] else None)
            for f in data["fills"] if f["stored_now"]}
    return {"ratio": ratio, "fill": fill, "snapshot": {s["stored_edits"]: s for s in data["snapshots"]}, "seconds": data["seconds"],
            "repeats": data["repeats"],
            "edits_per_s": [r["edits_per_s"] for r in data["summary"] if r["edits_per_s"] is not None]}
