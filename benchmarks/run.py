"""Run one benchmark experiment and write its results under ``benchmarks/results/``.

    RECIPE_DATA_DIR=/path/to/data python -m benchmarks.run baselines [--only rome-zsre-1000] [--data-dir DIR]
    python -m benchmarks.run --list                  # the experiments and their runs

An experiment is a YAML file in ``benchmarks/experiments/`` (checked strictly: unknown keys, wrong types
and unknown kinds are errors before anything runs). Each of its runs calls one entry point with the
flags in ``args``: ``recipe eval`` (kind ``eval``), ``recipe general`` (``general``) or a benchmark
module's ``main`` (``trajectory``, ``cost``, ``causal_trace``, ``repository_scale``, ``retrieval_check``,
``prefix_ablation``). String values may name ``{work}`` (the working folder, ``--work``), ``{results}``
(the experiment's results folder) and ``{data}`` (``--data-dir``).

``eval`` and ``general`` runs work in ``<work>/<experiment>/<run>/`` (editor states and checkpoints
stay there) and their result files are copied to ``benchmarks/results/<results>/<run>/``:
``summary.json``, ``table.txt``, ``run.json``, ``identity.json`` and the per-case ``T<T>.jsonl`` (every
scored prompt, target and generated answer), or ``general.json``, ``general.txt`` and ``run.json``.
``trajectory`` runs work there too (``run.json``, ``trajectory.jsonl``, ``trajectory.md`` are copied).
The experiment's own JSON, ``benchmarks/results/<experiment>.json``, collects every run's command and
result (``summary.json`` / ``general.json``), the date and the hardware.

Every ``eval`` run resumes: finished rounds are kept, a round cut short continues from its last
checkpoint (``checkpoint-every``) or kept state (``save-states``), and a folder of another run (other
editor, config, dataset, seed, model or cases) is refused. To continue an unfinished run on another
machine, copy ``<work>/<experiment>/`` there and run the same command; ``--fresh`` starts over.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from recipe.config import from_dict, load_yaml
from recipe.errors import ConfigError, RecipeError

log = logging.getLogger("benchmarks.run")
HERE = Path(__file__).resolve().parent
EXPERIMENTS = HERE / "experiments"
RESULTS = HERE / "results"
Kind = Literal["eval", "general", "mquake", "trajectory", "cost", "causal_trace", "repository_scale", "retrieval_check",
               "prefix_ablation"]
CLI_KINDS = ("eval", "general", "mquake")  # `recipe eval|general|mquake`; the other kinds: benchmarks.<kind>.main
RESULT_FILES = {  # kinds that work in <work>/<experiment>/<run>/: the files copied to the results
    "eval": ("summary.json", "table.txt", "run.json", "identity.json", "T*.jsonl", "seen_split.*", "latest_answer.json"),
    "general": ("general.json", "general.txt", "run.json"),
    "mquake": ("mquake.json", "run.json"),
    "trajectory": ("run.json", "trajectory.jsonl", "trajectory.md")}
RESULT_JSON = {"eval": "summary.json", "general": "general.json"}  # what the experiment's JSON includes (not
# mquake.json: it holds every row)
DATA_FLAG = {"causal_trace": "data", "repository_scale": None}  # how --data-dir is passed on (default: data-dir)


@dataclass
class Run:
    """One command of an experiment."""

    name: str  # its folder: <work>/<experiment>/<name>, benchmarks/results/<results>/<name>
    args: dict = field(default_factory=dict)  # the entry point's flags without "--"; true: a bare flag; a list: repeated
    kind: Kind | None = None  # default: the experiment's kind
    keep: bool = True  # copy its result files into benchmarks/results (false: a run kept for its editor state)
    # eval only: analyses of its per-case rows (seen_split: targets seen / never seen in training, shared
    # subjects; latest_answer: each question scored on its latest answer)
    analyses: list[Literal["seen_split", "latest_answer"]] = field(default_factory=list)


@dataclass
class Experiment:
    """A benchmark: what it measures and the runs that measure it."""

    description: str
    kind: Kind
    runs: list[Run]
    results: str | None = None  # folder under benchmarks/results (default: the experiment's name)


def experiment_path(name: str) -> Path:
    """``name`` as a path to a YAML file, or the name of one in benchmarks/experiments/."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"experiment names are letters, digits, '-' and '_', got {name!r}")
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(known)}")
    return path


def load_experiment(path: Path) -> Experiment:
    """The experiment in ``path``, every run's flags checked by its entry point's parser."""
    exp = from_dict(Experiment, load_yaml(path), str(path))
    names = [r.name for r in exp.runs]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{path}: runs need distinct names, got {names}")
    for run in exp.runs:
        run.kind = run.kind or exp.kind
        if run.analyses and run.kind != "eval":
            raise ConfigError(f"{path}: run {run.name!r}: analyses are for eval runs, not {run.kind}")
        if not all(isinstance(v, (str, int, float, bool, list)) for v in run.args.values()):  # not nested maps
            raise ConfigError(f"{path}: run {run.name!r}: args values are strings, numbers, true/false or lists")
        _check_args(run, path)
    return exp


def _entry(kind: str) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of ``kind``'s entry point and the words before its flags."""
    if kind in CLI_KINDS:
        from recipe.cli import build_parser

        return build_parser(), [kind]
    return importlib.import_module(f"benchmarks.{kind}").build_parser(), []


