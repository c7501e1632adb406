"""T-Patcher (one neuron per target token, or the paper's single neuron) on the tiny random Llama; plus FT-M's fixed-bound config."""
import pytest
import torch

from recipe.editors import load_editor
from recipe.editors.fast_forward import mlp_output_is_residual
from recipe.editors.tpatcher import NEUTRAL_SENTENCES, Patch, PatchedMLP
from recipe.errors import ConfigError, RecipeError
from recipe.testing import tiny_lm
from recipe.types import EditRequest

FAST = {"layer": 3, "steps": 30, "lr": 5.0e-2}
FRANCE = EditRequest("The capital of France is", "Rome")
JUDE = EditRequest("Hey Jude was performed by", "Madonna")
PROBES = ["The capital of France is", "Hey Jude was performed by", "The quick brown fox"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(lm):
    ids = lm.tokenizer(PROBES, return_tensors="pt", padding=True)
    return lm.model(**ids).logits


def _mlp_inputs(lm, module, texts):
    """The inputs (tokens, d_in) ``module`` sees on every real token of ``texts``."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            embeds, mask, pos = lm.embed(texts, prefixes=None)
            lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
    finally:
        handle.remove()
    return seen[0][mask.bool()]


def test_patch_writes_the_target_and_stays_off_on_memory():
    lm = tiny_lm()
    editor = load_editor("tpatcher", lm, FAST)
    assert lm.score([FRANCE.prompt], [FRANCE.target_new])[0].accuracy == 0.0
    (edit_id,) = editor.edit([FRANCE])
    assert lm.score([FRANCE.prompt], [FRANCE.target_new])[0].accuracy == 1.0
    wrapper = lm.model.model.layers[3].mlp
    assert isinstance(wrapper, PatchedMLP) and list(wrapper.patches) == [edit_id]
    patch = wrapper.patches[edit_id]
    memory = _mlp_inputs(lm, wrapper, list(NEUTRAL_SENTENCES))  # (M, d_in)
    assert patch.key.shape[0] == len(lm.target_ids(FRANCE.target_new))  # one neuron per target token
    assert (memory @ patch.key.T + patch.bias).max() <= 0  # the neurons are off on every memory token
    edit_input = _mlp_inputs(lm, wrapper, [FRANCE.prompt])[-1]  # the prompt's last token
    assert (edit_input @ patch.key.T + patch.bias)[0] > 0  # ... and the first fires on the edit


def test_earlier_edit_prompts_join_the_memory():
    lm = tiny_lm()
    editor = load_editor("tpatcher", lm, FAST)
    first, second = editor.edit([FRANCE, JUDE])  # one neuron per request
    wrapper = lm.model.model.layers[3].mlp
    assert list(wrapper.patches) == [first, second] and editor.memory_prompts == [FRANCE.prompt, JUDE.prompt]
    earlier = _mlp_inputs(lm, wrapper, [FRANCE.prompt])
    assert (earlier @ wrapper.patches[second].key.T + wrapper.patches[second].bias).max() <= 0


def test_remove_undoes_single_patches():
    lm = tiny_lm()
    base = _logits(lm)
    editor = load_editor("tpatcher", lm, FAST)
    (first,) = editor.edit([FRANCE])
    after_first = _logits(lm)
    (second,) = editor.edit([JUDE])
    assert not torch.equal(_logits(lm), after_first)
    editor.remove([second])
    assert torch.equal(_logits(lm), after_first)  # exactly the outputs before that edit
    (third,) = editor.edit([JUDE])
    editor.remove([first])  # the other patch stays
    assert list(editor.wrappers[3].patches) == [third]
    assert lm.score([FRANCE.prompt], [FRANCE.target_new])[0].accuracy == 0.0
    with pytest.raises(RecipeError, match="edit id"):
        editor.remove([first])
    editor.remove([third])  # no patch left: the original MLP is back
    assert not isinstance(lm.model.model.layers[3].mlp, PatchedMLP)
    assert torch.equal(_logits(lm), base)


def test_rollback_puts_the_original_module_back():
    lm = tiny_lm()
    original = lm.model.model.layers[3].mlp
    base = _logits(lm)
    editor = load_editor("tpatcher", lm, FAST)
    editor.edit([FRANCE, JUDE])
    assert lm.model.model.layers[3].mlp is not original
    editor.rollback()
    assert lm.model.model.layers[3].mlp is original
    assert torch.equal(_logits(lm), base)
    assert editor.state_dict()["patches"] == [] and editor.edit([FRANCE]) == [0]


def test_state_dict_round_trip_on_a_fresh_model():
    lm_a, lm_b = tiny_lm(), tiny_lm()
    editor_a = load_editor("tpatcher", lm_a, FAST)
    ids = editor_a.edit([FRANCE, JUDE])
    state = editor_a.state_dict()
    assert [(p["id"], p["layer"]) for p in state["patches"]] == [(ids[0], 3), (ids[1], 3)]
    editor_b = load_editor("tpatcher", lm_b, FAST)
    editor_b.edit([EditRequest("The quick brown fox", "cat")])  # replaced by the loaded state
    editor_b.load_state_dict(state)
    assert torch.equal(_logits(lm_a), _logits(lm_b))
    assert editor_b.memory_prompts == editor_a.memory_prompts
    editor_a.remove([ids[0]])
    editor_b.remove([ids[0]])  # single patches stay removable after a reload
    assert torch.equal(_logits(lm_a), _logits(lm_b))


def test_one_neuron_per_target_token_writes_a_multi_token_target():
    request = EditRequest("The capital of France is", "Rome Madonna Italy")
    accuracy = {}
    for neurons in ("one", "per_target_token"):
        lm = tiny_lm()
        editor = load_editor("tpatcher", lm, {**FAST, "steps": 60, "neurons": neurons})
        (edit_id,) = editor.edit([request])
        n_t = len(lm.target_ids(request.target_new))
        assert n_t > 1 and editor.wrappers[3].patches[edit_id].key.shape == (1 if neurons == "one" else n_t,
                                                                               lm.hidden_size)
        accuracy[neurons] = lm.score([request.prompt], [request.target_new])[0].accuracy
    # the paper's single neuron adds one vector at every position: it cannot spell out 9 different tokens
    assert accuracy["per_target_token"] == 1.0 > accuracy["one"]


def test_single_neuron_state_from_before_loads():
    lm_a, lm_b = tiny_lm(), tiny_lm()
    editor_a = load_editor("tpatcher", lm_a, {**FAST, "neurons": "one"})
    editor_a.edit([FRANCE])
    state = editor_a.state_dict()
    for p in state["patches"]:  # the format before patches had several neurons: (d_in,), (), (d_out,)
        p["key"], p["bias"], p["value"] = p["key"][0], p["bias"][0], p["value"][0]
    editor_b = load_editor("tpatcher", lm_b, FAST)
    editor_b.load_state_dict(state)
    assert torch.equal(_logits(lm_a), _logits(lm_b))


def test_default_layer_is_the_last():
    lm = tiny_lm()  # the tiny spec has no edit_layers.tpatcher
    assert load_editor("tpatcher", lm, {"steps": 1}).layer == lm.model.config.num_hidden_layers - 1


def test_ftm_has_no_norm_bound():
    lm = tiny_lm()
    editor = load_editor("ftm", lm, {"layer": 2})
    assert editor.config.norm_constraint == 0.0
    with pytest.raises(ConfigError, match="norm_constraint"):
        load_editor("ftm", lm, {"layer": 2, "norm_constraint": 0.1})
    with pytest.raises(RecipeError, match="edit_layers.ftm"):
        load_editor("ftm", lm, {})  # the tiny spec names no FT-M layer


@pytest.mark.parametrize("layer", [3, 1])  # the last layer (prompt columns frozen) and a middle one (full forwards)
def test_reused_inputs_train_the_same_patches(layer):
    # Memory texts' MLP inputs kept between edits and, at the last layer, the prompt's columns before
    # its last token run once: the same patches as full forwards at every step, up to float rounding.
    cfg = {**FAST, "layer": layer, "stop_loss": 0.0}  # every patch takes all its steps: no rounding-borne stop
    lm_full, lm_fast = tiny_lm(), tiny_lm()
    full, fast = load_editor("tpatcher", lm_full, cfg), load_editor("tpatcher", lm_fast, cfg)
    full.reuse_inputs = False
    assert lm_full.model.config.num_hidden_layers == 4
    assert fast._edit_batch(FRANCE).split == (len(lm_fast.prompt_ids(FRANCE.prompt)) - 1 if layer == 3 else 0)
    for request in (FRANCE, JUDE, EditRequest("The Eiffel Tower is in", "Berlin")):
        full.edit([request])
        fast.edit([request])
    a, b = lm_full.model.model.layers[layer].mlp, lm_fast.model.model.layers[layer].mlp
    for i in a.patches:
        for name in ("key", "bias", "value"):
            # Adam turns rounding-level gradient differences into lr-sized steps on near-zero components
            assert torch.allclose(getattr(a.patches[i], name), getattr(b.patches[i], name), atol=1e-2)
    assert set(fast._memory_rows) == {*NEUTRAL_SENTENCES, FRANCE.prompt, JUDE.prompt}  # rows of the texts asked for


def test_kept_memory_inputs_follow_weight_changes():
    lm = tiny_lm()
    editor = load_editor("tpatcher", lm, FAST)
    editor.edit([FRANCE])
    wrapper = lm.model.model.layers[3].mlp
    kept = editor._memory_inputs(wrapper, JUDE.prompt)
    assert torch.allclose(kept, _mlp_inputs(lm, wrapper, [*NEUTRAL_SENTENCES, FRANCE.prompt]), atol=1e-6)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight.mul_(1.5)  # a layer below changes: the inputs do too
    fresh = _mlp_inputs(lm, wrapper, [*NEUTRAL_SENTENCES, FRANCE.prompt])
    assert not torch.allclose(kept, fresh)
    assert torch.allclose(editor._memory_inputs(wrapper, JUDE.prompt), fresh, atol=1e-6)


def test_frozen_prompt_columns_give_the_same_loss_and_gradients():
    lm = tiny_lm()
    editor = load_editor("tpatcher", lm, FAST)
    editor.edit([FRANCE])  # a frozen patch already installed
    wrapper = lm.model.model.layers[3].mlp
    d = lm.hidden_size
    g = torch.Generator().manual_seed(0)
    patch = Patch(*(torch.randn(*s, generator=g).requires_grad_(True)
                          for s in ((2, d), (2,), (2, d))))
    wrapper.training_patch = patch
    results = []
    for reuse in (False, True):
        editor.reuse_inputs = reuse
        batch = editor._edit_batch(JUDE)
        assert (batch.split > 0) == reuse
        nll, x_e = editor._edit_forward(wrapper, batch)
        grads = torch.autograd.grad(nll + x_e.sum() * 0, [patch.key, patch.bias, patch.value])
        results.append((nll.detach(), x_e.detach(), grads))
    wrapper.training_patch = None
    batch = editor._edit_batch(JUDE)  # z and x read once; the step is head(norm(z + patch(x)))
    assert batch.z is not None and mlp_output_is_residual(lm, 3) is True
    nll, x_e = editor._step(wrapper, batch, results[0][1], patch)
    results.append((nll.detach(), x_e.detach(), torch.autograd.grad(nll, [patch.key, patch.bias, patch.value])))
    (nll_a, x_a, g_a), *others = results
    assert g_a[2].abs().sum() > 0
    for nll_b, x_b, g_b in others:
        assert torch.allclose(nll_a, nll_b, atol=1e-6) and torch.allclose(x_a, x_b, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_a, g_b))
    editor.layer = 2  # not the last layer: no shortcut
    assert editor._edit_batch(JUDE).z is None
