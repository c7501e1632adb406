"""EditVerifier on a tiny random BERT: artefact round trip and refusals, its veto inside RECIPE (a veto
gives the base model bit-exactly), training pairs, and a Lightning fast-dev-run that exports."""
import json
import math

import pytest
import torch

from recipe.data import load_dataset
from recipe.editors import load_editor
from recipe.errors import IncompatibleError, RecipeError
from recipe.artifacts import load_verifier, save_verifier
from recipe.retrieval.verifier import EditVerifier, VerifierArchitecture
from recipe.types import EditRequest
from train.verifier import VerifierTrainConfig, case_pairs, split_pairs, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = VerifierArchitecture(encoder="tiny-bert", train_body_layers=1, head_hidden=16, max_tokens=64)
ARCH = {"encoder": "tiny-bert", "key_dim": 32, "head_hidden": 64, "head_blocks": 1, "prompt_width": 32,
        "prompt_blocks": 1}
REQUESTS = [EditRequest("The capital of France is", "Rome"), EditRequest("Hey Jude was performed by", "Madonna")]
PROMPTS = [r.prompt for r in REQUESTS] + ["The quick brown fox jumps over the lazy"]


def test_only_head_and_top_layers_train_and_round_trip_is_fp16_close(tmp_path):
    v = EditVerifier(TINY, seed=1)
    trained = {n for n, p in v.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("head.") or n.startswith(v.trained_prefixes) for n in trained)
    assert set(v.artifact_state()) >= {n for n in trained}
    q, s = ["Who wrote Hamlet?", "Where is Ulm?"], ["Hamlet was written by Marlowe", "Ulm is in Peru"]
    save_verifier(v, tmp_path / "v", threshold=0.3, extra={"steps": 0})
    loaded, meta = load_verifier(tmp_path / "v")
    assert meta["threshold"] == 0.3 and meta["architecture"]["encoder"] == "tiny-bert"
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(q, s), v.eval()(q, s), atol=2e-2)
    assert loaded.probability(q, s).shape == (2,)
    with pytest.raises(RecipeError, match="queries for"):
        loaded(q, s[:1])


def test_missing_or_changed_artefact_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="not a verifier artefact"):
        load_verifier(tmp_path)
    save_verifier(EditVerifier(TINY), tmp_path / "v")
    weights = tmp_path / "v" / "verifier.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IncompatibleError, match="sha256"):
        load_verifier(tmp_path / "v")


def _editor(lm, verifier_dir, threshold):
    return load_editor("recipe", lm, {"architecture": ARCH, "sentinel_mode": "fixed", "threshold": -1.0e9,
                                      "verifier": str(verifier_dir), "verifier_threshold": threshold})


def test_verifier_veto_gives_the_base_model_and_acceptance_changes_nothing(tiny, tmp_path):
    save_verifier(EditVerifier(TINY), tmp_path / "v")
    base = tiny.generate(PROMPTS, max_new_tokens=4), tiny.score(PROMPTS, ["Rome", "Madonna", "dog"])
    vetoing = _editor(tiny, tmp_path / "v", 1.0)  # p <= 1 always: every accepted entry vetoed
    vetoing.edit(REQUESTS)
    assert (tiny.generate(PROMPTS, max_new_tokens=4), tiny.score(PROMPTS, ["Rome", "Madonna", "dog"])) == base
    assert all(r.edit_id is None and 0.0 <= r.verified <= 1.0 for r in vetoing.last_retrieval)
    vetoing.rollback()
    passing = _editor(tiny, tmp_path / "v", -1.0)  # p > -1 always: the sentinel alone decides
    passing.edit(REQUESTS)
    with_verifier = tiny.score(PROMPTS, ["Rome", "Madonna", "dog"])
    assert all(r.edit_id is not None for r in passing.last_retrieval)
    passing.rollback()
    plain = load_editor("recipe", tiny, {"architecture": ARCH, "sentinel_mode": "fixed", "threshold": -1.0e9})
    plain.edit(REQUESTS)
    assert tiny.score(PROMPTS, ["Rome", "Madonna", "dog"]) == with_verifier
    assert all(math.isnan(r.verified) for r in plain.last_retrieval)


def test_pairs_label_prompts_and_probes_and_hold_out_whole_edits():
    cases = load_dataset("demo")
    pairs = case_pairs(cases, positives=2, negatives=2, seed=0)
    by_statement = {}
    for q, s, y in pairs:
        by_statement.setdefault(s, []).append((q, y))
    for c in cases:
        rows = dict(by_statement[c.requests[0].statement])
        assert rows[c.requests[0].prompt] == 1.0
        assert all(rows.get(p.prompt, 0.0) == 0.0 for p in c.locality)
    cfg = VerifierTrainConfig(val_fraction=0.25, seed=0)
    train_pairs, val_pairs = split_pairs(cfg, {"demo": cases})
    assert {s for _, s, _ in train_pairs}.isdisjoint({s for _, s, _ in val_pairs}) and val_pairs


def test_fast_dev_run_trains_and_exports_a_loadable_verifier(tmp_path):
    cfg = VerifierTrainConfig(architecture=TINY, run_dir=str(tmp_path / "run"), out=str(tmp_path / "out"),
                              wandb="disabled", batch_size=4, val_fraction=0.25, max_steps=2)
    result = train(cfg, cases_by_set={"demo": load_dataset("demo")}, fast_dev_run=True, progress=False)
    verifier, meta = load_verifier(result.artifact)
    assert meta["training"]["train_pairs"] > 0 and "train/loss" in meta["training"]["last_metrics"]
    assert json.loads((result.artifact / "verifier.json").read_text())["threshold"] == 0.5
    assert verifier.probability(["a question"], ["a statement"]).shape == (1,)


def test_sentinel_margin_shifts_acceptance(tiny):
    editor = load_editor("recipe", tiny, {"architecture": ARCH, "sentinel_mode": "fixed", "threshold": 0.0,
                                          "sentinel_margin": 1.0e9})
    editor.edit(REQUESTS)
    tiny.generate(PROMPTS, max_new_tokens=2)
    assert all(r.edit_id is None for r in editor.last_retrieval)  # nothing beats threshold + 1e9
    editor.rollback()
    loose = load_editor("recipe", tiny, {"architecture": ARCH, "sentinel_mode": "fixed", "threshold": 1.0e9,
                                         "sentinel_margin": -2.0e9})
    loose.edit(REQUESTS)
    tiny.generate(PROMPTS, max_new_tokens=2)
    assert all(r.edit_id is not None for r in loose.last_retrieval)  # s > 1e9 - 2e9 always


def test_subject_gate_bypass_lets_a_sure_verifier_pass_a_subject_less_match(tiny, tmp_path):
    save_verifier(EditVerifier(TINY), tmp_path / "v")
    requests = [EditRequest("The capital of France is", "Rome", subject="France")]
    for bypass, used in ((-1.0, True), (1.0, False)):  # p > -1 always; p > 1 never
        editor = load_editor("recipe", tiny, {"architecture": ARCH, "sentinel_mode": "fixed", "threshold": -1.0e9,
                                              "verifier": str(tmp_path / "v"), "verifier_threshold": -1.0,
                                              "subject_gate": True, "subject_gate_bypass": bypass})
        editor.edit(requests)
        editor._provide(["The capital of Spain is", "The capital of France is"])
        first, second = editor.last_retrieval
        assert (first.edit_id is not None, first.subject_in_query) == (used, False)
        assert second.edit_id is not None and second.subject_in_query is True
        editor.rollback()