def _check_args(run: Run, path: Path) -> None:
    parser, head = _entry(run.kind)
    parser.exit_on_error = False
    try:
        parser.parse_args([*head, *flags(run.args, {})])
    except (argparse.ArgumentError, SystemExit) as err:
        raise ConfigError(f"{path}: run {run.name!r}: its {run.kind} entry point does not accept {run.args} "
                          f"({err})") from None


def flags(args: dict, names: dict[str, str]) -> list[str]:
    """``{"edits": "1,10", "no-generation": True, "set": ["a=1"]}`` -> ``--edits 1,10 --no-generation --set a=1``,
    with ``{work}``-style names in strings filled in from ``names``."""
    out: list[str] = []
    for key, value in args.items():
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                out.append(f"--{key}")
            elif v is not False:
                out += [f"--{key}", _fill(str(v), names)]
    return out


def _fill(text: str, names: dict[str, str]) -> str:
    for name, value in names.items():
        text = text.replace("{" + name + "}", value)
    return text


def machine() -> str:
    """The hardware a result was measured on, in words."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads{gpu}")


def run_one(run: Run, work: Path, results: Path, names: dict[str, str], data_dir: str | None,
            fresh: bool) -> dict:
    """Run ``run`` (its folder: ``work``) and copy what it measured into ``results``; returns its record."""
    argv = flags(run.args, names)
    data_flag = DATA_FLAG.get(run.kind, "data-dir")
    if data_dir is not None and data_flag is not None and data_flag not in run.args:
        argv += [f"--{data_flag}", data_dir]
    if run.kind in RESULT_FILES:
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
        argv += ["--out", str(work)] + (["--resume"] if run.kind == "eval" else [])
    if run.kind in CLI_KINDS:
        from recipe import cli

        argv = [run.kind, *argv]
        code = cli.main(argv)
    else:
        code = importlib.import_module(f"benchmarks.{run.kind}").main(argv)
    if code:
        raise RecipeError(f"run {run.name!r} failed (exit status {code}): {' '.join(argv)}")
    for analysis in run.analyses:
        dataset = ["--dataset", str(run.args["dataset"])] + (["--data-dir", data_dir] if data_dir else [])
        if importlib.import_module(f"benchmarks.{analysis}").main([str(work), *dataset]):
            raise RecipeError(f"the {analysis} analysis of run {run.name!r} failed")
    record = {"name": run.name, "kind": run.kind, "argv": argv, "date": datetime.date.today().isoformat(),
              "machine": machine()}
    if run.kind in RESULT_JSON:
        record["result"] = json.loads((work / RESULT_JSON[run.kind]).read_text())
    if run.kind in RESULT_FILES and run.keep:
        record["files"] = _copy_results(work, results / run.name, RESULT_FILES[run.kind])
    return record


def _copy_results(work: Path, dest: Path, patterns: tuple[str, ...]) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in patterns:
        for src in sorted(work.glob(pattern)):
            tmp = dest / f".{src.name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest / src.name)
            copied.append(src.name)
    return copied


def write_result(path: Path, name: str, exp: Experiment, records: list[dict]) -> None:
    """The experiment's JSON: every run's latest record (runs not run this time are kept as they were)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    runs = {r["name"]: r for r in old.get("runs", [])} | {r["name"]: r for r in records}
    order = [r.name for r in exp.runs]
    result = {"experiment": name, "description": exp.description,  # each run says when and where it ran
              "runs": sorted(runs.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def run_experiment(name: str, *, only: list[str] = (), data_dir: str | None = None, out: Path = RESULTS,
                   work: Path = Path("runs"), fresh: bool = False) -> Path:
    """Run the experiment ``name`` (or the runs in ``only``); returns the path of its JSON result."""
    path = experiment_path(name)
    exp = load_experiment(path)
    unknown = sorted(set(only) - {r.name for r in exp.runs})
    if unknown:
        raise ConfigError(f"{path} has no run(s) {unknown}; its runs: {[r.name for r in exp.runs]}")
    results = Path(out) / (exp.results or path.stem)
    names = {"work": str(work), "results": str(results), "data": data_dir or ""}
    result_path = Path(out) / f"{path.stem}.json"  # beside the groups: no reader of a group's *.json sees it
    for run in exp.runs:
        if only and run.name not in only:
            continue
        log.info("%s: run %s (%s)", path.stem, run.name, run.kind)
        record = run_one(run, Path(work) / path.stem / run.name, results, names, data_dir, fresh)
        write_result(result_path, path.stem, exp, [record])  # after each run: a crash keeps the finished ones
    return result_path


def _list() -> str:
    lines = []
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        exp = load_experiment(path)
        lines.append(f"{path.stem:<22} {exp.description.splitlines()[0]}")
        lines += [f"    {r.name}" for r in exp.runs]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", nargs="?", help="a name in benchmarks/experiments/ or a YAML path")
    p.add_argument("--only", action="append", default=[], metavar="RUN", help="run only this run (repeatable)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $RECIPE_DATA_DIR)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results root (default: benchmarks/results)")
    p.add_argument("--work", type=Path, default=Path("runs"),
                   help="working folder of states and checkpoints (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="start every run over instead of resuming it")
    p.add_argument("--list", action="store_true", help="list the experiments and their runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which SIMD build it loads
    try:
        if args.list:
            sys.stdout.write(_list() + "\n")
            return 0
        if not args.experiment:
            raise ConfigError("name an experiment (see --list)")
        path = run_experiment(args.experiment, only=args.only, data_dir=args.data_dir, out=args.out,
                              work=args.work, fresh=args.fresh)
    except RecipeError as err:
        sys.stderr.write(f"benchmarks.run: error: {err}\n")
        return 2
    log.info("results: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
