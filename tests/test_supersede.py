"""Updates in the RECIPE editor (tiny Llama, tiny random BERT): an edit restating a stored question
supersedes the stored answer, removing it brings the older one back, and saves keep all of it."""
import pytest
import torch

from recipe.errors import RecipeError
from recipe.eval.sequential import latest_answer_summary
from recipe.retrieval.updates import question_key
from recipe.testing import tiny_lm
from recipe.types import EditRequest
from tests.test_recipe import ACCEPT_ALL, make

pytestmark = pytest.mark.usefixtures("one_thread")
EXACT = {**ACCEPT_ALL, "supersede_margin": None}  # the question-key rule alone (every entry passes the sentinel)

QUESTION = "The capital of France is"
PARIS, ROME, LYON = (EditRequest(QUESTION, answer, subject="France") for answer in ("Paris", "Rome", "Lyon"))
PRESIDENT = EditRequest("The president of France is", "Obama", subject="France")


def in_use(editor) -> list[int]:
    return sorted(editor.repository.ids())


def prefix_of(editor, prompt=QUESTION):
    (prefix,) = editor._provide([prompt])
    return editor.last_retrieval[0].edit_id, prefix.vectors


def chain(lm, **kw):
    editor = make(lm, **{**EXACT, **kw})
    for request in (PARIS, ROME, LYON):
        editor.edit([request])
    return editor


def test_question_key_is_the_casefolded_prompt_without_trailing_punctuation():
    assert question_key("The capital of  France is:") == question_key("the capital of France is") == \
        "the capital of france is"
    assert question_key("What is the capital of France?") == "what is the capital of france"
    assert question_key("Who wrote Hamlet (1603)") == "who wrote hamlet (1603)"
    assert question_key("The president of France is") != question_key(QUESTION)


def test_a_restated_question_supersedes_the_stored_answer(tiny):
    editor = make(tiny, **EXACT)
    (old,) = editor.edit([PARIS])
    (new,) = editor.edit([EditRequest("the capital of France is:", "Rome", subject="France")])
    assert editor.last_superseded == {new: old} and editor.superseded() == {old: new}
    assert in_use(editor) == [new] and editor.records[old].superseded_by == new
    assert editor.records[new].superseded_by is None and set(editor.records) == {old, new}
    assert prefix_of(editor)[0] == new  # the old entry can no longer be retrieved


def test_another_question_about_the_same_subject_keeps_both(tiny):
    editor = make(tiny, **EXACT)
    ids = editor.edit([PARIS]) + editor.edit([PRESIDENT])
    assert editor.last_superseded == {} and editor.superseded() == {} and in_use(editor) == ids


def test_removing_the_newer_edit_restores_the_older_one_exactly(tiny):
    editor = make(tiny, **EXACT)
    (old,) = editor.edit([PARIS])
    before = prefix_of(editor)
    (new,) = editor.edit([ROME])
    editor.remove([new])
    after = prefix_of(editor)
    assert after[0] == old == before[0] and torch.equal(after[1], before[1])
    assert editor.superseded() == {} and editor.records[old].superseded_by is None and in_use(editor) == [old]
    (again,) = editor.edit([ROME])  # the restored entry is in use again: a restatement supersedes it
    assert editor.superseded() == {old: again}


@pytest.mark.parametrize("removed, superseded, used", [
    ([2], {0: 1}, 1),  # remove C: B is back, A stays superseded by B
    ([1], {0: 2}, 2),  # remove B: A is now superseded by C
    ([1, 2], {}, 0),  # remove B and C: A is back
    ([0], {1: 2}, 2),
])
def test_chains_of_restatements(tiny, removed, superseded, used):
    editor = chain(tiny)
    assert editor.superseded() == {0: 1, 1: 2} and in_use(editor) == [2]
    editor.remove(removed)
    assert editor.superseded() == superseded and in_use(editor) == [used] and prefix_of(editor)[0] == used
    assert set(editor.records) == {0, 1, 2} - set(removed)


def test_restating_an_earlier_answer_and_restatements_within_one_call(tiny):
    editor = chain(tiny)
    (back,) = editor.edit([PARIS])  # Paris again: its statement is only superseded, so no duplicate
    assert editor.superseded() == {0: 1, 1: 2, 2: back} and in_use(editor) == [back]
    batch = make(tiny_lm(), **EXACT)
    assert batch.edit([PARIS, PRESIDENT, ROME]) == [0, 1, 2]
    assert batch.last_superseded == {2: 0} and in_use(batch) == [1, 2]


