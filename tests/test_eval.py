"""The sequential-edit loop on the tiny model: protocol, outputs, metrics and rollback."""
import json
import statistics
import time

import pytest
import torch

from recipe.data import load_dataset
from recipe.editors import load_editor
from recipe.errors import RecipeError
from recipe.eval.metrics import NATURAL_STOP_CAP, exact_match, first_sentence, generate_natural, natural_stop_hit
from recipe.eval.report import format_table, plot_metrics
from recipe.editors.state_file import load_state
from recipe.eval.sequential import _queries, run_sequential, seeded_order


@pytest.fixture(scope="module")
def demo_cases():
    return load_dataset("demo")


def test_exact_match_rules():
    assert exact_match(" Rome, the capital", ["Rome"])
    assert exact_match("rome.", ["Rome"])
    assert not exact_match(" Romeo and Juliet", ["Rome"])
    assert exact_match(" Kai Wegner is", ["Berlin", "Kai Wegner"])
    assert not exact_match("", ["Rome"])


def test_none_editor_rounds_outputs_and_perfect_locality(tiny, demo_cases, tmp_path):
    editor = load_editor("none", tiny)
    result = run_sequential(tiny, editor, demo_cases, [1, 2], n_cases=4, out_dir=tmp_path, progress=False)
    s1, s2 = result.summaries[1], result.summaries[2]
    assert (s1["rounds"], s2["rounds"]) == (4, 2)
    chosen = seeded_order(demo_cases, 0)[:4]
    assert s1["queries"] == len(_queries(chosen)) and "score_ms_per_query" in s1  # every probe of every case
    assert s1["tf"]["locality"] == 1.0 and s1["em"]["locality"] == 1.0
    base = tiny.score([c.request.prompt for c in chosen], [c.request.target_new for c in chosen])
    assert s1["tf"]["reliability"] == pytest.approx(sum(b.accuracy for b in base) / 4)  # nothing written
    for T in (1, 2):
        lines = (tmp_path / f"T{T}.jsonl").read_text().splitlines()
        assert len(lines) == 4
        row = json.loads(lines[0])
        assert {"case_id", "edit_time_s", "tf", "em"} <= set(row)
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 2
    table = format_table(list(result.summaries.values()), "t")
    assert "reliability tf/em" in table and "locality" in table
    assert plot_metrics(list(result.summaries.values()), tmp_path / "m.png").stat().st_size > 1000


def test_ft_beats_none_and_model_is_rolled_back(tiny, demo_cases):
    ids = tiny.tokenizer(["The capital of France is"], return_tensors="pt")
    base = tiny.model(**ids).logits
    none = run_sequential(tiny, load_editor("none", tiny), demo_cases, [1], n_cases=3,
                          free_generation=False, progress=False).summaries[1]
    ft = load_editor("ft", tiny, steps=20, lr=5.0e-2, norm_constraint=0.0)
    edited = run_sequential(tiny, ft, demo_cases, [1, 3], n_cases=3, free_generation=False,
                            progress=False).summaries
    assert edited[1]["tf"]["reliability"] > none["tf"]["reliability"]
    assert edited[1]["tf"]["reliability"] >= 0.9
    assert torch.equal(tiny.model(**ids).logits, base)


def test_same_seed_same_order(tiny, demo_cases):
    a = run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], seed=3, free_generation=False,
                       progress=False).summaries[2]
    b = run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], seed=3, free_generation=False,
                       progress=False).summaries[2]
    assert a["tf"] == b["tf"]


@pytest.mark.parametrize("counts, n", [([0], None), ([5], 3), ([100], None)])
def test_bad_counts(tiny, demo_cases, counts, n):
    with pytest.raises(RecipeError):
        run_sequential(tiny, load_editor("none", tiny), demo_cases, counts, n_cases=n, progress=False)


def test_resume_skips_completed_rounds_and_matches(tiny, demo_cases, tmp_path):
    class Counting:
        """Wraps an editor and counts edit calls."""

        def __init__(self, inner):
            self.inner, self.calls, self.name, self.config = inner, 0, inner.name, inner.config

        def edit(self, requests):
            self.calls += 1
            return self.inner.edit(requests)

        def rollback(self):
            self.inner.rollback()

    full = run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], n_cases=6, out_dir=tmp_path,
                          free_generation=False, progress=False).summaries[2]
    path = tmp_path / "T2.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n")  # one complete round + half of the next: a crash
    editor = Counting(load_editor("none", tiny))
    again = run_sequential(tiny, editor, demo_cases, [2], n_cases=6, out_dir=tmp_path, resume=True,
                           free_generation=False, progress=False).summaries[2]
    assert editor.calls == 4  # rounds 2 and 3 only
    assert again["tf"] == full["tf"] and again["cases"] == 6
    assert len(path.read_text().splitlines()) == 6
    with pytest.raises(RecipeError, match="another run"):
        run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], n_cases=6, seed=9, out_dir=tmp_path,
                       resume=True, free_generation=False, progress=False)


