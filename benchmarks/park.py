"""Carry an unfinished lifelong round from one session to the next (the slow T = 1,000 runs).

A T = 1,000 round of ROME, MEMIT or T-Patcher takes 3-5 CPU hours here, longer than a session, and
``runs/`` is not kept between sessions. ``park`` copies what ``recipe eval --resume`` needs to go on
into ``benchmarks/parked/<run>/`` (committed): the furthest editor state of each round in progress
(``state-T<T>`` if the round's edits are all applied, else the mid-round checkpoint ``T<T>.round``) and
the unedited model's record (``unedited.json``). ``unpark`` puts them back into ``runs/<run>/`` unless a
state there has applied as many edits already; ``benchmarks/baselines_1000.sh`` unparks before each run
and deletes the parked copy once the run's results are written. Each state is read and written again
through ``recipe.editors.state_file``, so a copy is checked and lands atomically.

    .venv/bin/python benchmarks/park.py park rome-zsre-1000 memit-counterfact-1000
    .venv/bin/python benchmarks/park.py unpark rome-zsre-1000
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from recipe.editors.state_file import EditorStateError, load_state, save_state

ROOT = Path(__file__).resolve().parents[1]
ROUND = re.compile(r"(?:T(\d+)\.round|state-T(\d+))$")


def _applied(path: Path) -> int:
    """Edits applied in the state at ``path``; -1 when there is none or it is unreadable."""
    try:
        return int(load_state(path)[1].get("applied", 0))
    except EditorStateError:
        return -1


def _copy_state(src: Path, dst: Path, unless_applied: int = -1) -> int | None:
    """Copy the state at ``src`` to ``dst`` (read once, checked, written atomically) and return its applied
    edits; None, writing nothing, when it has no more than ``unless_applied``."""
    state, meta = load_state(src)  # raises EditorStateError on a broken state: nothing is written
    applied = int(meta.get("applied", 0))
    if applied <= unless_applied:
        return None
    save_state(state, dst, meta)
    return applied


def _copy_file(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _states(run: Path) -> dict[int, Path]:
    """T -> the state to park for that T: ``state-T<T>`` (all edits applied) before ``T<T>.round``."""
    found: dict[int, Path] = {}
    for path in sorted(run.iterdir()) if run.is_dir() else []:
        m = ROUND.fullmatch(path.name)
        if m and path.is_dir():
            T = int(m.group(1) or m.group(2))
            if T not in found or path.name.startswith("state-"):
                found[T] = path
    return found


def park(run: Path, parked: Path) -> list[str]:
    """Copy ``run``'s states in progress and its unedited record into ``parked``; returns what was copied."""
    states = _states(run)
    if not states:
        raise SystemExit(f"park: {run} holds no state to park (no T<T>.round or state-T<T>)")
    work = parked.with_name(parked.name + ".new")  # the old parked copy stays until the new one is whole
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    done = []
    for T, path in sorted(states.items()):
        applied = _copy_state(path, work / path.name)
        done.append(f"{path.name} ({applied} of {T} edits applied)")
    if (run / "unedited.json").is_file():
        _copy_file(run / "unedited.json", work / "unedited.json")
        done.append("unedited.json")
    shutil.rmtree(parked, ignore_errors=True)
    os.replace(work, parked)
    return done


def unpark(parked: Path, run: Path) -> list[str]:
    """Copy parked states into ``run`` where ``run`` has no state as far along; returns what was copied."""
    if not parked.is_dir():
        return []
    run.mkdir(parents=True, exist_ok=True)
    done = []
    for path in sorted(parked.iterdir()):
        if ROUND.fullmatch(path.name) and path.is_dir():
            have = _applied(run / path.name)
            applied = _copy_state(path, run / path.name, unless_applied=have)
            if applied is not None:
                done.append(f"{path.name} ({applied} edits applied; here: {max(have, 0)})")
        elif path.name == "unedited.json" and not (run / path.name).exists():
            _copy_file(path, run / path.name)
            done.append(path.name)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["park", "unpark"])
    ap.add_argument("runs", nargs="+", help="run names: folders under --runs-dir")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    ap.add_argument("--parked-dir", type=Path, default=ROOT / "benchmarks" / "parked")
    args = ap.parse_args(argv)
    for name in args.runs:
        run, parked = args.runs_dir / name, args.parked_dir / name
        done = park(run, parked) if args.action == "park" else unpark(parked, run)
        print(f"{args.action} {name}: {', '.join(done) if done else 'nothing to do'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
