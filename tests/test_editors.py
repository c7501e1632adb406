"""Contract tests over the editor registry (PEFT style), on the tiny random Llama."""
import pytest
import torch

from recipe.editors import EDITORS, ParamSnapshot, load_editor
from recipe.errors import IncompatibleError, RecipeError, UnknownNameError
from recipe.testing import tiny_lm
from recipe.types import EditRequest

REQUEST = EditRequest("The capital of France is", "Rome", subject="France")
PROBES = ["The capital of France is", "Hey Jude was performed by", "The quick brown fox"]
# Settings that let each editor move a tiny random model within a unit test's time.
FAST = {"ft": {"steps": 20, "lr": 5.0e-2, "norm_constraint": 0.0},
        "ftm": {"layer": 2, "steps": 20, "lr": 5.0e-2},
        "tpatcher": {"layer": 3, "steps": 30, "lr": 5.0e-2},
        "grace": {"layer": 2, "eps_init": 0.05, "steps": 50, "lr": 0.5},
        # MEND: identity g (no checkpoint), i.e. one gradient step of size init_step on layers 2-3.
        "mend": {"checkpoint": None, "layers": [2, 3], "architecture": {"rank": 8, "init_step": 3.0}},
        "recipe": {"architecture": {"encoder": "tiny-bert", "key_dim": 32, "head_hidden": 64, "prompt_width": 32},
                   "sentinel_mode": "fixed", "threshold": -1.0e9, "duplicates": "replace", "refine_steps": 20,
                   "refine_lr": 0.5},
        # ROME/MEMIT: random-token covariance (no data dir); "last" token because the rollback test edits a
        # request without a subject; no KL / decay / clamp so a random model's argmax can flip.
        "rome": {"covariance": "random-tokens", "n_cov_samples": 64, "fact_token": "last", "context_templates": 2,
                 "steps": 30, "kl_factor": 0.0, "weight_decay": 0.0, "clamp_norm_factor": 100.0},
        "memit": {"covariance": "random-tokens", "n_cov_samples": 64, "fact_token": "last", "context_templates": 2,
                  "layers": [1, 2], "mom2_update_weight": 100.0, "steps": 30, "kl_factor": 0.0, "weight_decay": 0.0,
                  "clamp_norm_factor": 100.0},
        # AlphaEdit: half the tiny model's key space (eigenvalues below 1e-4) is editable; α far below ‖k‖².
        "alphaedit": {"covariance": "random-tokens", "n_cov_samples": 64, "fact_token": "last", "context_templates": 2,
                      "layers": [1, 2], "nullspace_threshold": 1.0e-4, "l2": 1.0e-6, "steps": 30, "kl_factor": 0.0,
                      "weight_decay": 0.0, "clamp_norm_factor": 100.0},
        # WISE: routing margins in the tiny model's units (value-matrix inputs of norm ≈ 0.1).
        "wise": {"layer": 2, "alpha": 0.05, "beta": 0.5, "gamma": 0.3, "steps": 50}}
CHANGES_MODEL = sorted(set(EDITORS) - {"none"})


def _logits(lm):
    ids = lm.tokenizer(PROBES, return_tensors="pt", padding=True)
    return lm.model(**ids).logits


def _editor(name, lm):
    return load_editor(name, lm, FAST.get(name))  # a dict replaces the shipped YAML (checkpoint included)


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_rollback_restores_base_bit_exactly(name, tiny):
    base = _logits(tiny)
    editor = _editor(name, tiny)
    editor.edit([REQUEST])
    editor.edit([EditRequest("Hey Jude was performed by", "Madonna")])
    editor.rollback()
    assert torch.equal(_logits(tiny), base)


@pytest.mark.parametrize("name", CHANGES_MODEL)
def test_edit_moves_the_model_towards_the_target(name, tiny):
    before = tiny.score([REQUEST.prompt], [REQUEST.target_new])[0]
    _editor(name, tiny).edit([REQUEST])
    after = tiny.score([REQUEST.prompt], [REQUEST.target_new])[0]
    assert before.accuracy == 0.0 and after.accuracy == 1.0  # the answer flipped to the new target
    assert sum(after.logprobs) > sum(before.logprobs)


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_state_dict_resumes_on_a_fresh_model(name):
    lm_a, lm_b = tiny_lm(), tiny_lm()
    editor_a = _editor(name, lm_a)
    ids = editor_a.edit([REQUEST])
    state = editor_a.state_dict()
    editor_b = _editor(name, lm_b)
    editor_b.load_state_dict(state)
    assert torch.equal(_logits(lm_a), _logits(lm_b))
    assert editor_b.edit([REQUEST])[0] == ids[0] + 1  # ids continue
    editor_b.rollback()
    assert torch.equal(_logits(lm_b), _logits(tiny_lm()))


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_state_from_another_model_is_refused(name, tiny):
    editor = _editor(name, tiny)
    state = editor.state_dict()
    state["model"] = "smollm2-135m"
    with pytest.raises(IncompatibleError, match="smollm2-135m"):
        editor.load_state_dict(state)


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_bad_requests_are_refused(name, tiny):
    editor = _editor(name, tiny)
    with pytest.raises(RecipeError):
        editor.edit([])
    with pytest.raises(RecipeError):
        editor.edit([{"prompt": "a", "target_new": "b"}])
    with pytest.raises(ValueError):
        EditRequest("", "Rome")
    with pytest.raises(RecipeError, match="context"):
        editor.edit([EditRequest("word " * 400, "Rome")])


def test_weight_editors_cannot_remove_single_edits(tiny):
    editor = _editor("ft", tiny)
    ids = editor.edit([REQUEST])
    with pytest.raises(RecipeError, match="rollback"):
        editor.remove(ids)


def test_unknown_editor_and_bad_layer(tiny):
    with pytest.raises(UnknownNameError, match="available"):
        load_editor("nope", tiny)
    with pytest.raises(RecipeError, match="out of range"):
        load_editor("ft", tiny, layer=40)


def test_param_snapshot_clones_once():
    lm = tiny_lm()
    snap = ParamSnapshot(lm.model)
    name = "model.layers.0.mlp.down_proj.weight"
    original = lm.model.get_parameter(name).clone()
    with torch.no_grad():
        snap.touch(name).add_(1.0)
        snap.touch(name).add_(1.0)  # second touch must not re-clone the edited value
    snap.restore()
    assert torch.equal(lm.model.get_parameter(name), original)
