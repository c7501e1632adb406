"""The ``tiny`` fixture: built once per test run, yet every test gets a model of its own that equals a
fresh ``tiny_lm()`` bit for bit, with the torch RNG where ``tiny_lm()`` leaves it."""
import torch

from recipe.testing import tiny_lm


def test_tiny_is_a_fresh_tiny_lm_with_the_rng_where_building_leaves_it(tiny):
    drawn_after_fixture = torch.rand(3)
    fresh = tiny_lm()
    assert torch.equal(torch.rand(3), drawn_after_fixture)
    ours, theirs = tiny.model.state_dict(), fresh.model.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert tiny.generate(["The capital of France is"], max_new_tokens=3) == fresh.generate(
        ["The capital of France is"], max_new_tokens=3)


def test_weight_changes_stay_in_the_test(tiny, _tiny_built):
    shared, _ = _tiny_built
    assert tiny is not shared and tiny.model is not shared.model
    weight = tiny.model.get_input_embeddings().weight
    with torch.no_grad():
        weight.add_(1.0)
    assert not torch.equal(weight, shared.model.get_input_embeddings().weight)
    assert torch.equal(shared.model.get_input_embeddings().weight, tiny_lm().model.get_input_embeddings().weight)
