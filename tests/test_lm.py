"""EditedLM: generate == the base model's generate, batching, prefix plumbing, scoring, bad input."""
import pytest
import torch

from recipe.errors import RecipeError
from recipe.lm import Prefix

PROMPTS = ["The capital of France is", "Hey Jude was performed by", "The quick brown fox jumps over the lazy"]


def test_generate_equals_base_model_generate(tiny):
    tok = tiny.tokenizer
    for p in PROMPTS:
        ids = tok([p], return_tensors="pt")
        ref = tiny.model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = tok.decode(ref[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
        assert tiny.generate([p], max_new_tokens=6) == [expected]


def test_generate_batched_equals_one_at_a_time(tiny):
    one = [tiny.generate([p], max_new_tokens=6)[0] for p in PROMPTS]
    assert tiny.generate(PROMPTS, max_new_tokens=6) == one
    tiny.max_batch = 2  # also across batch boundaries
    assert tiny.generate(PROMPTS, max_new_tokens=6) == one


def test_embed_layout_left_pads_with_positions(tiny):
    embeds, mask, pos = tiny.embed(["Hey", "The capital of France is"], prefixes=None)
    n0 = len(tiny.prompt_ids("Hey"))
    T = embeds.shape[1]
    assert mask[0].tolist() == [0] * (T - n0) + [1] * n0
    assert pos[0, -n0:].tolist() == list(range(n0))
    assert pos[1].tolist() == list(range(T))


def test_prefix_is_a_true_prefix(tiny):
    """score() with a prefix equals a hand-built [prefix ; prompt ; target] forward pass."""
    torch.manual_seed(1)
    prefix = torch.randn(3, tiny.hidden_size) * 0.1
    prompt, target = "The capital of France is", "Paris"
    got = tiny.score([prompt], [target], prefixes=[Prefix(prefix)])[0]
    ids = tiny.prompt_ids(prompt) + tiny.target_ids(target)
    emb = torch.cat([prefix, tiny.model.get_input_embeddings()(torch.tensor(ids))])[None]
    logits = tiny.model(inputs_embeds=emb).logits[0]
    n_t = len(tiny.target_ids(target))
    logp = torch.log_softmax(logits[-n_t - 1:-1], -1)
    want = logp[torch.arange(n_t), torch.tensor(ids[-n_t:])]
    assert got.target_ids == tuple(ids[-n_t:])
    assert torch.allclose(torch.tensor(got.logprobs), want, atol=1e-5)
    assert got.predicted_ids == tuple(logits[-n_t - 1:-1].argmax(-1).tolist())


def test_prefix_provider_applies_per_prompt(tiny):
    torch.manual_seed(2)
    prefix = torch.randn(3, tiny.hidden_size)
    plain = tiny.generate(PROMPTS, max_new_tokens=5)
    tiny.prefix_provider = lambda prompts: [Prefix(prefix) if "France" in p else None for p in prompts]
    edited = tiny.generate(PROMPTS, max_new_tokens=5)
    assert edited[1:] == plain[1:]  # prompts without a prefix are untouched
    assert edited[0] == tiny.generate([PROMPTS[0]], max_new_tokens=5, prefixes=[Prefix(prefix)])[0]
    assert edited[0] != plain[0]


def test_prefix_token_ids_are_embedded_by_the_lm(tiny):
    """A prefix of vectors + token ids acts as the vectors followed by those tokens' input embeddings."""
    torch.manual_seed(3)
    vectors = torch.randn(2, tiny.hidden_size) * 0.1
    token_ids = tiny.tokenizer("The capital of Italy is Rome.\n", add_special_tokens=False).input_ids
    emb = tiny.model.get_input_embeddings()(torch.tensor(token_ids))
    assert torch.equal(tiny.prefix_embeddings(Prefix(vectors, token_ids)), torch.cat([vectors, emb]))
    assert torch.equal(tiny.prefix_embeddings(Prefix(token_ids=token_ids)), emb)
    assert tiny.prefix_embeddings(Prefix(vectors)) is vectors
    prompt, target = "The capital of France is", "Paris"
    mixed = tiny.score([prompt], [target], prefixes=[Prefix(vectors, token_ids)])[0]
    inline = tiny.score([prompt], [target], prefixes=[Prefix(torch.cat([vectors, emb]))])[0]
    plain = tiny.score([prompt], [target], prefixes=None)[0]
    assert mixed == inline and mixed.logprobs != plain.logprobs
    assert tiny.generate([prompt], 4, prefixes=[Prefix(vectors, token_ids)]) == tiny.generate(
        [prompt], 4, prefixes=[Prefix(torch.cat([vectors, emb]))])


def test_prefix_vectors_stay_differentiable(tiny):
    vectors = (torch.randn(2, tiny.hidden_size) * 0.1).requires_grad_(True)
    logp, _, _, mask = tiny.target_logprobs(["The capital of France is"], ["Paris"], [Prefix(vectors, (5, 6))])
    (grad,) = torch.autograd.grad((logp * mask).sum(), vectors)
    assert grad.abs().sum() > 0


def test_score_batched_equals_single(tiny):
    targets = ["Paris", "The Beatles", "dog"]
    batched = tiny.score(PROMPTS, targets)
    for p, t, b in zip(PROMPTS, targets, batched):
        s = tiny.score([p], [t])[0]
        assert s.target_ids == b.target_ids and s.predicted_ids == b.predicted_ids
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_target_tokenised_with_leading_space(tiny):
    assert tiny.target_ids("Paris") == tiny.tokenizer(" Paris", add_special_tokens=False).input_ids


@pytest.mark.parametrize("call", [
    lambda lm: lm.generate([""]),
    lambda lm: lm.generate(["   "]),
    lambda lm: lm.score(["The capital of"], [""]),
    lambda lm: lm.generate("a single string"),
    lambda lm: lm.generate(["word " * 400]),
    lambda lm: lm.generate(["Hi there"], max_new_tokens=500),
    lambda lm: lm.generate(["Hi"], prefixes=[Prefix(torch.zeros(3, 7))]),
    lambda lm: lm.generate(["Hi"], prefixes=[torch.zeros(3, 64)]),
    lambda lm: lm.generate(["Hi"], prefixes=[Prefix()]),
    lambda lm: lm.score(["a", "b"], ["x"]),
    lambda lm: lm.module("model.layers.99.mlp"),
], ids=["empty", "blank", "empty-target", "str", "too-long", "too-long-gen", "bad-prefix", "tensor-prefix",
                                  "empty-prefix", "count", "module"])
def test_bad_input_gives_recipe_error(tiny, call):
    with pytest.raises(RecipeError):
        call(tiny)


def test_empty_prompt_list_gives_empty_result(tiny):
    assert tiny.generate([]) == [] and tiny.score([], []) == []


def test_head_input_made_contiguous_once_with_equal_logits(tiny):
    """logits_to_keep slices a strided view of the hidden states; EditedLM makes it contiguous before the
    head (a plain matrix product instead of a batched one over a broadcast weight), values unchanged."""
    from recipe.lm import EditedLM

    head = tiny.model.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    EditedLM(tiny.model, tiny.tokenizer, tiny.spec)  # a second wrapper adds no second hook
    assert len(head._forward_pre_hooks) == 2
    ids = tiny.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        kept = tiny.model(**ids, logits_to_keep=2).logits
        full = tiny.model(**ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -2:], rtol=1e-5, atol=1e-5)
    hidden = torch.randn(3, 5, head.in_features)[:, -2:]  # strided, as HF slices it
    assert not hidden.is_contiguous()
    torch.testing.assert_close(head(hidden), hidden @ head.weight.T, rtol=1e-5, atol=1e-5)


def test_batches_group_similar_lengths_and_results_keep_the_given_order(tiny):
    prompts = ["A", "The quick brown fox jumps over the lazy dog and then", "Hi there", "The capital of France is",
               "One two three four five six seven eight nine ten eleven", "Yes"]
    targets = ["x", "it", "Paris", "a b c", "twelve", "no"]
    tiny.max_batch = 2
    batches = list(tiny._batches(prompts, targets))
    lengths = [len(tiny.prompt_ids(p)) + len(tiny.target_ids(t)) for p, t in zip(prompts, targets)]
    assert sorted(i for b in batches for i in b) == list(range(6)) and all(len(b) <= 2 for b in batches)
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)  # neighbours in length share a batch
    batched = tiny.score(prompts, targets)
    one = [tiny.generate([p], max_new_tokens=4)[0] for p in prompts]
    assert tiny.generate(prompts, max_new_tokens=4) == one
    for p, t, b in zip(prompts, targets, batched):
        s = tiny.score([p], [t])[0]
        assert s.target_ids == b.target_ids and s.predicted_ids == b.predicted_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    tiny.max_batch = 16  # one batch: the given order, as the model's own generate would see it
    assert list(tiny._batches(prompts, targets)) == [list(range(6))]
    with pytest.raises(RecipeError, match="targets"):
        tiny.score(prompts, targets[:-1])