def test_resume_reads_the_unedited_record_while_model_and_probes_match(tiny, demo_cases, tmp_path, monkeypatch):
    from recipe.eval import sequential

    first = run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], n_cases=4, out_dir=tmp_path,
                           progress=False).summaries[2]
    record = json.loads((tmp_path / "unedited.json").read_text())
    assert len(record["scores"]) == len(record["generations"]) > 0
    calls = []
    real = sequential._score_queries
    monkeypatch.setattr(sequential, "_score_queries", lambda lm, qs, *a, **k: calls.append(k.get("desc")) or real(lm, qs, *a, **k))
    (tmp_path / "T2.jsonl").write_text("")  # nothing complete: every round runs again
    again = run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], n_cases=4, out_dir=tmp_path,
                           resume=True, progress=False).summaries[2]
    assert "unedited model: " not in calls and again["tf"] == first["tf"] and again["em"] == first["em"]
    with torch.no_grad():
        tiny.model.lm_head.weight[0, 0] += 1.0  # other weights: another run, refused
        try:
            with pytest.raises(RecipeError, match="model_fingerprint"):
                run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], n_cases=4, out_dir=tmp_path,
                               resume=True, progress=False)
        finally:
            tiny.model.lm_head.weight[0, 0] -= 1.0
    with pytest.raises(RecipeError, match="free_generation"):  # other scoring settings: refused too
        run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], n_cases=4, out_dir=tmp_path, resume=True,
                       free_generation=False, progress=False)
    (tmp_path / "identity.json").unlink()
    with pytest.raises(RecipeError, match="without identity.json"):
        run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], n_cases=4, out_dir=tmp_path, resume=True,
                       progress=False)


def test_resume_refuses_a_folder_of_another_editor_config_or_dataset(tiny, demo_cases, tmp_path):
    def ft(**kw):
        return load_editor("ft", tiny, steps=2, **kw)

    kw = dict(n_cases=2, out_dir=tmp_path, free_generation=False, progress=False)
    ft_run = run_sequential(tiny, ft(), demo_cases, [1], identity={"dataset": "demo"}, **kw).summaries[1]
    rows = (tmp_path / "T1.jsonl").read_text()
    for editor, cases, ident, wrong in [(load_editor("none", tiny), demo_cases, "demo", "editor: 'ft' there, 'none'"),
                                        (ft(lr=1.0e-3), demo_cases, "demo", "editor_config.lr"),
                                        (ft(), demo_cases, "zsre", "dataset: 'demo' there, 'zsre'"),
                                        (ft(), demo_cases[::-1], "demo", "cases"),
                                        (ft(), demo_cases, "demo", "seed")]:
        with pytest.raises(RecipeError, match=wrong):
            run_sequential(tiny, editor, cases, [1], identity={"dataset": ident}, resume=True,
                           **{**kw, **({"seed": 5} if wrong == "seed" else {})})
        assert (tmp_path / "T1.jsonl").read_text() == rows  # nothing of the other run was written
    again = run_sequential(tiny, ft(), demo_cases, [1], identity={"dataset": "demo"}, resume=True, **kw)
    assert again.summaries[1]["tf"] == ft_run["tf"]  # the same run resumes
    (tmp_path / "T7.round").mkdir()  # a checkpoint of the ft run
    run_sequential(tiny, load_editor("none", tiny), demo_cases, [2], identity={"dataset": "demo"}, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T2.jsonl", "identity.json", "summary.json",
                                                          "unedited.json"]  # started over: nothing of ft's left


