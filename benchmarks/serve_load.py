"""Loopback load test of `recipe serve`: throughput and p50/p95 latency at several client counts and
stored-edit counts, beside the same server with editor ``none``; edits per second accepted while serving.

    python benchmarks/serve_load.py --edits 0,1000 --clients 1,8,32 --seconds 10

One server per setup (editor none; the editor with each stored-edit count), all on 127.0.0.1 with fresh
stores: the edits are stored (synthetic facts plus the 32 demo facts), each server is warmed up for 2 s,
then each cell runs N clients that each send completion requests (demo prompts: edited facts,
paraphrases and unrelated prompts, greedy, ``--max-tokens`` new tokens) back to back for ``--seconds``.
Writes one JSON (``--out``) and prints a Markdown table. Bounded: nothing leaves the loopback interface.
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

    def editor() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as c:
            while not stop.is_set():
                c.post("/v1/edits", json={"prompt": f"The call sign of station {edits[0]} is",
                                          "target_new": f"K{edits[0]}"}).raise_for_status()
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
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {"requests": len(latencies), "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(q[18], 3),
            **({"edits_per_s": round(edits[0] / wall, 2)} if edit_rate else {})}


def table(rows: list[dict]) -> str:
    lines = ["| editor | stored edits | clients | req/s | p50 s | p95 s | vs none | edits/s while serving |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["clients"]: r["requests_per_s"] for r in rows if r["editor"] == "none"}  # none: never editing
    for r in rows:
        ratio = r["requests_per_s"] / base[r["clients"]] if base.get(r["clients"]) and "edits_per_s" not in r else float("nan")
        lines.append(f"| {r['editor']} | {r['stored_edits']:,} | {r['clients']} | {r['requests_per_s']:.2f} | "
                     f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {ratio:.2f} | {r.get('edits_per_s', '')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--editor", default="recipe")
    p.add_argument("--edits", default="0,1000", help="stored-edit counts (default: %(default)s)")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="load per cell (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/serve/serve_load.json")
    p.add_argument("serve_args", nargs="*", help="more `recipe serve` arguments (after --)")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    setups = [("none", 0)] + [(args.editor, int(n)) for n in args.edits.split(",")]
    rows, servers = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for k, (editor, n) in enumerate(setups):  # all up at once; an idle server costs no CPU
                proc, url = start(args.model, editor, Path(tmp) / f"store-{k}", args.serve_args)
                servers.append((editor, n, proc, url, store_edits(url, facts(n)) if n else 0.0))
                load(url, args.model, 8, 2.0, args.max_tokens)  # warm-up, not recorded
            # cells interleaved (each client count on every server in turn), so that load from outside
            # the benchmark drifts over all servers alike; last: 8 clients while a ninth stores edits
            cells = [(c, False) for c in clients] + [(8, True)]
            for c, editing in cells:
                for editor, n, proc, url, fill in servers:
                    if editing and editor == "none":
                        continue
                    cell = load(url, args.model, c, args.seconds, args.max_tokens, edit_rate=editing)
                    rows.append({"editor": editor, "stored_edits": n, "clients": c, "store_seconds": round(fill, 1),
                                 **cell})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            for *_, proc, _, _ in servers:
                proc.terminate()
                proc.wait(120)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv[1:], "model": args.model, "max_tokens": args.max_tokens,
                               "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
