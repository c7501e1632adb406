"""Read the committed results under benchmarks/results/ as the benchmark commands wrote them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass(frozen=True)
class Results:
    """Read-only access to one results folder (benchmarks/results/ by default)."""

    root: Path = RESULTS

    def has(self, run: str) -> bool:
        """Whether ``<run>/summary.json`` exists (a run not made yet has none)."""
        return (self.root / run / "summary.json").is_file()

    def summaries(self, run: str) -> dict[int, dict]:
        """T -> the summary of ``<run>/summary.json`` (``recipe eval``'s output) with the most cases."""
        path = self.root / run / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"no summary.json for run {run!r} under {self.root}")
        best: dict[int, dict] = {}
        for s in json.loads(path.read_text()):
            if s["T"] not in best or s["cases"] > best[s["T"]]["cases"]:
                best[s["T"]] = s
        return best

    def summary(self, run: str, T: int) -> dict:
        by_T = self.summaries(run)
        if T not in by_T:
            raise KeyError(f"run {run!r} has no T = {T} (it has {sorted(by_T)})")
        return by_T[T]

    def text(self, name: str) -> str:
        """A results file as written (e.g. ``cost/table.md``), without its final newline."""
        return (self.root / name).read_text().rstrip("\n")

    def general(self) -> list[dict]:
        """Every ``general/general-<editor>-<dataset>[-<T>]/general.json``: one row per (editor, dataset, T)."""
        rows, seen = [], set()
        for path in sorted(self.root.glob("general/general-*/general.json")):
            data = json.loads(path.read_text())
            dataset = path.parent.name.split("-")[2]
            for run in data["runs"]:
                key = ("unedited", "", 0) if run["T"] == 0 else (data["editor"], dataset, run["T"])
                if key not in seen:
                    seen.add(key)
                    rows.append({"editor": key[0], "dataset": key[1], "T": key[2], "scores": run["scores"],
                                 "run": f"general/{path.parent.name}"})
        return rows

    def trajectory(self, name: str) -> list[dict]:
        """The probes of ``trajectory/<name>/trajectory.jsonl``, one dict per probe, in edit order."""
        path = self.root / "trajectory" / name / "trajectory.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def mquake(self, name: str) -> dict:
        """``mquake/<name>/mquake.json`` (``recipe mquake``'s output: floor, edited scores and every row)."""
        return json.loads((self.root / "mquake" / name / "mquake.json").read_text())