def test_score_cases_applies_every_edit_but_scores_a_seeded_sample(tiny):
    from recipe.editors import load_editor
    from recipe.data import load_dataset
    from recipe.eval.sequential import run_sequential

    cases = load_dataset("demo")
    editor = load_editor("none", tiny)
    applied = []
    editor._apply = lambda requests, ids: applied.extend(requests)  # count the edits that reach the editor
    a = run_sequential(tiny, editor, cases, [8], n_cases=16, score_cases=3, free_generation=False, progress=False)
    assert len(applied) == 16  # two rounds of 8 edits, all applied
    assert a.summaries[8]["cases"] == 6 and a.summaries[8]["rounds"] == 2
    b = run_sequential(tiny, editor, cases, [8], n_cases=16, score_cases=3, free_generation=False, progress=False)
    assert a.summaries[8] == {**b.summaries[8], "edit_time_s": a.summaries[8]["edit_time_s"],
                              "score_ms_per_query": a.summaries[8]["score_ms_per_query"],
                              "generate_ms_per_query": a.summaries[8]["generate_ms_per_query"],
                              "peak_rss_mb": a.summaries[8]["peak_rss_mb"]}  # the same sample again
    with pytest.raises(RecipeError, match="score_cases"):
        run_sequential(tiny, editor, cases, [8], n_cases=16, score_cases=0, progress=False)


def test_resume_with_score_cases_keeps_the_sampled_rounds(tiny, tmp_path):
    from recipe.editors import load_editor
    from recipe.data import load_dataset
    from recipe.eval.sequential import run_sequential

    cases, applied = load_dataset("demo"), []
    editor = load_editor("none", tiny)
    editor._apply = lambda requests, ids: applied.extend(requests)
    kw = dict(n_cases=16, score_cases=3, free_generation=False, progress=False, out_dir=tmp_path)
    full = run_sequential(tiny, editor, cases, [8], **kw).summaries[8]
    rows = (tmp_path / "T8.jsonl").read_text().splitlines()
    assert len(rows) == 6
    (tmp_path / "T8.jsonl").write_text("\n".join(rows[:4]) + "\n")  # round 0 whole, round 1 cut short
    applied.clear()
    resumed = run_sequential(tiny, editor, cases, [8], resume=True, **kw).summaries[8]
    assert len(applied) == 8  # only round 1 again
    assert len((tmp_path / "T8.jsonl").read_text().splitlines()) == 6
    assert (resumed["cases"], resumed["rounds"], resumed["tf"]) == (full["cases"], full["rounds"], full["tf"])


def test_a_round_cut_short_resumes_from_its_checkpoint(tiny, one_thread, demo_cases, tmp_path):
    def ft():
        return load_editor("ft", tiny, steps=5, lr=5.0e-2, norm_constraint=0.0)

    full = run_sequential(tiny, ft(), demo_cases, [4], out_dir=tmp_path / "full", free_generation=False,
                          progress=False).summaries[4]
    crashing, calls = ft(), []
    inner = crashing.edit

    def edit(requests):
        calls.append(requests)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed while applying the 4th edit
        return inner(requests)

    crashing.edit = edit
    with pytest.raises(KeyboardInterrupt):
        run_sequential(tiny, crashing, demo_cases, [4], out_dir=tmp_path / "cut", free_generation=False,
                       progress=False, checkpoint_every=2)
    crashing.rollback()
    assert (tmp_path / "cut" / "T4.round").is_dir()  # state after edits 1-2
    again, applied = ft(), []
    inner_again = again.edit
    again.edit = lambda requests: applied.append(requests) or inner_again(requests)
    resumed = run_sequential(tiny, again, demo_cases, [4], out_dir=tmp_path / "cut", resume=True,
                             free_generation=False, progress=False, checkpoint_every=2).summaries[4]
    assert applied == calls[2:4]  # only edits 3 and 4 were applied again
    assert resumed["tf"] == pytest.approx(full["tf"], abs=1e-6)
    assert not (tmp_path / "cut" / "T4.round").exists()  # removed once the round is written
    with pytest.raises(RecipeError, match="positive"):
        run_sequential(tiny, ft(), demo_cases, [4], out_dir=tmp_path / "x", checkpoint_every=0, progress=False)


