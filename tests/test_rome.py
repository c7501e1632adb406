"""ROME / MEMIT math and the shared key / value / covariance code, on the tiny random Llama."""
import pytest
import torch

from recipe.editors import load_editor, memit, rank_one, rome
from recipe.errors import RecipeError
from recipe.editors.fast_forward import FrozenPrefix, mlp_output_is_residual
from recipe.types import EditRequest

REQUEST = EditRequest("The capital of France is", "Rome", subject="France")
STRONG = {"covariance": "random-tokens", "n_cov_samples": 64, "context_templates": 2, "steps": 30,
          "kl_factor": 0.0, "weight_decay": 0.0, "clamp_norm_factor": 100.0}  # moves a random tiny model


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d)


def test_rank_one_update_writes_the_pair_exactly():
    g = torch.Generator().manual_seed(0)
    W, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((12, 20), (20,), (12,)))
    delta = rome.rank_one_update(W, _spd(20, 1), k, v)
    assert torch.allclose((W + delta) @ k, v, atol=1e-10)  # W' k* = v*  (ROME eq. 2)
    assert torch.linalg.matrix_rank(delta) == 1


def test_rome_edit_inserts_key_value_and_rolls_back(tiny, monkeypatch):
    seen = []
    real = rank_one.compute_value
    monkeypatch.setattr(rank_one, "compute_value", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    editor = load_editor("rome", tiny, STRONG)
    weight = tiny.model.get_parameter(editor.param_name)
    base = weight.clone()
    before = tiny.score([REQUEST.prompt], [REQUEST.target_new])[0]
    editor.edit([REQUEST])
    key = rank_one.compute_key(tiny, REQUEST, editor.layer, editor.prefixes)  # W's input: unchanged by the edit
    assert torch.allclose(weight.double() @ key.double(), seen[0].value.double(), rtol=1e-4, atol=1e-5)
    after = tiny.score([REQUEST.prompt], [REQUEST.target_new])[0]
    assert after.accuracy == 1.0 and sum(after.logprobs) > sum(before.logprobs)  # subject_last flips it too
    editor.rollback()
    assert torch.equal(weight, base)


@pytest.mark.parametrize("fact_token", ["subject_last", "last"])
def test_value_with_the_frozen_prefix_equals_full_forwards(tiny, fact_token):
    # Columns before the fact token are run once and reused as keys/values: same δ and NLL as
    # running the whole batch at every step, on rows of different lengths (left padding).
    request = EditRequest("In a short note, the capital of France is", "Rome", subject="France")
    opts = rank_one.ValueOptions(steps=6, lr=0.5, kl_factor=0.1, weight_decay=0.5, clamp_norm_factor=100.0, stop_loss=0.0)
    key = rank_one.compute_key(tiny, request, 1, rank_one.CONTEXT_PREFIXES[:3], fact_token)
    full, reused = (rank_one.compute_value(tiny, request, 1, key, rank_one.CONTEXT_PREFIXES[:3], opts, fact_token,
                                           reuse_prefix=r) for r in (False, True))
    assert full.delta.norm() > 0
    assert torch.allclose(full.delta, reused.delta, rtol=1e-4, atol=1e-5)
    assert abs(full.nll - reused.nll) < 1e-4
    assert mlp_output_is_residual(tiny, 1) is True  # so the steps ran only the layers above layer 1
    texts = [p + request.prompt for p in rank_one.CONTEXT_PREFIXES[:3]]
    batch = FrozenPrefix(tiny, texts, [request.target_new] * 3, split=4)
    assert batch.split == 4 and batch.embeds.shape[0] == 3
    with torch.no_grad():
        assert torch.allclose(batch.logprobs()[0], tiny.target_logprobs(texts, [request.target_new] * 3, prefixes=None)[0],
                              atol=1e-5)
        above = FrozenPrefix(tiny, texts, [request.target_new] * 3, split=4, above=2)
        assert above.z.shape[:2] == (3, above.embeds.shape[1] - 4)
        assert torch.allclose(above.logits(add=torch.zeros_like(above.z)), batch.logits(), atol=1e-5)
        with pytest.raises(RecipeError, match="above"):
            batch.logits(add=torch.zeros(1))


def test_memit_update_solves_its_normal_equations():
    g = torch.Generator().manual_seed(0)
    C, K, R = _spd(16, 2), torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(10, 3, generator=g,
                                                                                            dtype=torch.float64)
    dW = memit.memit_layer_update(C, K, R, mom2_weight=7.0)
    assert torch.allclose(dW @ (7.0 * C + K @ K.T), R @ K.T, atol=1e-10)  # MEMIT eq. 14
    woodbury = memit.memit_layer_update(C, K, R, 7.0, cov_cholesky=torch.linalg.cholesky(7.0 * C))
    assert torch.allclose(woodbury @ (7.0 * C + K @ K.T), R @ K.T, atol=1e-10)  # the same, per-layer factor


def test_memit_writes_a_single_key_in_proportion_to_its_whitened_norm():
    # One key: ΔW k = R · s/(λ + s) with s = kᵀC⁻¹k. λ must be small next to s for an edit to land
    # (SmolLM2's subject keys have s ≈ 4,400-7,800: GPT-J's λ = 15000 wrote about a third of R).
    g = torch.Generator().manual_seed(0)
    C, k, r = _spd(16, 3), torch.randn(16, 1, generator=g, dtype=torch.float64), torch.randn(10, 1, generator=g,
                                                                                           dtype=torch.float64)
    s = (k.T @ torch.linalg.solve(C, k)).item()
    for lam in (0.1 * s, s, 10 * s):
        dW = memit.memit_layer_update(C, k, r, mom2_weight=lam)
        assert torch.allclose(dW @ k, r * s / (lam + s), atol=1e-10)


def test_memit_edit_updates_every_layer_by_its_normal_equations(tiny, monkeypatch):
    calls = []
    real = memit.memit_layer_update
    monkeypatch.setattr(memit, "memit_layer_update",
                        lambda C, K, R, lam, chol: calls.append((C, K, R, lam, real(C, K, R, lam, chol))) or calls[-1][-1])
    editor = load_editor("memit", tiny, {**STRONG, "layers": [1, 2], "mom2_update_weight": 100.0})
    requests = [REQUEST, EditRequest("Hey Jude was performed by", "Madonna", subject="Hey Jude")]
    editor.edit(requests)
    assert len(calls) == 2 and sorted(editor.snapshot.names) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    assert all(editor._cholesky[i] is not None for i in (1, 2))  # the per-layer factor was used
    for C, K, R, lam, dW in calls:
        assert K.shape == (tiny.model.config.intermediate_size, 2) and R.shape == (tiny.hidden_size, 2)
        assert torch.allclose(dW @ (lam * C.double() + K.double() @ K.double().T), R.double() @ K.double().T,
                              rtol=1e-6, atol=1e-8)
    scores = tiny.score([r.prompt for r in requests], [r.target_new for r in requests])
    assert scores[0].accuracy == 1.0


@pytest.mark.parametrize("name", ["rome", "memit"])
def test_requests_need_their_subject_in_the_prompt(name, tiny):
    editor = load_editor(name, tiny, {**STRONG, "layers": [1, 2]} if name == "memit" else STRONG)
    with pytest.raises(RecipeError, match="subject"):
        editor.edit([EditRequest("The capital of France is", "Rome")])
    with pytest.raises(RecipeError, match="'Germany'.*'The capital of France is'"):
        editor.edit([EditRequest("The capital of France is", "Rome", subject="Germany")])


def test_fact_index_is_the_subjects_last_token(tiny):
    text = "The following is a fact. The capital of France is"
    i = rank_one.fact_index(tiny, text, "France", search_from=len("The following is a fact. "))
    ids = tiny.prompt_ids(text)
    assert tiny.tokenizer.decode(ids[:i + 1]).endswith("France")
    assert not tiny.tokenizer.decode(ids[:i]).endswith("France")
    assert rank_one.fact_index(tiny, text, None, "last") == len(ids) - 1


def test_key_is_the_mean_over_context_prefixes(tiny):
    prefixes = rank_one.CONTEXT_PREFIXES[:3]
    keys = [rank_one.compute_key(tiny, REQUEST, 1, (p,)) for p in prefixes]
    assert torch.allclose(rank_one.compute_key(tiny, REQUEST, 1, prefixes), torch.stack(keys).mean(0), atol=1e-6)


class CountingSource:
    tag, cacheable = "counting", True

    def __init__(self):
        self.calls = 0

    def samples(self, lm, n_samples):
        self.calls += 1
        return rank_one.RandomTokenSource(length=12).samples(lm, n_samples)


def test_covariance_is_cached_on_disk_and_reused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path))
    source = CountingSource()
    first = rank_one.KeyCovariance(tiny, source, n_samples=32)(1)
    assert first.shape == (128, 128) and first.dtype == torch.float64 and torch.allclose(first, first.T)
    assert first.equal(rank_one.KeyCovariance(tiny, source, n_samples=32)(1))  # from the file
    assert source.calls == 1
    assert (tmp_path / "covariance" / "tiny-llama" / "1-32-counting.safetensors").exists()
    rank_one.KeyCovariance(tiny, source, n_samples=16)(1)  # another sample count is another file
    assert source.calls == 2


def test_covariance_without_cache_or_wikitext_is_a_clear_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path))
    covariance = rank_one.KeyCovariance(tiny, rank_one.WikiTextSource(data_dir=tmp_path / "none"), n_samples=8)
    assert covariance.path(1) == tmp_path / "covariance" / "tiny-llama" / "1-8.safetensors"
    with pytest.raises(RecipeError, match="no cached key covariance"):
        covariance(1)


def test_injected_covariance_source_is_used(tiny):
    source = CountingSource()
    source.cacheable = False
    editor = rome.ROMEEditor(tiny, rome.ROMEConfig(**STRONG), covariance_source=source)
    editor.edit([REQUEST])
    editor.edit([REQUEST])
    assert source.calls == 1  # kept on the object between edits
