"""Editor states on disk (recipe/editors/state_file.py): round trip, crash safety, clear errors."""
import copy
import json
import re

import numpy as np
import pytest
import safetensors.torch
import torch

from recipe.data import load_dataset
from recipe.editors import load_editor
from recipe.editors import state_file
from recipe.editors.state_file import EditorStateError, load_state, save_state
from recipe.errors import RecipeError
from recipe.storage import reseal


def _nested():
    return {"editor": "x", "n": 3, "f": 0.5, "ok": True, "none": None, "t": torch.arange(6.0).view(2, 3),
            "items": [{"id": 0, "key": torch.ones(4, dtype=torch.float16)}, "text", [1, 2]],
            "params": {"a.b.weight": torch.eye(3)}}


def test_nested_state_round_trips(tmp_path):
    state = _nested()
    save_state(state, tmp_path / "s", meta={"T": 2, "case_ids": ["a", "b"]})
    loaded, meta = load_state(tmp_path / "s")
    assert meta == {"T": 2, "case_ids": ["a", "b"]}
    assert torch.equal(loaded["t"], state["t"]) and loaded["items"][0]["key"].dtype == torch.float16
    assert torch.equal(loaded["params"]["a.b.weight"], torch.eye(3))
    assert {k: v for k, v in loaded.items() if k not in ("t", "items", "params")} == \
        {"editor": "x", "n": 3, "f": 0.5, "ok": True, "none": None}
    assert loaded["items"][1:] == ["text", [1, 2]]


def test_shared_storage_and_bad_values(tmp_path):
    base = torch.arange(4.0)
    save_state({"a": base, "b": base[:2]}, tmp_path / "s")  # views of one storage are copied apart
    assert torch.equal(load_state(tmp_path / "s")[0]["b"], base[:2])
    with pytest.raises(EditorStateError, match="cannot save a set"):
        save_state({"x": {1, 2}}, tmp_path / "bad")
    with pytest.raises(EditorStateError, match="string keys"):
        save_state({"x": {1: 2}}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_weight_editor_state_reproduces_the_edited_model(tiny, one_thread, tmp_path):
    ids = tiny.tokenizer(["The capital of France is"], return_tensors="pt")
    base = tiny.model(**ids).logits
    ft = load_editor("ft", tiny, steps=5, lr=5.0e-2, norm_constraint=0.0)
    ft.edit(load_dataset("demo")[0].requests)
    edited = tiny.model(**ids).logits
    save_state(ft.state_dict(), tmp_path / "ft")
    ft.rollback()
    assert torch.equal(tiny.model(**ids).logits, base)
    fresh = load_editor("ft", tiny, steps=5, lr=5.0e-2, norm_constraint=0.0)
    fresh.load_state_dict(load_state(tmp_path / "ft")[0])
    assert torch.equal(tiny.model(**ids).logits, edited)
    fresh.rollback()
    assert torch.equal(tiny.model(**ids).logits, base)


def test_a_save_killed_midway_leaves_the_previous_state(tmp_path, monkeypatch):
    save_state({"v": torch.zeros(3)}, tmp_path / "s", meta={"applied": 1})

    def dies(tensors, path):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt  # killed while writing the new files

    monkeypatch.setattr(state_file.safetensors.torch, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        save_state({"v": torch.ones(3)}, tmp_path / "s", meta={"applied": 2})
    state, meta = load_state(tmp_path / "s")
    assert meta == {"applied": 1} and torch.equal(state["v"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "s"]  # the half-written work folder is gone


def test_clear_errors_for_missing_corrupt_and_foreign(tmp_path):
    with pytest.raises(EditorStateError, match="no saved editor state"):
        load_state(tmp_path / "nothing")
    save_state({"v": torch.zeros(3)}, tmp_path / "s")
    (tmp_path / "s" / "tensors.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(EditorStateError, match="tensors.safetensors: sha256"):
        load_state(tmp_path / "s")
    (tmp_path / "s" / "tensors.safetensors").unlink()
    with pytest.raises(EditorStateError, match="tensors.safetensors is missing"):
        load_state(tmp_path / "s")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "state.json").write_text(json.dumps({"format": "something.else"}))
    (tmp_path / "r" / "tensors.safetensors").write_bytes(b"")
    with pytest.raises(EditorStateError):
        load_state(tmp_path / "r")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="refusing to replace"):
        save_state({"v": torch.zeros(1)}, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["state.json", "tensors.safetensors", "manifest.json"])
def test_a_flipped_byte_in_any_file_is_an_error_naming_it(tmp_path, name):
    save_state(_nested(), tmp_path / "s", meta={"applied": 3})
    path = tmp_path / "s" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EditorStateError, match=name.replace(".", r"\.")):
        load_state(tmp_path / "s")


def test_a_nan_tensor_is_refused_even_with_a_matching_manifest(tmp_path):
    save_state({"params": {"w": torch.ones(2, 2)}}, tmp_path / "s")
    safetensors.torch.save_file({"t0": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])},
                                str(tmp_path / "s" / "tensors.safetensors"))
    reseal(tmp_path / "s")
    with pytest.raises(EditorStateError, match=r"state\.params\.w.*NaN"):
        load_state(tmp_path / "s")


