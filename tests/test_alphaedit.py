"""AlphaEdit: the null-space projector, eq. 14, the projector cache, norm anchoring, on the tiny random Llama."""
from dataclasses import dataclass

import pytest
import torch

from recipe.editors import alphaedit, load_editor, rank_one
from recipe.errors import RecipeError
from recipe.testing import tiny_lm
from recipe.types import EditRequest

REQUEST = EditRequest("The capital of France is", "Rome", subject="France")
SECOND = EditRequest("Hey Jude was performed by", "Madonna", subject="Hey Jude")
# The tiny model's random-token key covariance has eigenvalues 3e-5 .. 1e-3: below 1e-4 lies about half
# of the key space; keys have ‖k‖² ≈ 0.015, so α must be far below that for an edit to land.
STRONG = {"covariance": "random-tokens", "n_cov_samples": 64, "context_templates": 2, "layers": [1, 2],
          "nullspace_threshold": 1.0e-4, "l2": 1.0e-6, "steps": 30, "kl_factor": 0.0, "weight_decay": 0.0,
          "clamp_norm_factor": 100.0}
DOWN = "model.layers.{}.mlp.down_proj.weight"


def _weights(lm, layers=(1, 2)):
    return {layer: lm.model.get_parameter(DOWN.format(layer)).detach().clone() for layer in layers}


def _preserved(editor, layer):
    """Eigenvectors of K0 K0ᵀ at or above the threshold: the directions whose outputs must not move."""
    eigenvalues, eigenvectors = torch.linalg.eigh(editor.covariance(layer).double())
    return eigenvectors[:, eigenvalues >= editor.config.nullspace_threshold].float()  # (d_in, r)


def test_projector_spans_the_small_eigenvalues():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64)).Q
    cov = U @ torch.diag(torch.tensor([1e-4] * 5 + [1.0] * 7, dtype=torch.float64)) @ U.T
    P = alphaedit.null_space_projector(cov, 1e-2)
    assert torch.allclose(P, U[:, :5] @ U[:, :5].T, atol=1e-10)
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.linalg.matrix_rank(P) == 5


def test_update_is_eq_14_and_leaves_preserved_keys_alone():
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64)).Q
    cov = U @ torch.diag(torch.tensor([1e-4] * 8 + [1.0] * 8, dtype=torch.float64)) @ U.T
    P = alphaedit.null_space_projector(cov, 1e-2)
    K1, R, Kp = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((16, 3), (10, 3), (16, 4)))
    delta = alphaedit.alphaedit_layer_update(P, K1, R, Kp @ Kp.T, l2=0.5)
    expected = R @ K1.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K1 @ K1.T @ P + 0.5 * torch.eye(16, dtype=torch.float64))
    assert torch.allclose(delta, expected, atol=1e-10)  # AlphaEdit eq. 14
    K0 = U[:, 8:] @ torch.randn(8, 50, generator=g, dtype=torch.float64)  # preserved keys: outside the null space
    assert delta.norm() > 0.1 and (delta @ K0).abs().max() < 1e-12


def test_edit_changes_the_answer_and_not_the_preserved_outputs(tiny):
    editor = load_editor("alphaedit", tiny, STRONG)
    before, base = tiny.score([REQUEST.prompt], [REQUEST.target_new])[0], _weights(tiny)
    editor.edit([REQUEST])
    after = tiny.score([REQUEST.prompt], [REQUEST.target_new])[0]
    assert before.accuracy == 0.0 and after.accuracy == 1.0
    for layer, W0 in base.items():
        W1, U = tiny.model.get_parameter(DOWN.format(layer)), _preserved(editor, layer)
        assert 0 < U.shape[1] < W0.shape[1]
        assert (W1 - W0).norm() > 1.0  # the layer moved ...
        assert torch.allclose(W1 @ U, W0 @ U, atol=1e-5)  # ... but not on the preserved keys
    keys = editor._keys([REQUEST], 2).double()
    assert torch.allclose(editor.prior_keys[2], keys @ keys.T)  # K_p K_pᵀ for the next batch
    editor.rollback()
    assert all(torch.equal(tiny.model.get_parameter(DOWN.format(layer)), W0) for layer, W0 in base.items())
    assert editor.prior_keys == {}


def test_memit_moves_the_outputs_alphaedit_keeps(tiny):
    # The same edit by MEMIT changes W on the preserved keys: the assertion above can fail.
    editor = load_editor("memit", tiny, {**{k: v for k, v in STRONG.items() if k not in ("nullspace_threshold", "l2")},
                                         "mom2_update_weight": 100.0})
    base = _weights(tiny)
    editor.edit([REQUEST])
    U = _preserved(load_editor("alphaedit", tiny, STRONG), 1)
    assert not torch.allclose(tiny.model.get_parameter(DOWN.format(1)) @ U, base[1] @ U, atol=1e-3)
    editor.rollback()


