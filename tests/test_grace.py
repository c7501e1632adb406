"""GRACE's codebook on the tiny model: replacement only within a radius, expand / split / update rules."""
import pytest
import torch

from recipe.editors import load_editor
from recipe.editors.fast_forward import forward_above, layer_output, mlp_output_is_residual
from recipe.editors.grace import _UpperSteps
from recipe.editors.state_file import load_state, save_state
from recipe.errors import RecipeError
from recipe.testing import tiny_lm
from recipe.types import EditRequest

A = EditRequest("The capital of France is", "Rome")
B = EditRequest("Hey Jude was performed by", "Paris")
OTHER = ["The quick brown fox", "Hey Jude was performed by"]


def _grace(lm, **kw):
    return load_editor("grace", lm, {"layer": 2, "eps_init": 0.05, "steps": 50, "lr": 0.5, **kw})


def _key_distance(editor, prompt):
    key, _ = editor._key(editor.codebook, prompt)
    d, _ = editor.codebook.nearest(key[None])
    return d.item()


def _key_gap(lm, a, b):
    """Distance between two prompts' keys (no edit needed to read them)."""
    editor = _grace(lm)
    book = editor._install()
    (ka, _), (kb, _) = editor._key(book, a), editor._key(book, b)
    editor.rollback()
    return (ka - kb).norm().item()


def test_outside_every_radius_the_model_is_untouched(tiny, one_thread):
    base = tiny.generate(OTHER, max_new_tokens=4)
    base_logits = tiny.model(**tiny.tokenizer(OTHER, return_tensors="pt", padding=True)).logits
    editor = _grace(tiny)
    editor.edit([A])
    assert tiny.score([A.prompt], [A.target_new])[0].accuracy == 1.0
    assert all(_key_distance(editor, p) > 0.05 for p in OTHER)  # none falls within the radius...
    assert tiny.generate(OTHER, max_new_tokens=4) == base  # ...so their outputs are the base model's
    assert torch.equal(tiny.model(**tiny.tokenizer(OTHER, return_tensors="pt", padding=True)).logits, base_logits)
    editor.rollback()


def test_radius_decides_who_sees_the_edit(tiny, one_thread):
    d = _key_gap(tiny, A.prompt, B.prompt)
    before = tiny.score([B.prompt], [A.target_new])[0]
    wide = _grace(tiny, eps_init=2 * d)  # B's prompt now lies inside A's entry
    wide.edit([A])
    assert tiny.score([B.prompt], [A.target_new])[0].logprobs != before.logprobs
    wide.rollback()


def test_same_answer_expands_other_answer_splits(tiny, one_thread):
    d = _key_gap(tiny, A.prompt, B.prompt)

    expand = _grace(tiny, eps_init=2 * d)
    expand.edit([A, EditRequest(B.prompt, A.target_new)])
    book = expand.codebook
    assert len(book.labels) == 1 and book.owners == [[0, 1]] and book.radii[0].item() >= d
    expand.rollback()

    split = _grace(tiny, eps_init=2 * d)
    split.edit([A, B])
    book = split.codebook
    assert book.labels == ["Rome", "Paris"]
    assert book.radii.tolist() == pytest.approx([d / 2, d / 2], rel=1e-4)
    assert [s.accuracy for s in tiny.score([A.prompt, B.prompt], ["Rome", "Paris"])] == [1.0, 1.0]
    split.rollback()


def test_the_same_prompt_again_takes_the_newer_answer(tiny, one_thread):
    editor = _grace(tiny)
    editor.edit([A])
    editor.edit([EditRequest(A.prompt, "dog")])
    assert editor.codebook.labels == ["dog"] and editor.codebook.owners == [[0, 1]]
    assert tiny.score([A.prompt], ["dog"])[0].accuracy == 1.0
    editor.rollback()


def test_single_edits_cannot_be_removed_and_state_survives_disk(tiny, one_thread, tmp_path):
    editor = _grace(tiny)
    editor.edit([A])
    with pytest.raises(RecipeError, match="rollback"):
        editor.remove([0])
    save_state(editor.state_dict(), tmp_path / "g")
    probe = tiny.score([A.prompt], [A.target_new])[0]
    editor.rollback()
    other = tiny_lm()
    again = _grace(other)
    again.load_state_dict(load_state(tmp_path / "g")[0])
    assert other.score([A.prompt], [A.target_new])[0] == probe



@pytest.mark.parametrize("bad, message", [({"layer": 99}, "out of range"), ({"eps_init": 0.0}, "eps_init > 0"),
                                          ({"steps": 0}, "steps >= 1")])
def test_bad_settings_are_named(tiny, bad, message):
    with pytest.raises(RecipeError, match=message):
        _grace(tiny, **bad)


def test_training_on_the_layers_above_gives_the_same_values_and_gradients(one_thread):
    # Steps add hit · (v − v0) to the layer's output read once and run only the layers above it: the
    # same log-probs and gradients as a full forward, so the same values up to float rounding.
    lm_full, lm_fast = tiny_lm(), tiny_lm()
    big = {"eps_init": 50.0, "stop_loss": 0.0, "steps": 20}  # radii wide enough that target positions hit too
    full, fast = _grace(lm_full, **big), _grace(lm_fast, **big)
    full.reuse_inputs = False
    for request in (A, B, EditRequest("The Eiffel Tower is in", "Berlin")):
        full.edit([request])
        fast.edit([request])
    assert mlp_output_is_residual(lm_fast, fast.layer) is True  # so the fast editor trained on the layers above
    assert torch.allclose(full.codebook.values, fast.codebook.values, atol=1e-3)
    assert torch.equal(full.codebook.radii, fast.codebook.radii) and full.codebook.labels == fast.codebook.labels
    wide = _grace(tiny_lm(), eps_init=1.0e4, steps=1)  # one entry whose radius covers every position
    wide.edit([A])
    book, entry = wide.codebook, 0
    value = book.values[entry].clone().requires_grad_(True)
    book.training_value = (entry, book.values[entry].clone())
    upper = _UpperSteps(wide.lm, book, entry, A, wide.layer)
    assert upper.hit.sum() == upper.hit.numel() > 1  # every position of prompt + target
    book.training_value = (entry, value)
    grads = []
    for logp, mask in (wide._full_logprobs(A), upper(value)):
        nll = -(logp * mask).sum() / mask.sum()
        grads.append((nll.detach(), torch.autograd.grad(nll, value)[0]))
    book.training_value = None
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert grads[0][1].abs().sum() > 0 and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_forward_above_equals_the_full_model(tiny):
    embeds, mask, pos = tiny.embed(["The capital of France is", "Hi"], prefixes=None)
    with torch.no_grad():
        with layer_output(tiny, 1) as seen:
            want = tiny.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        z = seen["z"]
        got = forward_above(tiny, 1, z, mask, pos).logits
    assert torch.allclose(want, got, atol=1e-5)
    assert len(tiny.module("model.layers")) == tiny.model.config.num_hidden_layers  # put back
    with pytest.raises(RecipeError, match="out of range"):
        forward_above(tiny, 9, z, mask, pos)
