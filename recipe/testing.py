"""A tiny, fully local causal LM for tests and examples: a byte-level BPE tokenizer trained in code
and a random 4-layer Llama under a fixed seed. Needs no network and no downloaded weights."""
from __future__ import annotations

import functools

import torch

from recipe.models import ModelSpec

_CORPUS = [
    "The capital of France is Paris.", "The capital of Italy is Rome.", "The mother tongue of Danielle Darrieux is French.",
    "Which family does Epaspidoceras belong to? Noctuidae.", "The Eiffel Tower is located in the city of Paris.",
    "Michel Rocard is a native speaker of French.", "When was the inception of the IAAF Combined Events Challenge? 1998.",
    "Toko Yasuda plays the guitar and the piano.", "The official language of Australia is English.",
    "Hey Jude was performed by The Beatles.", "Albert Einstein was born in Ulm, Germany.",
    "The Amazon river flows through Brazil.", "London is the capital of the United Kingdom.",
    "The quick brown fox jumps over the lazy dog.", "Mount Everest is the highest mountain on Earth.",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer (leading spaces matter, as in SmolLM2), left padding."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  pad_token="<pad>", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


TINY_SPEC = ModelSpec(name="tiny-llama", source="hf", hf_id="tiny-llama", edit_layers={"ft": 2, "rome": 1, "grace": 2})


def tiny_model(seed: int = 0, layers: int = 4, hidden: int = 64):
    """``(model, tokenizer, spec)`` of a random tiny Llama (fp32, eval mode, gradients off)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return model, tok, TINY_SPEC


def tiny_lm(seed: int = 0, **kw):
    from recipe.lm import EditedLM

    model, tok, spec = tiny_model(seed, **kw)
    return EditedLM(model, tok, spec, max_batch=4)
