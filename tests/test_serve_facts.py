"""The facts layer behind `recipe serve` and `recipe edit`, in-process: a restated fact supersedes the
stored one and deleting the newer edit brings the older back (RECIPE decides and the records mirror it;
for weight editors the store decides), the same after reopening the store; snapshots are copied between
two operations and written while edits and queries go on."""
from __future__ import annotations

import threading

import pytest

from recipe.editors import load_editor
from recipe.serve import facts as facts_module
from recipe.serve.facts import Fact, Facts
from recipe.serve.store import EditStore

ARCH = {"encoder": "tiny-bert", "key_dim": 32, "head_hidden": 64, "head_blocks": 1, "prompt_width": 32,
        "prompt_blocks": 1}
RECIPE = {"checkpoint": None, "architecture": ARCH, "sentinel_mode": "fixed", "threshold": -1.0e9}
FT = {"steps": 2, "lr": 1.0e-3, "norm_constraint": 0.0}
CAPITAL = "The capital of France is"


def statuses(facts: Facts) -> dict[int, tuple[str, int | None]]:
    return {r.id: (r.status, r.superseded_by) for r in facts.records.values()}


def held(facts: Facts) -> list[str]:
    """What the editor answers from: RECIPE's statements in use, or the weight editor's active records."""
    if facts.editor_supersedes:
        retired = facts.editor.superseded()
        return sorted(s for i, s in facts.editor.statements.items() if i not in retired)
    return sorted(" ".join(f"{r.prompt} {r.target_new}".split()) for r in facts.records.values()
                  if r.id in facts.editor_ids)


@pytest.mark.parametrize("editor,config", [("recipe", RECIPE), ("ft", FT)])
def test_a_restated_fact_supersedes_and_deleting_the_newer_brings_the_older_back(tiny, tmp_path, editor, config):
    facts = Facts(load_editor(editor, tiny, dict(config)), EditStore(tmp_path))
    assert facts.editor_supersedes is (editor == "recipe")
    rome, = facts.add([Fact(CAPITAL, "Rome", "France")])
    president, = facts.add([Fact("The president of France is", "Marie Curie", "France")])  # same subject, other fact
    paris, = facts.add([Fact("the capital of  France is?", "Paris", "France")])  # the same prompt, restated
    lyon, = facts.add([Fact(CAPITAL + ".", "Lyon")])
    assert statuses(facts) == {rome.id: ("superseded", paris.id), president.id: ("active", None),
                               paris.id: ("superseded", lyon.id), lyon.id: ("active", None)}
    assert held(facts) == sorted([f"{CAPITAL}. Lyon", "The president of France is Marie Curie"])
    assert [op["supersedes"] for op in facts.store.read_journal()] == [{}, {}, {str(rome.id): paris.id},
                                                                       {str(paris.id): lyon.id}]

    facts.remove(lyon.id)  # the chain's newest goes: the one before is served again
    assert statuses(facts) == {rome.id: ("superseded", paris.id), president.id: ("active", None),
                               paris.id: ("active", None)}
    assert held(facts) == sorted(["the capital of France is? Paris", "The president of France is Marie Curie"])
    facts.close()

    again = Facts(load_editor(editor, tiny, dict(config)), EditStore(tmp_path))  # from the snapshot
    assert statuses(again) == {rome.id: ("superseded", paris.id), president.id: ("active", None),
                               paris.id: ("active", None)}
    again.remove(paris.id)
    assert statuses(again) == {rome.id: ("active", None), president.id: ("active", None)}
    assert held(again) == sorted([f"{CAPITAL} Rome", "The president of France is Marie Curie"])
    again.close()


def test_an_update_of_a_superseding_edit_keeps_the_chain(tiny, tmp_path):
    facts = Facts(load_editor("recipe", tiny, dict(RECIPE)), EditStore(tmp_path))
    rome, = facts.add([Fact(CAPITAL, "Rome")])
    paris, = facts.add([Fact(CAPITAL, "Paris")])
    facts.update(paris.id, Fact(CAPITAL, "Nice"))
    assert statuses(facts) == {rome.id: ("superseded", paris.id), paris.id: ("active", None)}
    assert held(facts) == [f"{CAPITAL} Nice"]
    facts.remove(paris.id)
    assert held(facts) == [f"{CAPITAL} Rome"] and statuses(facts) == {rome.id: ("active", None)}
    facts.close()


def test_a_snapshot_is_written_while_edits_and_queries_go_on(tiny, tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_writer = facts_module._editor_writer

    def slow_writer(editor):
        write = real_writer(editor)  # captured now, on the caller's thread

        def slow_write(directory):
            started.set()
            assert release.wait(60)
            return write(directory)
        return slow_write

    monkeypatch.setattr(facts_module, "_editor_writer", slow_writer)
    store = EditStore(tmp_path)
    facts = Facts(load_editor("recipe", tiny, dict(RECIPE)), store, snapshot_every=2)
    facts.add([Fact("Fact 1 is", "one")])
    facts.add([Fact("Fact 2 is", "two")])  # the second operation starts a snapshot (of 2 operations)
    assert started.wait(60)
    # the snapshot's writer is stuck on disk; edits, removals and queries go on meanwhile
    facts.add([Fact("Fact 3 is", "three")])
    facts.add([Fact("Fact 4 is", "four")])  # asks for another snapshot: one at a time, so not yet
    facts.remove(1)
    assert len(tiny.generate(["Fact 3 is"], max_new_tokens=2)) == 1
    assert store.snapshot_seq() == 0
    release.set()
    facts._writing.result(timeout=60)
    assert store.snapshot_seq() == 2  # the copy made between operations 2 and 3, whatever came after
    facts.close()  # a final snapshot of everything
    assert store.snapshot_seq() == 5

    again = Facts(load_editor("recipe", tiny, dict(RECIPE)), EditStore(tmp_path))
    assert held(again) == ["Fact 2 is two", "Fact 3 is three", "Fact 4 is four"]
    again.close()


def test_a_failed_snapshot_loses_nothing_and_the_next_operation_retries(tiny, tmp_path, monkeypatch):
    calls = []

    def failing_writer(editor):
        def write(directory):
            calls.append(directory)
            raise OSError("disk full")
        return write

    monkeypatch.setattr(facts_module, "_editor_writer", failing_writer)
    facts = Facts(load_editor("recipe", tiny, dict(RECIPE)), EditStore(tmp_path), snapshot_every=1)
    facts.add([Fact("Fact 1 is", "one")])
    with pytest.raises(OSError):
        facts._writing.result(timeout=60)
    facts.add([Fact("Fact 2 is", "two")])  # acknowledged: the journal holds it
    facts._writing.exception(timeout=60)
    assert len(calls) == 2 and facts.store.snapshot_seq() == 0
    monkeypatch.undo()
    facts.close()
    again = Facts(load_editor("recipe", tiny, dict(RECIPE)), EditStore(tmp_path))
    assert held(again) == ["Fact 1 is one", "Fact 2 is two"]
    again.close()
