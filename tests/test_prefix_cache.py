"""Prefix keys/values for generate(): same tokens as the inline layout, reused, dropped when weights change."""
import warnings

import pytest
import torch

from recipe.editors.fast_forward import FrozenPrefix
from recipe.lm import Prefix
from recipe.prefix_cache import PrefixKVCache, model_cache, prefix_key

PROMPTS = ["The capital of France is", "Hey Jude was performed by", "The quick brown fox jumps over the lazy"]


def _inline(lm, prompts, prefixes, n):
    """The old layout: [pad ; prefix ; prompt] as inputs_embeds, no cache."""
    embeds, mask, _ = lm.embed(prompts, prefixes, extra_tokens=n)
    out = lm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.batch_decode(out, skip_special_tokens=True)


def _prefixes(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Prefix(torch.randn(4, lm.hidden_size, generator=g)), None, Prefix(torch.randn(7, lm.hidden_size, generator=g))]


def test_cached_prefix_generates_what_the_inline_layout_generates(tiny):
    prefixes = _prefixes(tiny)
    want = _inline(tiny, PROMPTS, prefixes, 6)
    assert want[0] != tiny.generate(PROMPTS[:1], max_new_tokens=6)[0]  # the prefix matters
    assert tiny.generate(PROMPTS, max_new_tokens=6, prefixes=prefixes) == want
    assert tiny.generate(PROMPTS, max_new_tokens=6, prefixes=prefixes) == want  # now from the cache
    assert tiny.prefix_cache.hits == 2 and tiny.prefix_cache.misses == 2


def test_prefix_keys_values_match_the_full_forward(tiny):
    """The cached keys equal the keys the prefix positions get inside [prefix ; prompt]."""
    prefix = _prefixes(tiny)[0]
    (kv,) = tiny.prefix_cache.get([prefix.vectors])
    embeds, mask, pos = tiny.embed(PROMPTS[:1], [prefix])
    full = model_cache(tiny.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True))
    for (k, v), layer in zip(kv, full.layers):
        assert torch.allclose(k, layer.keys[0, :, :len(prefix)], atol=1e-5)
        assert torch.allclose(v, layer.values[0, :, :len(prefix)], atol=1e-5)


def test_equal_content_is_one_entry():
    a = torch.randn(3, 8)
    assert prefix_key(a) == prefix_key(a.clone()) != prefix_key(a.double())
    assert prefix_key(a) != prefix_key(a[:2])


def test_cache_key_covers_the_prefix_tokens(tiny):
    """Two prefixes with the same vectors but other statement tokens are two entries; equal ones are one."""
    vectors = torch.randn(3, tiny.hidden_size, generator=torch.Generator().manual_seed(5))
    a, b = Prefix(vectors, (10, 11, 12)), Prefix(vectors, (10, 11, 13))
    first = tiny.generate(PROMPTS[:2], max_new_tokens=4, prefixes=[a, b])
    assert tiny.prefix_cache.misses == 2 and tiny.prefix_cache.hits == 0
    assert tiny.generate(PROMPTS[:2], max_new_tokens=4, prefixes=[Prefix(vectors.clone(), (10, 11, 12)), b]) == first
    assert tiny.prefix_cache.misses == 2 and tiny.prefix_cache.hits == 2
    assert first == _inline(tiny, PROMPTS[:2], [a, b], 4)


def test_prefixed_generate_and_score_raise_no_cache_deprecation(tiny):
    """Key/value caches go to transformers as Cache objects under the keyword it takes today."""
    prefixes = _prefixes(tiny)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        texts = tiny.generate(PROMPTS, max_new_tokens=4, prefixes=prefixes)
        scores = tiny.score(PROMPTS, ["Paris", "x", "dog"], prefixes=prefixes)
        frozen = FrozenPrefix(tiny, PROMPTS, ["Paris", "x", "dog"], split=3, above=1)  # the editors' cached columns
        frozen.logits(add=torch.zeros_like(frozen.z))
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecations == []
    assert texts == _inline(tiny, PROMPTS, prefixes, 4)
    inline = tiny.target_logprobs(PROMPTS, ["Paris", "x", "dog"], prefixes)
    for row, s in enumerate(scores):
        keep = inline[3][row].bool()
        torch.testing.assert_close(torch.tensor(s.logprobs), inline[0][row, keep], atol=1e-5, rtol=1e-5)


def test_weight_change_drops_the_cache(tiny):
    prefixes = _prefixes(tiny)
    tiny.generate(PROMPTS, max_new_tokens=4, prefixes=prefixes)
    assert len(tiny.prefix_cache) == 2
    with torch.no_grad():
        tiny.model.get_input_embeddings().weight.mul_(1.5)  # an in-place write, as ROME/MEMIT/FT do
        tiny.model.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
    want = _inline(tiny, PROMPTS, prefixes, 4)
    assert tiny.generate(PROMPTS, max_new_tokens=4, prefixes=prefixes) == want
    assert tiny.prefix_cache.misses == 4  # recomputed after the write, not served stale


def test_cache_is_bounded(tiny):
    one = tiny.prefix_cache.get([torch.randn(5, tiny.hidden_size)])[0]
    size = sum(t.numel() * t.element_size() for pair in one for t in pair)
    cache = PrefixKVCache(tiny.model, max_mb=2.5 * size / 2**20)  # room for two
    for seed in range(4):
        cache.get([torch.randn(5, tiny.hidden_size, generator=torch.Generator().manual_seed(seed))])
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    off = PrefixKVCache(tiny.model, max_mb=0)
    assert len(off.get([torch.randn(5, tiny.hidden_size)])[0]) == tiny.model.config.num_hidden_layers
    assert len(off) == 0
    with pytest.raises(ValueError):
        PrefixKVCache(tiny.model, max_mb=-1)