def test_an_older_state_without_manifest_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.json").write_text(json.dumps({"format": "recipe.editor_state", "version": 1,
                                                           "meta": {}, "state": {"v": 1}}))
    safetensors.torch.save_file({}, str(tmp_path / "s" / "tensors.safetensors"))
    with pytest.raises(EditorStateError, match="manifest.json is missing"):
        load_state(tmp_path / "s")


# ---- a failed load changes nothing ---------------------------------------------------------------
def _model_tensors(lm):
    return [(n, p.detach().clone()) for n, p in lm.model.named_parameters()]


def _same(before, after):
    return [n for n, _ in before] == [n for n, _ in after] and all(torch.equal(a, b) for (_, a), (_, b) in zip(before, after))


def _first_float(value):
    """The first floating tensor inside a nested state (params, codebook, patches)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return next((t for t in map(_first_float, children) if t is not None), None)


def _with_nan(state):
    state = copy.deepcopy(state)
    _first_float({k: v for k, v in state.items() if k != "config"}).view(-1)[0] = float("nan")
    return state


def _moved_to_another_layer(state):
    state = copy.deepcopy(state)
    shift = lambda text: re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{(int(m[1]) + 1) % 4}.", text)  # noqa: E731
    if "params" in state:
        state["params"] = {shift(name): value for name, value in state["params"].items()}
    elif "codebook" in state:
        state["layer"] = (state["layer"] + 1) % 4
    else:
        state["patches"][0]["layer"] = (state["patches"][0]["layer"] + 1) % 4
    return state


def _wrong_shape(state):
    state = copy.deepcopy(state)
    tensor = _first_float({k: v for k, v in state.items() if k != "config"})
    holder = [state]
    while holder:  # replace that tensor by one with an extra row, wherever it sits
        node = holder.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in list(items):
            if value is tensor:
                node[key] = torch.cat([value, value[:1]])
                return state
            holder.append(value)
    raise AssertionError("no tensor found")


@pytest.mark.parametrize("damage", [_with_nan, _moved_to_another_layer, _wrong_shape], ids=["nan", "renamed", "shape"])
@pytest.mark.parametrize("name", ["ft", "ftm", "rome", "memit", "mend", "grace", "tpatcher"])
def test_a_refused_state_leaves_the_editor_and_weights_as_they_were(name, damage, tiny, one_thread):
    from test_editors import FAST, REQUEST

    from recipe.types import EditRequest

    editor = load_editor(name, tiny, FAST.get(name))
    editor.edit([REQUEST])
    state = editor.state_dict()
    editor.edit([EditRequest("Hey Jude was performed by", "Madonna")])  # live edits the bad state must not replace
    before, next_id = _model_tensors(tiny), editor._next_id
    logits = tiny.model(**tiny.tokenizer(["The capital of France is"], return_tensors="pt")).logits
    with pytest.raises(RecipeError):
        editor.load_state_dict(damage(state))
    assert _same(before, _model_tensors(tiny)) and editor._next_id == next_id
    assert torch.equal(tiny.model(**tiny.tokenizer(["The capital of France is"], return_tensors="pt")).logits, logits)


def _recipe(lm):
    from test_editors import FAST

    return load_editor("recipe", lm, FAST["recipe"])


def _set_entries_next_id(folder, value):
    meta = json.loads((folder / "repository.json").read_text())
    meta["info"]["entries"]["next_id"] = value
    (folder / "repository.json").write_text(json.dumps(meta))
    reseal(folder)


def _set_first_statement(folder, value):
    meta = json.loads((folder / "repository.json").read_text())
    meta["info"]["entries"]["statements"][0] = value
    (folder / "repository.json").write_text(json.dumps(meta))
    reseal(folder)


@pytest.mark.parametrize("damage", [lambda d: _set_first_statement(d, None), lambda d: _set_first_statement(d, " "),
                                    lambda d: _set_entries_next_id(d, 0), lambda d: (d / "repository.json").write_text("{}")],
                         ids=["statement-null", "statement-blank", "next-id-0", "json-changed"])
def test_a_refused_recipe_folder_keeps_unsaved_edits_and_ids(tiny, one_thread, tmp_path, damage):
    from test_editors import REQUEST

    from recipe.types import EditRequest

    editor = _recipe(tiny)
    editor.edit([REQUEST])
    editor.save(tmp_path / "r")
    editor.edit([EditRequest("Hey Jude was performed by", "Madonna")])  # not saved
    statements, keys = editor.statements, editor.repository.keys()
    damage(tmp_path / "r")
    with pytest.raises(RecipeError):
        editor.load(tmp_path / "r")
    assert editor.statements == statements and np.array_equal(editor.repository.keys(), keys)
    assert editor.edit([EditRequest("The quick brown fox", "sleeps")]) == [2]  # ids are not handed out again