@pytest.mark.parametrize("threshold, margin, subject, superseded", [
    (-1.0e9, 4.0, "FRANCE", {0: 1}),  # retrieved far above the sentinel, same subject (casefolded)
    (-1.0e9, 4.0, "Spain", {}),  # another subject
    (-1.0e9, 4.0, None, {}),  # no subject named
    (1.0e9, 4.0, "France", {}),  # the sentinel would not even use the stored entry
    (-1.0e9, None, "France", {}),  # the question-key rule alone
])
def test_a_reworded_restatement_supersedes_by_retrieval(tiny, threshold, margin, subject, superseded):
    editor = make(tiny, sentinel_mode="fixed", threshold=threshold, supersede_margin=margin)
    editor.edit([PARIS])
    editor.edit([EditRequest("Which city is the capital of France?", "Rome", subject=subject)])
    assert editor.superseded() == superseded and in_use(editor) == sorted({0, 1} - set(superseded))
    assert editor.last_superseded == {new: old for old, new in superseded.items()}


def test_supersede_false_keeps_both(tiny):
    editor = make(tiny, supersede=False, **EXACT)
    ids = editor.edit([PARIS]) + editor.edit([ROME])
    assert editor.superseded() == {} and editor.last_superseded == {} and in_use(editor) == ids


def test_save_load_and_state_round_trips_keep_superseded_entries(tmp_path):
    editor = chain(tiny_lm())
    editor.remove([1])  # A superseded by C
    used, vectors = prefix_of(editor)
    editor.save(tmp_path / "repo")
    loaded, again = make(tiny_lm(), **EXACT), make(tiny_lm(), **EXACT)
    loaded.load(tmp_path / "repo")
    again.load_state_dict(editor.state_dict())
    for other in (loaded, again):
        assert other.records == editor.records and other.superseded() == {0: 2} and in_use(other) == [2]
        assert used == 2 and torch.equal(prefix_of(other)[1], vectors)
        other.remove([2])  # the superseded entry's key and prompt came back with it
        assert in_use(other) == [0] and prefix_of(other)[0] == 0
    assert torch.equal(prefix_of(loaded)[1], prefix_of(again)[1])
    assert loaded.edit([ROME]) == [3] and loaded.superseded() == {0: 3}


@pytest.mark.parametrize("change, message", [
    ({"superseded_by": [None, 7]}, "superseded by 7, which is not a saved edit"),
    ({"superseded_by": [1, 0]}, "part of a cycle"),
    ({"superseded_by": [None]}, "lists of one length"),
    ({"questions": [1, None]}, "questions must be text"),
    ({"entries_version": 99}, "entries version 99"),
])
def test_bad_saved_supersessions_are_refused_and_change_nothing(tiny, change, message):
    source = make(tiny_lm(), **EXACT)
    source.edit([PARIS])
    source.edit([ROME])
    editor = make(tiny, **EXACT)
    editor.edit([PRESIDENT])
    before = editor.records
    with pytest.raises(RecipeError, match=message):
        editor.load_state_dict({**source.state_dict(), **change})
    assert editor.records == before and in_use(editor) == [0]


def test_saves_without_question_keys_load_and_never_supersede(tiny):
    source = make(tiny_lm(), **EXACT)
    source.edit([PARIS])
    state = source.state_dict()
    for name in ("entries_version", "questions", "superseded_by"):
        del state[name]
    editor = make(tiny, **EXACT)
    editor.load_state_dict(state)
    assert editor.records[0].question is None
    editor.edit([ROME])
    assert editor.superseded() == {} and in_use(editor) == [0, 1]


def _row(round_, prompt, reliability):
    timing = {"queries": 1, "score_s": 0.0, "generate_s": 0.0}
    return {"round": round_, "round_timing": timing, "edit_time_s": 0.1, "tf": {"reliability": reliability},
            "em": {"reliability": reliability}, "queries": [{"kind": "reliability", "prompt": prompt}]}


def test_the_users_view_scores_each_question_on_its_latest_answer_only():
    rows = [_row(0, QUESTION, 0.0), _row(0, PRESIDENT.prompt, 1.0), _row(0, "the capital of France is:", 1.0),
            _row(1, QUESTION, 0.0)]  # another round: its own edits, nothing restates it
    user = latest_answer_summary(4, rows)
    assert user["restated_cases_left_out"] == 1 and user["cases"] == 3
    assert user["tf"]["reliability"] == pytest.approx(2 / 3)