def test_state_dict_carries_the_earlier_keys():
    lm_a, lm_b = tiny_lm(), tiny_lm()
    editor_a = load_editor("alphaedit", lm_a, STRONG)
    editor_a.edit([REQUEST])
    editor_b = load_editor("alphaedit", lm_b, STRONG)
    editor_b.load_state_dict(editor_a.state_dict())
    assert sorted(editor_b.prior_keys) == [1, 2]
    assert all(torch.equal(editor_b.prior_keys[i], editor_a.prior_keys[i]) for i in (1, 2))
    state = editor_a.state_dict()
    state["prior_keys"] = {"3": state["prior_keys"]["1"]}
    with pytest.raises(RecipeError, match="layers \\[3\\]"):
        editor_b.load_state_dict(state)


@dataclass(frozen=True)
class _CachedRandomTokens(rank_one.RandomTokenSource):
    tag: str = "random-cached"
    cacheable: bool = True


def test_projector_is_cached_beside_the_covariance(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path))
    computed = []
    real = alphaedit.null_space_projector
    monkeypatch.setattr(alphaedit, "null_space_projector", lambda cov, t: computed.append(t) or real(cov, t))
    config = {**STRONG, "covariance": "wikitext"}  # replaced by the injected source
    first = alphaedit.AlphaEditEditor(tiny, alphaedit.AlphaEditConfig(**config), _CachedRandomTokens())
    P = first.projectors(1)
    assert len(computed) == 1 and first.projectors.path(1).exists()
    assert first.projectors.path(1).parent == first.covariance.path(1).parent
    second = alphaedit.AlphaEditEditor(tiny, alphaedit.AlphaEditConfig(**config), _CachedRandomTokens())
    assert torch.equal(second.projectors(1), P) and len(computed) == 1  # read, not computed again
    other = alphaedit.AlphaEditEditor(tiny, alphaedit.AlphaEditConfig(**{**config, "nullspace_threshold": 2e-4}),
                                      _CachedRandomTokens())
    assert other.projectors(1).trace() > P.trace() and len(computed) == 2  # another threshold: another file
    first.projectors.path(1).write_bytes(b"not a safetensors file")
    third = alphaedit.AlphaEditEditor(tiny, alphaedit.AlphaEditConfig(**config), _CachedRandomTokens())
    assert torch.equal(third.projectors(1), P) and len(computed) == 3  # unreadable cache: recomputed


def test_norm_anchor_rescales_the_value_to_the_unedited_norm(tiny):
    editor = load_editor("alphaedit", tiny, {**STRONG, "norm_anchor": True})
    weight = editor.snapshot.touch(DOWN.format(2))
    W0 = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(3.0)  # as if earlier edits had grown the layer
    key = rank_one.compute_key(tiny, REQUEST, 2, editor.prefixes, "subject_last")
    delta = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(0))
    value = rank_one.Value(delta=delta, value=weight @ key + delta, nll=0.0)
    anchored = weight @ key + editor._anchored(REQUEST, value)  # v*'
    assert torch.allclose(anchored.norm(), (W0 @ key).norm(), rtol=1e-5)
    assert torch.allclose(anchored / anchored.norm(), value.value / value.value.norm(), atol=1e-5)
    editor.rollback()


def test_a_failing_batch_changes_nothing(tiny, monkeypatch):
    editor = load_editor("alphaedit", tiny, STRONG)
    editor.edit([REQUEST])
    weights, prior = _weights(tiny), {k: v.clone() for k, v in editor.prior_keys.items()}
    real, calls = alphaedit.alphaedit_layer_update, []

    def fail_at_the_second_layer(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("solver failed")
        return real(*args)

    monkeypatch.setattr(alphaedit, "alphaedit_layer_update", fail_at_the_second_layer)
    with pytest.raises(RuntimeError, match="solver failed"):
        editor.edit([SECOND])
    assert all(torch.equal(tiny.model.get_parameter(DOWN.format(i)), W) for i, W in weights.items())
    assert all(torch.equal(editor.prior_keys[i], prior[i]) for i in prior)
    editor.rollback()


@pytest.mark.parametrize("bad", [{"nullspace_threshold": 0.0}, {"l2": -1.0}])
def test_bad_settings_are_refused(tiny, bad):
    with pytest.raises(RecipeError, match=next(iter(bad))):
        load_editor("alphaedit", tiny, {**STRONG, **bad})
