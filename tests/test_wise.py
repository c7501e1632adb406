"""WISE: TIES merging, the router, knowledge shards, undo and state, on the tiny random Llama."""
import pytest
import torch

from recipe.editors import load_editor, wise
from recipe.errors import IncompatibleError, RecipeError
from recipe.testing import tiny_lm
from recipe.types import EditRequest

REQUEST = EditRequest("The capital of France is", "Rome", subject="France")
OTHER = EditRequest("The capital of Italy is", "Paris", subject="Italy")
UNRELATED = "The quick brown fox"
# Margins in the tiny model's units: its value-matrix inputs have norm ≈ 0.1, so Δ_act stays below 1.
FAST = {"layer": 2, "alpha": 0.05, "beta": 0.5, "gamma": 0.3, "steps": 50}
PATH = "model.layers.2.mlp.down_proj"


def _logits(lm, texts):
    ids = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return lm.model(**ids).logits


def test_ties_merge_trims_elects_and_averages():
    a = torch.tensor([3.0, -2.0, 0.1, 1.0])
    b = torch.tensor([1.0, 4.0, -0.2, -3.0])
    merged = wise.ties_merge([a, b], [1.0, 1.0], density=0.5)
    # trimmed: a -> [3, -2, 0, 0], b -> [0, 4, 0, -3]; elected signs [+, +, 0, -]; agreeing means:
    assert torch.equal(merged, torch.tensor([3.0, 4.0, 0.0, -3.0]))
    weighted = wise.ties_merge([a, b], [0.6, 0.4], density=1.0)
    # signs of 0.6a + 0.4b = [2.2, 0.4, -0.02, -0.6]: entry 0 both agree -> (1.8 + 0.4) / 1.0; the others b only
    assert torch.allclose(weighted, torch.tensor([2.2, 4.0, -0.2, -3.0]))


def test_edit_routes_its_prompt_to_the_side_memory_only(tiny):
    base = _logits(tiny, [UNRELATED])
    editor = load_editor("wise", tiny, FAST)
    proj = tiny.module(PATH)
    before = tiny.score([REQUEST.prompt], [REQUEST.target_new])[0]
    editor.edit([REQUEST])
    after = tiny.score([REQUEST.prompt], [REQUEST.target_new])[0]
    assert before.accuracy == 0.0 and after.accuracy == 1.0
    memory = editor.memory
    unrelated = memory.activation(editor._inputs(memory, UNRELATED), memory.shard).mean()
    assert unrelated < memory.threshold < editor.edit_acts[0]  # ε = 0.88 · Δ_act(edit), above the unrelated input's
    assert torch.equal(_logits(tiny, [UNRELATED]), base)  # the router kept the main memory, bit for bit
    assert tiny.generate([REQUEST.prompt], max_new_tokens=1) == [" Rome"]  # cached decoding routes the same
    editor.rollback()
    assert tiny.module(PATH) is proj and torch.equal(_logits(tiny, [UNRELATED]), base)


def test_routing_ignores_padding_and_answer_tokens(tiny):
    editor = load_editor("wise", tiny, FAST)
    editor.edit([REQUEST])
    prompts, targets = [REQUEST.prompt, UNRELATED + " jumps over the lazy dog and"], [REQUEST.target_new, " runs"]
    batched = tiny.target_logprobs(prompts, targets, prefixes=None)[0]  # (2, L), targets right-aligned
    for row, (p, t) in enumerate(zip(prompts, targets)):
        single = tiny.target_logprobs([p], [t], prefixes=None)[0][0]
        assert torch.allclose(batched[row, -len(single):], single, atol=1e-5)
    # The decision for the answer's first token depends on the prompt only: the same with another answer.
    first = [tiny.target_logprobs([REQUEST.prompt], [t], prefixes=None) for t in (" Rome", " Rome Paris London")]
    with torch.no_grad():
        embeds, mask, pos = tiny.embed([REQUEST.prompt], prefixes=None)
        alone = tiny.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[0, -1]
    assert first[0][1][0, 0] == first[1][1][0, 0] == alone.argmax()
    editor.rollback()


def test_shards_are_masked_and_merged_by_ties(tiny, monkeypatch):
    editor = load_editor("wise", tiny, {**FAST, "shard_size": 1, "shards_per_merge": 2, "mask_ratio": 0.3})
    W = tiny.module(PATH).weight.detach().clone()
    masks = []
    real = editor._grad_mask
    monkeypatch.setattr(editor, "_grad_mask", lambda w: masks.append(real(w)) or masks[-1])
    editor.edit([REQUEST])
    memory = editor.memory
    assert len(memory.pending) == 1 and memory.side is None and memory.shard_edits == 0
    changed = memory.pending[0] != W
    assert changed.any() and not (changed & (masks[0] == 0)).any()  # only the shard's masked entries moved
    merged = []
    real_merge = wise.ties_merge
    monkeypatch.setattr(wise, "ties_merge", lambda *a: merged.append(a) or real_merge(*a))
    editor.edit([OTHER])
    assert not torch.equal(masks[0], masks[1])  # a fresh mask per shard
    assert memory.pending == [] and memory.side is not None and len(merged) == 1 and len(merged[0][0]) == 2
    assert tiny.score([REQUEST.prompt], [REQUEST.target_new])[0].accuracy == 1.0  # still there after the merge
    editor.rollback()


def test_state_dict_carries_the_side_memories():
    lm_a, lm_b = tiny_lm(), tiny_lm()
    config = {**FAST, "shard_size": 1, "shards_per_merge": 2}
    editor_a = load_editor("wise", lm_a, config)
    editor_a.edit([REQUEST])
    editor_a.edit([OTHER])
    editor_a.edit([EditRequest("Hey Jude was performed by", "Madonna")])  # side memory + one pending shard
    editor_b = load_editor("wise", lm_b, config)
    editor_b.load_state_dict(editor_a.state_dict())
    texts = [REQUEST.prompt, OTHER.prompt, UNRELATED]
    assert torch.equal(_logits(lm_a, texts), _logits(lm_b, texts))
    assert editor_b.memory.threshold == editor_a.memory.threshold and len(editor_b.memory.pending) == 1
    state = editor_a.state_dict()
    state["memory"]["shard"] = torch.zeros(3, 3)
    with pytest.raises(IncompatibleError, match="shapes"):
        editor_b.load_state_dict(state)
    assert torch.equal(_logits(lm_a, texts), _logits(lm_b, texts))  # a refused state changes nothing


def test_a_failing_batch_changes_nothing(tiny, monkeypatch):
    editor = load_editor("wise", tiny, FAST)
    editor.edit([REQUEST])
    texts = [REQUEST.prompt, OTHER.prompt, UNRELATED]
    before, acts = _logits(tiny, texts), list(editor.edit_acts)
    real, calls = editor._train, []

    def fail_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("training failed")
        return real(*args)

    monkeypatch.setattr(editor, "_train", fail_second)
    with pytest.raises(RuntimeError, match="training failed"):
        editor.edit([OTHER, EditRequest("Hey Jude was performed by", "Madonna")])
    assert torch.equal(_logits(tiny, texts), before) and editor.edit_acts == acts
    editor.rollback()


@pytest.mark.parametrize("bad", [{"mask_ratio": 0.0}, {"density": 1.5}, {"shard_size": 0}])
def test_bad_settings_are_refused(tiny, bad):
    with pytest.raises(RecipeError, match=next(iter(bad))):
        load_editor("wise", tiny, {**FAST, **bad})