def test_a_round_that_kept_its_state_is_not_edited_again(tiny, one_thread, demo_cases, tmp_path, monkeypatch):
    import recipe.eval.sequential as seq

    def ft():
        return load_editor("ft", tiny, steps=5, lr=5.0e-2, norm_constraint=0.0)

    kw = dict(out_dir=tmp_path, free_generation=False, progress=False, checkpoint_every=3, save_states=True)
    full = run_sequential(tiny, ft(), demo_cases, [4], out_dir=tmp_path / "full", free_generation=False,
                          progress=False).summaries[4]
    real = seq._score_queries

    def killed(*a, **k):
        if "T=4" in k.get("desc", ""):
            raise KeyboardInterrupt  # the edits are done and kept; killed while scoring them
        return real(*a, **k)

    monkeypatch.setattr(seq, "_score_queries", killed)
    crashing = ft()
    with pytest.raises(KeyboardInterrupt):
        run_sequential(tiny, crashing, demo_cases, [4], **kw)
    crashing.rollback()
    assert (tmp_path / "state-T4").is_dir() and (tmp_path / "T4.round").is_dir()  # state after 4 and after 3 edits
    monkeypatch.setattr(seq, "_score_queries", real)
    again = ft()
    again.edit = lambda requests: pytest.fail("the kept state after all 4 edits should be loaded instead")
    kept_times = load_state(tmp_path / "state-T4")[1]["edit_times"]
    resumed = run_sequential(tiny, again, demo_cases, [4], resume=True, **kw).summaries[4]
    assert resumed["tf"] == pytest.approx(full["tf"], abs=1e-6)
    assert len(kept_times) == 4 and resumed["edit_time_s"]["median"] == statistics.median(kept_times)


def test_saved_state_stands_for_its_edits_in_general(tiny, one_thread, demo_cases, tmp_path):
    from recipe.eval.general import Choice, run_general

    items = {"csqa": [Choice("The capital of France is?", ("Paris", "Rome", "Oslo"), 0)]}
    editor = load_editor("ft", tiny, steps=5, lr=5.0e-2, norm_constraint=0.0)
    run_sequential(tiny, editor, demo_cases, [2], n_cases=4, out_dir=tmp_path, free_generation=False,
                   progress=False, save_states=True)
    state = load_state(tmp_path / "state-T2")
    assert state[1]["case_ids"] == [c.case_id for c in seeded_order(demo_cases, 0)[:2]]
    applied = run_general(tiny, editor, demo_cases, [2], items, max_tokens=100, progress=False)
    editor.edit = lambda requests: pytest.fail("the saved state should replace these edits")
    loaded = run_general(tiny, editor, demo_cases, [2], items, max_tokens=100, progress=False, states=[state])
    assert loaded["runs"][1]["scores"] == applied["runs"][1]["scores"]
    assert loaded["runs"][1]["edit_s"] == pytest.approx(sum(state[1]["edit_times"]))
    with pytest.raises(RecipeError, match="other cases"):
        run_general(tiny, editor, demo_cases, [2], items, seed=5, max_tokens=100, progress=False, states=[state])
    with pytest.raises(RecipeError, match="T=2"):
        run_general(tiny, editor, demo_cases, [3], items, max_tokens=100, progress=False, states=[state])


def test_scoring_in_chunks_with_a_bar_gives_the_same_scores(tiny, one_thread, demo_cases):
    from recipe.eval.metrics import generate_for, generation_budget
    from recipe.eval.sequential import _score_queries

    tiny.max_batch = 2  # chunks of 32 queries: several chunks and a ragged last one
    qs = _queries(demo_cases[:25])
    assert len(qs) > 2 * 32 and len(qs) % 32
    start = time.perf_counter()
    scores, gens, secs = _score_queries(tiny, qs, free_generation=True, progress=True, desc="test: ")
    wall = time.perf_counter() - start
    assert scores == tiny.score([q.prompt for q in qs], [q.target for q in qs])
    assert gens == {"em": generate_for(tiny, [q.prompt for q in qs], [generation_budget(tiny, q.answers) for q in qs])}
    assert len(secs) == 3 and sum(secs) <= wall  # scoring, generating, natural stop (not asked for): timed inside


# ---- natural-stop generation -------------------------------------------------------------------
@pytest.fixture
def scripted(tiny):
    """The tiny model made to generate a given text: after each multi-token forward pass (a prompt) the
    last logits favour ``tiny.script[0]``, after each next one-token pass (a decoding step) the next
    token of the script, so stopping rules can be tested on hand-made text. ``tiny.calls``: the passes."""
    calls = []

    def favour(module, args, kwargs, output):
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        step = 0 if inputs.shape[1] > 1 else calls[-1] + 1
        calls.append(step)
        if step < len(tiny.script):
            output.logits[:, -1, tiny.script[step]] += 1e4
        return output

    handle = tiny.model.register_forward_hook(favour, with_kwargs=True)
    tiny.script, tiny.calls = [], calls
    yield tiny
    handle.remove()


def _script(lm, text: str, eos_after: bool = False) -> list[int]:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([lm.tokenizer.eos_token_id] if eos_after else [])


def test_natural_stop_ends_at_the_first_sentence(scripted):
    scripted.script = _script(scripted, " Paris. It lies on the Seine and more")
    assert generate_natural(scripted, ["The capital of France is"]) == ["Paris."]
    assert len(scripted.calls) == len(_script(scripted, " Paris."))  # generation stopped there, not at the cap


