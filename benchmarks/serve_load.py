"""Loopback load test of `recipe serve`: throughput and p50/p95 latency at several client counts and
stored-edit counts, beside the same server with editor ``none``; edits per second accepted while serving;
the pause a snapshot makes at each stored-edit count.

    python benchmarks/serve_load.py --edits 0,1000,100000 --clients 1,8,32 --seconds 15 --repeats 3

One server per setup (editor none; the editor with each stored-edit count), all on 127.0.0.1. Each store
is filled once through the edits API (the 32 demo facts, then synthetic ones, 256 per request) and kept
in ``--stores`` for the next run. Each server is warmed up for 2 s; then, for each client count, every
server in turn runs N clients that send completion requests (demo prompts: edited facts, paraphrases
and unrelated prompts, greedy, ``--max-tokens`` new tokens) back to back for ``--seconds``, and the
round is repeated ``--repeats`` times, so load from outside the benchmark drifts over all servers alike
and each ratio to ``none`` is taken within one round (the table gives the median over rounds). Last,
8 clients query while a ninth stores edits one by one. After the servers stop, each store is opened
in-process to time a snapshot: the copy made between two operations (the only pause queries see) and
the write on the background thread. Writes one JSON (``--out``) and prints a Markdown table. Bounded:
nothing leaves the loopback interface.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, editor: str, store: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "recipe.cli", "serve", "--model", model, "--editor", editor,
                             "--store", str(store), "--port", str(port), "--admin-token", TOKEN, *extra],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            httpx.get(f"{url}/v1/models", timeout=2)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 300 s")


def facts(n: int) -> list[dict]:
    from recipe.data import load_dataset

    demo = [{"prompt": c.requests[0].prompt, "target_new": c.requests[0].target_new} for c in load_dataset("demo")]
    synthetic = [{"prompt": f"The registration number of vessel {i} is", "target_new": f"RX-{i * 7919 % 100000}"}
                 for i in range(max(0, n - len(demo)))]
    return (demo + synthetic)[:n]


def store_edits(url: str, items: list[dict]) -> float:
    """Seconds to store ``items`` through the edits API, 256 per request."""
    t = time.perf_counter()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=3600) as c:
        for s in range(0, len(items), 256):
            c.post("/v1/edits", json=items[s:s + 256]).raise_for_status()
    return time.perf_counter() - t


def prompts() -> list[str]:
    from recipe.data import load_dataset

    out = []
    for c in load_dataset("demo"):
        out += [c.requests[0].prompt] + [p.prompt for p in c.generality[:1]] + [p.prompt for p in c.locality[:1]]
    return out


def load(url: str, model: str, clients: int, seconds: float, max_tokens: int, edit_rate: bool = False) -> dict:
    """``clients`` threads sending completions back to back; optionally one more thread storing edits."""
    texts, latencies, edits, stop = prompts(), [], [0], threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            i = k
            while not stop.is_set():
                t = time.perf_counter()
                c.post("/v1/completions", json={"model": model, "prompt": texts[i % len(texts)],
                                                "max_tokens": max_tokens}).raise_for_status()
                latencies.append(time.perf_counter() - t)
                i += clients

    stored: list[int] = []

    def editor() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as c:
            while not stop.is_set():
                r = c.post("/v1/edits", json={"prompt": f"The call sign of station {edits[0]} is",
                                              "target_new": f"K{edits[0]}"})
                r.raise_for_status()
                stored.append(r.json()["data"][0]["id"])
                edits[0] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    threads += [threading.Thread(target=editor)] if edit_rate else []
    t = time.perf_counter()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as c:
        for edit_id in stored:  # the store keeps its stored-edit count for the next run
            c.delete(f"/v1/edits/{edit_id}").raise_for_status()
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {"requests": len(latencies), "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(q[18], 3),
            **({"edits_per_s": round(edits[0] / wall, 2)} if edit_rate else {})}


def summary(rows: list[dict]) -> list[dict]:
    """One row per (editor, stored edits, clients, storing): medians over the rounds, and the median of
    each round's throughput ratio to ``none`` at the same client count (None for ``none`` and storing)."""
    base = {(r["clients"], r.get("round", 0)): r["requests_per_s"] for r in rows
            if r["editor"] == "none" and "edits_per_s" not in r}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["editor"], r["stored_edits"], r["clients"], "edits_per_s" in r), []).append(r)
    out = []
    for (editor, n, clients, storing), cell in groups.items():
        ratios = [r["requests_per_s"] / base[(clients, r.get("round", 0))] for r in cell
                  if not storing and editor != "none" and base.get((clients, r.get("round", 0)))]
        med = {k: statistics.median(r[k] for r in cell) for k in ("requests_per_s", "p50_s", "p95_s")}
        out.append({"editor": editor, "stored_edits": n, "clients": clients, "rounds": len(cell), **med,
                    "vs_none": statistics.median(ratios) if ratios else None,
                    "vs_none_range": [min(ratios), max(ratios)] if ratios else None,
                    "edits_per_s": statistics.median(r["edits_per_s"] for r in cell) if storing else None})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| editor | stored edits | clients | req/s | p50 s | p95 s | vs none | edits/s while serving |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary(rows):
        ratio = "" if r["vs_none"] is None else f"{r['vs_none']:.2f}"
        lines.append(f"| {r['editor']} | {r['stored_edits']:,} | {r['clients']} | {r['requests_per_s']:.2f} | "
                     f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {ratio} | {r['edits_per_s'] or ''} |")
    return "\n".join(lines)


def fill(url: str, n: int) -> tuple[float, int]:
    """Store the first ``n`` facts unless the store already holds them: (seconds, edits stored now)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        held = c.get("/v1/edits", params={"limit": 1, "status": "active"}).json()["total"]
    todo = facts(n)[held:]
    return (store_edits(url, todo) if todo else 0.0), len(todo)


def store_path(stores: Path, model: str, editor: str, n: int) -> Path:
    """The store of one setup: kept in ``--stores`` and found again by the next run."""
    return stores / f"{model}-{editor}-{n}"


def snapshot_pauses(model: str, editor: str, stores: Path, counts: list[int]) -> list[dict]:
    """For each stored-edit count, open its store in-process (one model for all), store one more fact (so
    that there is something new to write) and time one snapshot: the capture on the caller's thread (the
    pause a server's queries see) and the write on the background thread."""
    from recipe.lm import EditedLM
    from recipe.models import load_model

    lm = EditedLM(*load_model(model))
    out = []
    for n in counts:
        out.append({"stored_edits": n, **_snapshot_pause(lm, editor, store_path(stores, model, editor, n))})
        print(json.dumps(out[-1]), flush=True)
    return out


def _snapshot_pause(lm, editor: str, store: Path) -> dict:
    from recipe.editors import load_editor
    from recipe.serve.facts import Fact, Facts
    from recipe.serve.store import EditStore

    facts = Facts(load_editor(editor, lm), EditStore(store))
    try:
        held = len(facts.active())
        probe, = facts.add([Fact(f"The snapshot probe {time.time_ns()} is", "timed")])
        t = time.perf_counter()
        writing = facts.snapshot(wait=False)
        copied = time.perf_counter() - t
        writing.result()
        written = time.perf_counter() - t
        facts.remove(probe.id)
        return {"edits": held, "copy_s": round(copied, 3), "write_s": round(written - copied, 3)}
    finally:
        facts.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--editor", default="recipe")
    p.add_argument("--edits", default="0,1000", help="stored-edit counts (default: %(default)s)")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="load per cell (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every cell (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--stores", help="folder of the filled stores, kept for the next run (default: a temporary one)")
    p.add_argument("--out", default="benchmarks/results/serve/serve_load.json")
    p.add_argument("--snapshots-only", action="store_true",
                   help="only time a snapshot of each store in --stores again and update --out's snapshot rows")
    p.add_argument("serve_args", nargs="*", help="more `recipe serve` arguments (after --)")
    args = p.parse_args()
    if args.snapshots_only:
        out = Path(args.out)
        data = json.loads(out.read_text())
        data["snapshots"] = snapshot_pauses(args.model, args.editor, Path(args.stores),
                                            [int(n) for n in args.edits.split(",")])
        data["snapshots_argv"] = sys.argv[1:]
        out.write_text(json.dumps(data, indent=1))
        return
    clients = [int(c) for c in args.clients.split(",")]
    setups = [("none", 0)] + [(args.editor, int(n)) for n in args.edits.split(",")]
    rows, servers, fills = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        stores = Path(args.stores or tmp)
        try:
            for editor, n in setups:  # all up at once; an idle server costs no CPU
                store = store_path(stores, args.model, editor, n)
                t = time.perf_counter()
                proc, url = start(args.model, editor, store, args.serve_args)
                started = time.perf_counter() - t
                seconds, stored = fill(url, n) if n else (0.0, 0)
                fills.append({"editor": editor, "stored_edits": n, "start_s": round(started, 1),
                              "stored_now": stored, "store_s": round(seconds, 1)})
                print(json.dumps(fills[-1]), flush=True)
                servers.append((editor, n, proc, url))
                load(url, args.model, 8, 2.0, args.max_tokens)  # warm-up, not recorded
            cells = [(c, r, False) for c in clients for r in range(args.repeats)] + [(8, 0, True)]
            for c, round_, editing in cells:
                for editor, n, proc, url in servers:
                    if editing and editor == "none":
                        continue
                    cell = load(url, args.model, c, args.seconds, args.max_tokens, edit_rate=editing)
                    rows.append({"editor": editor, "stored_edits": n, "clients": c, "round": round_, **cell})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            for *_, proc, _ in servers:
                proc.terminate()
                proc.wait(120)
        pauses = snapshot_pauses(args.model, args.editor, stores, [n for editor, n, *_ in servers if editor != "none"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv[1:], "model": args.model, "max_tokens": args.max_tokens,
                               "seconds": args.seconds, "repeats": args.repeats, "fills": fills,
                               "snapshots": pauses, "rows": rows, "summary": summary(rows)}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
