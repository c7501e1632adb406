"""RECIPE's knowledge repository at scale: add, remove, search, memory, save/load; flat against IVF.

    OMP_NUM_THREADS=1 python benchmarks/repository_scale.py --sizes 1000,10000,100000,1000000 \\
        --kinds flat,ivf --out benchmarks/results/scale --threads 1 [--prompt-dtype float16]

Keys are synthetic: unit vectors around ``--centres`` random centres (log-normal cluster sizes,
cos(key, centre) ~ 0.7), generated chunk by chunk from fixed seeds so that any size and any process
sees the same keys. Prompts have the real shape (``--prompt-shape``, 3 x 576 for SmolLM2-135M) and are
stored as the repository stores them (``--prompt-dtype``). Queries are noisy copies of kept keys
(cos ~ 0.7 to their source); recall@1 is measured against the exact top-1 of a brute-force scan.

Each (kind, prompt dtype, size) runs in its own subprocess (a clean peak RSS; a crash loses one run)
and writes ``per_run/<kind>-<dtype>-<size>.json`` when it finishes; existing run files are skipped
(``--force`` redoes them), so an interrupted benchmark resumes where it stopped. After every run
``results.json``, ``table.md`` and the PNG plots are rewritten from all run files. Progress: stderr.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))  # repository_scale_report

log = logging.getLogger("repository_scale")
GEN_CHUNK = 8192  # keys are generated in chunks of this many rows, each from its own seed
TARGET_MS = 5.0  # the target: <= 5 ms per query (batched) at 1M entries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated entry counts")
    p.add_argument("--kinds", default="flat,ivf", help="index kinds: flat, ivf, auto")
    p.add_argument("--out", default="benchmarks/results/scale")
    p.add_argument("--threads", type=int, default=1, help="faiss/torch threads (and OMP_NUM_THREADS of workers)")
    p.add_argument("--key-dim", type=int, default=512)
    p.add_argument("--prompt-shape", default="3,576", help="l,H of one continuous prompt")
    p.add_argument("--prompt-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--centres", type=int, default=4096, help="cluster centres of the synthetic keys")
    p.add_argument("--query-noise", type=float, default=1.0, help="noise norm relative to a unit key")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and batches")
    p.add_argument("--single-queries", type=int, default=200, help="one-query searches timed (at most)")
    p.add_argument("--batches", type=int, default=16, help="batches of 64 queries timed (at most)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--time-budget", type=float, default=20.0, help="seconds per latency measurement (min 5 samples)")
    p.add_argument("--add-batch", type=int, default=1000, help="edits per add() call")
    p.add_argument("--remove-frac", type=float, default=0.01)
    p.add_argument("--single-removes", type=int, default=20, help="of the removed ids, removed one per call")
    p.add_argument("--nprobes", default="8,16,32,64,128", help="IVF nprobe values swept for recall/latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/recipe-repository-scale", help="where repositories are saved")
    p.add_argument("--force", action="store_true", help="redo runs whose result file exists")
    p.add_argument("--in-process", action="store_true", help="no subprocess per run (tests)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "<kind>,<size>": run one, in this process
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def set_threads(n: int) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


# ---- synthetic data ----------------------------------------------------------------------------
class Synthetic:
    """Clustered unit keys, reproducible by row: row i depends only on (seed, i // GEN_CHUNK)."""

    def __init__(self, dim: int, centres: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        self.dim, self.seed = dim, seed
        self.centres = _unit(rng.standard_normal((centres, dim), dtype=np.float32))  # (C, D)
        weights = rng.lognormal(0.0, 1.0, centres)
        self.weights = weights / weights.sum()

    def keys(self, start: int, stop: int) -> np.ndarray:
        """Keys of rows [start, stop): (stop - start, D) float32, unit norm."""
        if stop <= start:
            return np.empty((0, self.dim), np.float32)
        out = []
        for c in range(start // GEN_CHUNK, -(-stop // GEN_CHUNK)):
            lo, hi = max(start, c * GEN_CHUNK), min(stop, (c + 1) * GEN_CHUNK)
            out.append(self._chunk(c)[lo - c * GEN_CHUNK:hi - c * GEN_CHUNK])
        return np.concatenate(out)

    def keys_at(self, rows: np.ndarray) -> np.ndarray:
        """Keys of arbitrary rows (n,), in that order: (n, D), each generator chunk made once."""
        out = np.empty((len(rows), self.dim), np.float32)
        for c in np.unique(rows // GEN_CHUNK):
            mine = np.flatnonzero(rows // GEN_CHUNK == c)
            out[mine] = self._chunk(int(c))[rows[mine] - c * GEN_CHUNK]
        return out

    def _chunk(self, c: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, c])
        centre = rng.choice(len(self.centres), GEN_CHUNK, p=self.weights)
        noise = rng.standard_normal((GEN_CHUNK, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        return _unit(self.centres[centre] + noise)  # (GEN_CHUNK, D), cos(key, centre) ~ 0.7

    def prompts(self, start: int, stop: int, shape: tuple[int, int]):
        import torch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        return 0.02 * torch.randn((stop - start, *shape), generator=gen)  # (n, l, H) float32


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plan(args: argparse.Namespace, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Removed ids (batched part, single part) and the query sources, all drawn from [0, size)."""
    rng = np.random.default_rng([args.seed, 3, size])
    n_remove = max(2, int(round(args.remove_frac * size)))
    removed = rng.choice(size, n_remove, replace=False)
    n_single = min(args.single_removes, n_remove // 2)
    kept = np.setdiff1d(np.arange(size), removed)
    sources = rng.choice(kept, min(args.queries, len(kept)), replace=False)
    return removed[n_single:], removed[:n_single], sources


def make_queries(args: argparse.Namespace, synth: Synthetic, sources: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([args.seed, 4, len(sources)])
    keys = synth.keys_at(sources)  # (Q, D)
    noise = rng.standard_normal(keys.shape, dtype=np.float32) / np.sqrt(args.key_dim)
    return _unit(keys + args.query_noise * noise).astype(np.float32)  # (Q, D)


def ground_truth(args, synth: Synthetic, size: int, removed: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact top-1 id of every query over the kept keys (brute force, chunked); cached on disk."""
    tag = hashlib.sha256(json.dumps([size, args.seed, args.key_dim, args.centres, args.query_noise,
                                     args.queries, args.remove_frac, args.single_removes]).encode()).hexdigest()[:12]
    path = Path(args.work_dir) / "ground_truth" / f"gt-{size}-{tag}.npy"
    if path.exists():
        return np.load(path)
    best, best_id = np.full(len(queries), -np.inf, np.float32), np.full(len(queries), -1, np.int64)
    gone = np.zeros(size, bool)
    gone[removed] = True
    for s in range(0, size, 65_536):
        keys = synth.keys(s, min(size, s + 65_536))  # (c, D)
        scores = queries @ keys.T  # (Q, c)
        scores[:, gone[s:s + len(keys)]] = -np.inf
        top = scores.argmax(axis=1)
        better = scores[np.arange(len(queries)), top] > best
        best[better], best_id[better] = scores[np.arange(len(queries)), top][better], s + top[better]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, best_id)
    return best_id


# ---- one run -----------------------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_calls(fn, items: list, budget: float, min_samples: int = 5) -> list[float]:
    """Seconds per call of fn(item), stopping after ``budget`` seconds (but not before min_samples)."""
    times, start = [], time.perf_counter()
    for item in items:
        t = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t)
        if len(times) >= min_samples and time.perf_counter() - start > budget:
            break
    return times


def search_latency(args, repo, queries: np.ndarray) -> dict:
    """p50/p95 ms of one-query searches and ms per query of batched searches."""
    repo.search(queries[:1])  # warm-up
    single = time_calls(lambda i: repo.search(queries[i:i + 1]), list(range(min(args.single_queries, len(queries)))),
                        args.time_budget)
    b = args.batch_size
    starts = [s for s in range(0, len(queries) - b + 1, b)][:args.batches] or [0]
    batched = [t / b for t in time_calls(lambda s: repo.search(queries[s:s + b]), starts, args.time_budget)]
    return {"single_ms_p50": 1e3 * pct(single, 50), "single_ms_p95": 1e3 * pct(single, 95), "single_n": len(single),
            "batch_ms_per_query_p50": 1e3 * pct(batched, 50), "batch_ms_per_query_p95": 1e3 * pct(batched, 95),
            "batch_n": len(batched)}


def recall_at_1(repo, queries: np.ndarray, truth: np.ndarray) -> float:
    _, ids = repo.search(queries, k=1)
    return float((ids[:, 0] == truth).mean())


def run_one(args: argparse.Namespace, kind: str, size: int) -> dict:
    import faiss
    import torch

    from recipe.retrieval import KnowledgeRepository

    set_threads(args.threads)
    shape = tuple(int(x) for x in args.prompt_shape.split(","))
    synth = Synthetic(args.key_dim, args.centres, args.seed)
    removed_batch, removed_single, sources = plan(args, size)
    queries = make_queries(args, synth, sources)
    t = time.perf_counter()
    truth = ground_truth(args, synth, size, np.concatenate([removed_batch, removed_single]), queries)
    log.info("[%s %s] ground truth in %.1f s", kind, size, time.perf_counter() - t)
    gc.collect()
    rss0 = rss()

    repo = KnowledgeRepository(args.key_dim, shape, index=kind, prompt_dtype=args.prompt_dtype, use_gpu=False)
    add_s, add_max, t_log = 0.0, 0.0, time.perf_counter()
    for s in range(0, size, args.add_batch):
        e = min(size, s + args.add_batch)
        keys, prompts = synth.keys(s, e), synth.prompts(s, e, shape)
        t = time.perf_counter()
        repo.add(keys, prompts)
        if e == size:
            repo.is_approximate  # noqa: B018  (flushes the last buffered keys, inside the timing)
        dt = time.perf_counter() - t
        add_s, add_max = add_s + dt, max(add_max, dt)
        if time.perf_counter() - t_log > 30:
            log.info("[%s %s] added %d (%.1f s in add)", kind, size, e, add_s)
            t_log = time.perf_counter()
    del keys, prompts
    gc.collect()
    rss_built = rss()
    nbytes = repo.nbytes()
    log.info("[%s %s] built: %.1f s, RSS +%.0f MB", kind, size, add_s, (rss_built - rss0) / 2**20)

    t = time.perf_counter()
    repo.remove(removed_batch.tolist())
    remove_batch_s = time.perf_counter() - t
    single_rm = time_calls(lambda i: repo.remove([int(i)]), removed_single.tolist(), 1e9)
    log.info("[%s %s] removed %d + %d", kind, size, len(removed_batch), len(single_rm))

    result = {"kind": kind, "size": size, "prompt_dtype": args.prompt_dtype, "count_after_remove": len(repo),
              "approximate": repo.is_approximate, "nlist": repo._index.nlist or None,
              "nprobe": repo.nprobe if repo.is_approximate else None,
              "ivf_trained_at": repo._index.trained_at,
              "add_s": add_s, "add_us_per_edit": 1e6 * add_s / size, "add_max_call_s": add_max,
              "remove_batch_n": len(removed_batch), "remove_batch_us_per_edit": 1e6 * remove_batch_s / len(removed_batch),
              "remove_single_ms_p50": 1e3 * pct(single_rm, 50) if single_rm else None,
              "remove_single_ms_p95": 1e3 * pct(single_rm, 95) if single_rm else None,
              "rss_baseline_bytes": rss0, "rss_built_bytes": rss_built,
              "bytes_per_edit_rss": (rss_built - rss0) / size,
              "bytes_per_edit_counted": nbytes["total"] / size, "index_bytes": nbytes["keys"],
              "prompt_bytes": nbytes["prompts"]}
    result.update(search_latency(args, repo, queries))
    result["recall_at_1"] = recall_at_1(repo, queries, truth)
    log.info("[%s %s] search 1q p50 %.3f ms, batch %.3f ms/q, recall@1 %.4f", kind, size, result["single_ms_p50"],
             result["batch_ms_per_query_p50"], result["recall_at_1"])
    if repo._index.is_ivf:
        result["nprobe_sweep"] = nprobe_sweep(args, repo, queries, truth)
    _, before = repo.search(queries[:64], k=1)

    work = Path(args.work_dir) / f"{kind}-{args.prompt_dtype}-{size}"
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    repo.save(work)
    result["save_s"] = time.perf_counter() - t
    result["disk_bytes"] = sum(f.stat().st_size for f in work.iterdir())
    del repo
    gc.collect()
    t = time.perf_counter()
    loaded = KnowledgeRepository.load(work, use_gpu=False)
    result["load_s"] = time.perf_counter() - t
    _, after = loaded.search(queries[:64], k=1)
    result["load_same_top1"] = bool(np.array_equal(before, after))
    result["rss_after_load_bytes"] = rss()
    log.info("[%s %s] save %.1f s, load %.1f s, same top-1 %s", kind, size, result["save_s"], result["load_s"],
             result["load_same_top1"])
    del loaded
    shutil.rmtree(work, ignore_errors=True)
    result.update(peak_rss_bytes=peak_rss(), threads=faiss.omp_get_max_threads(), torch_threads=torch.get_num_threads(),
                  omp_num_threads_env=os.environ.get("OMP_NUM_THREADS"),
                  blas_threshold=int(faiss.cvar.distance_compute_blas_threshold), loadavg_end=os.getloadavg())
    return result


def nprobe_sweep(args, repo, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
    default, rows = repo.nprobe, []
    sub = argparse.Namespace(**{**vars(args), "single_queries": min(args.single_queries, 50),
                                "time_budget": min(args.time_budget, 5.0)})
    for nprobe in sorted({int(x) for x in args.nprobes.split(",")} | {default}):
        repo.nprobe = nprobe
        lat = search_latency(sub, repo, queries)
        rows.append({"nprobe": nprobe, "recall_at_1": recall_at_1(repo, queries, truth),
                     "single_ms_p50": lat["single_ms_p50"], "batch_ms_per_query_p50": lat["batch_ms_per_query_p50"]})
    repo.nprobe = default
    return rows


# ---- orchestration and report ------------------------------------------------------------------
def run_path(out: Path, kind: str, dtype: str, size: int) -> Path:
    return out / "per_run" / f"{kind}-{dtype}-{size}.json"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
            "commit": os.environ.get("RECIPE_COMMIT")}


def _portable(path: Path) -> str:
    """``path`` relative to the checkout when inside it: results name no folder of the computer that made them."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which SIMD build it loads
    out = Path(args.out)
    if args.worker:
        kind, size = args.worker.split(",")
        result = {**run_one(args, kind, int(size)), "machine": machine(), "args": {**vars(args), "out": _portable(out)}}
        path = run_path(out, kind, args.prompt_dtype, int(size))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)
        return 0
    sizes, kinds = [int(s) for s in args.sizes.split(",")], args.kinds.split(",")
    failed = 0
    for size in sizes:
        for kind in kinds:
            path = run_path(out, kind, args.prompt_dtype, size)
            if path.exists() and not args.force:
                log.info("skip %s (exists)", path)
                continue
            log.info("run %s %s (%s prompts)", kind, size, args.prompt_dtype)
            worker = [*(argv if argv is not None else sys.argv[1:]), "--worker", f"{kind},{size}"]
            if args.in_process:
                main(worker)
                continue
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            code = subprocess.call([sys.executable, str(Path(__file__).resolve()), *worker], env=env)
            if code:
                log.error("run %s %s failed with exit code %d", kind, size, code)
                failed += 1
            report(out)
    report(out)
    return 1 if failed else 0


def report(out: Path) -> None:
    from repository_scale_report import write_report

    write_report(out, TARGET_MS)


if __name__ == "__main__":
    sys.exit(main())