def test_natural_stop_ends_at_eos(scripted):
    scripted.script = _script(scripted, " Paris is", eos_after=True) + _script(scripted, " big. Yes")
    assert generate_natural(scripted, ["The capital of France is"]) == ["Paris is"]
    assert len(scripted.calls) == len(_script(scripted, " Paris is")) + 1


def test_natural_stop_is_capped(scripted):
    scripted.script = _script(scripted, " and" * (NATURAL_STOP_CAP + 8))
    text = generate_natural(scripted, ["The capital of France is"])[0]
    assert len(scripted.script) > NATURAL_STOP_CAP
    assert text == scripted.tokenizer.decode(scripted.script[:NATURAL_STOP_CAP]).strip()
    assert len(scripted.calls) == NATURAL_STOP_CAP


def test_first_sentence_rules():
    assert first_sentence("\n Paris. It is") == "Paris."
    assert first_sentence(" Washington, D.C. is big") == "Washington, D.C."
    assert first_sentence(" Paris\nRome.") == "Paris"
    assert first_sentence(" the year 3.5 million") == "the year 3.5 million"
    assert first_sentence(" Is it Rome? Yes.") == "Is it Rome?"


def test_natural_stop_hit_needs_the_new_answer_and_not_the_old():
    assert natural_stop_hit("It is Paris.", ["Paris"], ["Rome"])
    assert not natural_stop_hit("Paris, not Rome.", ["Paris"], ["Rome"])  # both: the old answer still there
    assert not natural_stop_hit("Parisian food.", ["Paris"])  # word boundaries
    assert natural_stop_hit("the city is New York City.", ["New York City"], ["New York"])  # old inside new
    assert not natural_stop_hit("New York City or New York.", ["New York City"], ["New York"])
    assert natural_stop_hit("It is paris", ["Paris"], [""])  # an empty old answer is no old answer


def test_natural_stop_column_in_the_loop(scripted, demo_cases, tmp_path):
    """Reliability: hit when the sentence holds the new answer; locality: the unedited sentence; off by
    default, the summary has no ``ns`` and the rows no sentence."""
    case = demo_cases[0]
    scripted.script = _script(scripted, f" {case.request.target_new}. And so on")
    editor = load_editor("none", scripted)
    plain = run_sequential(scripted, editor, demo_cases[:1], [1], progress=False, out_dir=tmp_path / "a")
    assert "ns" not in plain.summaries[1] and '"sentence"' not in (tmp_path / "a" / "T1.jsonl").read_text()
    result = run_sequential(scripted, editor, demo_cases[:1], [1], natural_stop=True, progress=False,
                            out_dir=tmp_path / "b")
    ns = result.summaries[1]["ns"]
    assert ns["reliability"] == 1.0 and ns["locality"] == 1.0
    assert result.summaries[1]["tf"] == plain.summaries[1]["tf"]
    row = json.loads((tmp_path / "b" / "T1.jsonl").read_text().splitlines()[0])
    assert row["queries"][0]["sentence"] == f"{case.request.target_new}."
    assert json.loads((tmp_path / "b" / "identity.json").read_text())["natural_stop"] is True
    scripted.script = _script(scripted, f" {case.request.target_new}, not {case.request.target_true}. And")
    both = run_sequential(scripted, editor, demo_cases[:1], [1], natural_stop=True, progress=False).summaries[1]
    assert both["ns"]["reliability"] == 0.0 and both["em"]["reliability"] == 1.0  # exact match accepts it


def test_cli_eval_natural_stop_flag(tiny, one_thread, tmp_path, monkeypatch, capsys):
    from recipe import cli

    monkeypatch.setattr(cli, "_load", lambda args: (tiny, load_editor(args.editor, tiny)))
    argv = ["eval", "--editor", "none", "--dataset", "demo", "--edits", "1", "--cases", "2", "--out"]
    assert cli.main(argv + [str(tmp_path / "plain")]) == 0
    assert "ns" not in json.loads((tmp_path / "plain" / "summary.json").read_text())[0]
    assert cli.main(argv + [str(tmp_path / "ns"), "--natural-stop"]) == 0
    summary = json.loads((tmp_path / "ns" / "summary.json").read_text())[0]
    assert summary["ns"]["locality"] == 1.0  # the none editor: the unedited model's own sentences
    assert "natural stop (ns): T=1:" in (tmp_path / "ns" / "table.txt").read_text()
