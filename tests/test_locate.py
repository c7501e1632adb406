"""Causal tracing (ROME §2) on the tiny random Llama."""
import numpy as np
import pytest

from recipe import locate
from recipe.errors import RecipeError

PROMPT, SUBJECT = "The capital of France is", "France"


@pytest.fixture
def result(tiny):
    return locate.trace(tiny, PROMPT, SUBJECT, n_samples=3)


def test_trace_shapes_and_subject_span(tiny, result):
    T, L = len(tiny.prompt_ids(PROMPT)), tiny.model.config.num_hidden_layers
    assert result.tokens and len(result.tokens) == T
    assert "".join(result.tokens[result.subject_tokens[0]:result.subject_tokens[1] + 1]).strip() == SUBJECT
    for kind in locate.KINDS:
        assert result.scores[kind].shape == (L, T)
        assert np.isfinite(result.scores[kind]).all()
    assert result.indirect_effect("mlp").shape == (L, T)
    token = result.subject_tokens[1]  # restoring the best layer's MLP at the subject's last token helps most
    single = [locate.restored_probability(tiny, PROMPT, SUBJECT, None, [("mlp", layer, token)], n_samples=3)
              for layer in range(L)]
    assert single[result.best_layer("mlp")] == pytest.approx(max(single), abs=1e-7)  # a tie may pick either
    assert result.p_clean != pytest.approx(result.p_corrupt, abs=1e-9)  # the noise does corrupt


def test_restoring_every_state_of_a_token_gives_the_clean_probability(tiny, result):
    T, L = len(result.tokens), tiny.model.config.num_hidden_layers
    # the last token's residual state at the last layer is all the prediction reads
    assert result.scores["residual"][L - 1, T - 1] == pytest.approx(result.p_clean, rel=1e-5)
    # every token's residual state at one layer: the rest of the run is clean
    all_tokens = [("residual", 0, t) for t in range(T)]
    assert locate.restored_probability(tiny, PROMPT, SUBJECT, None, all_tokens, n_samples=3) == pytest.approx(
        result.p_clean, rel=1e-5)
    # every state at the last token (all layers, all kinds), after the subject
    last_token = [(k, layer, T - 1) for k in locate.KINDS for layer in range(L)]
    restored = locate.restored_probability(tiny, PROMPT, SUBJECT, None, last_token, n_samples=3)
    assert restored == pytest.approx(result.p_clean, rel=1e-5)
    # a token before the subject is untouched by the noise: restoring it changes nothing
    assert result.scores["residual"][1, 0] == pytest.approx(result.p_corrupt, rel=1e-5)


def test_trace_matches_a_single_restoration(tiny, result):
    layer, token = 1, result.subject_tokens[1]
    single = locate.restored_probability(tiny, PROMPT, SUBJECT, None, [("mlp", layer, token)], n_samples=3)
    assert result.scores["mlp"][layer, token] == pytest.approx(single, rel=1e-5)


def test_plot_writes_a_png(result, tmp_path):
    path = locate.plot_trace(result, tmp_path / "trace.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subject_must_be_in_the_prompt(tiny):
    with pytest.raises(RecipeError, match="Germany"):
        locate.trace(tiny, PROMPT, "Germany", n_samples=1)


def test_window_restores_neighbouring_layers_together(tiny):
    windowed = locate.trace(tiny, PROMPT, SUBJECT, n_samples=2, kinds=("mlp",), window=2)
    token = windowed.subject_tokens[1]
    both = locate.restored_probability(tiny, PROMPT, SUBJECT, None, [("mlp", 0, token), ("mlp", 1, token)], n_samples=2)
    assert windowed.scores["mlp"][1, token] == pytest.approx(both, rel=1e-5)  # layer 1 with w=2: layers 0 and 1


FACTS = [(PROMPT, SUBJECT, None), ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French")]


def test_layer_effects_is_the_mean_of_single_restorations(tiny):
    effects = locate.layer_effects(tiny, FACTS, n_samples=2, window=2)
    L = tiny.model.config.num_hidden_layers
    assert effects.p_clean.shape == effects.p_corrupt.shape == (len(FACTS),)
    for kind in locate.KINDS:
        assert effects.effects[kind].shape == (len(FACTS), L)
        assert effects.average(kind).shape == (L,)
        want = []
        for (prompt, subject, target) in FACTS:
            token = locate.subject_span(tiny, prompt, subject)[1]
            p_corrupt = locate.restored_probability(tiny, prompt, subject, target, [], n_samples=2)
            # residual: one layer; MLP/attention with window 2: layers (layer - 1, layer), as in trace
            layers = [[layer] if kind == "residual" else [max(0, layer - 1), layer] for layer in range(L)]
            want.append([locate.restored_probability(tiny, prompt, subject, target,
                                                     [(kind, j, token) for j in js], n_samples=2) - p_corrupt
                         for js in layers])
        assert effects.average(kind) == pytest.approx(np.mean(want, axis=0), rel=1e-4, abs=1e-7)
        assert np.mean(want, axis=0)[effects.best_layer(kind)] == pytest.approx(np.mean(want, axis=0).max(), abs=1e-7)


def test_layer_effects_equals_the_trace_column_of_the_subjects_last_token(tiny, result):
    effects = locate.layer_effects(tiny, FACTS[:1], n_samples=3)
    column = result.subject_tokens[1]
    for kind in locate.KINDS:
        assert effects.effects[kind][0] == pytest.approx(result.indirect_effect(kind)[:, column], rel=1e-4, abs=1e-7)
    assert effects.p_corrupt[0] == pytest.approx(result.p_corrupt, rel=1e-5)
