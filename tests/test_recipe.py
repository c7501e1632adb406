"""RECIPE on the tiny Llama with a tiny random BERT body: exactness when the sentinel rejects, the
repository's lifecycle, persistence, incompatibility checks, and retrieval on the question only."""
import json
import math

import pytest
import torch

from recipe.editors import load_editor
from recipe.artifacts import save_recipe_artifact as save_artifact
from recipe.editors.recipe import RecipeEditor
from recipe.storage import reseal
from recipe.errors import IncompatibleError, RecipeError
from recipe.lm import Prefix
from recipe.retrieval.encoders import KnowledgeEncoder, RecipeArchitecture, load_body
from recipe.retrieval.gates import Gate, GateResult
from recipe.retrieval.networks import RecipeNetworks
from recipe.retrieval.sentinel import KnowledgeSentinel
from recipe.testing import tiny_lm
from recipe.types import EditRequest

ARCH = {"encoder": "tiny-bert", "key_dim": 32, "head_hidden": 64, "head_blocks": 1, "prompt_width": 32,
        "prompt_blocks": 1}
REQUESTS = [EditRequest("The capital of France is", "Rome"), EditRequest("Hey Jude was performed by", "Madonna"),
            EditRequest("The Amazon river flows through", "Italy")]
PROMPTS = [r.prompt for r in REQUESTS] + ["The quick brown fox jumps over the lazy"]
TARGETS = [r.target_new for r in REQUESTS] + ["dog"]
ACCEPT_ALL = {"sentinel_mode": "fixed", "threshold": -1.0e9}
REJECT_ALL = {"sentinel_mode": "fixed", "threshold": 1.0e9}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(lm, **kw) -> RecipeEditor:
    return load_editor("recipe", lm, {"architecture": ARCH, **kw})  # not the shipped YAML's checkpoint


def subjects(editor) -> dict:
    return {i: r.subject for i, r in editor.records.items() if r.subject is not None}


def outputs(lm):
    return lm.generate(PROMPTS, max_new_tokens=4), lm.score(PROMPTS, TARGETS)


def test_sentinel_rejection_gives_the_base_model_bit_exactly(tiny):
    base = outputs(tiny)
    editor = make(tiny, **REJECT_ALL)
    editor.edit(REQUESTS)
    assert tiny.prefix_provider is not None
    assert outputs(tiny) == base  # TargetScore compares float tuples exactly
    assert [r.edit_id for r in editor.last_retrieval] == [None] * len(PROMPTS)


def test_learned_sentinel_rejection_is_exact_too(tiny):
    base = outputs(tiny)
    editor = make(tiny)
    editor.edit(REQUESTS)
    with torch.no_grad():
        editor.networks.sentinel.bias.fill_(1.0e6)  # s(q, r_s) above every s(q, k)
    assert outputs(tiny) == base
    assert all(r.threshold > r.score for r in editor.last_retrieval)


def test_accepted_entry_changes_the_output(tiny):
    before = tiny.score(PROMPTS[:1], TARGETS[:1])[0]
    editor = make(tiny, **ACCEPT_ALL)
    ids = editor.edit(REQUESTS[:1])
    after = tiny.score(PROMPTS[:1], TARGETS[:1])[0]
    assert after.logprobs != before.logprobs
    assert editor.last_retrieval[0].edit_id == ids[0]


def test_refinement_moves_towards_the_target(tiny):
    before = tiny.score(PROMPTS[:1], TARGETS[:1])[0]
    make(tiny, refine_steps=40, refine_lr=0.5, **ACCEPT_ALL).edit(REQUESTS[:1])
    after = tiny.score(PROMPTS[:1], TARGETS[:1])[0]
    assert after.accuracy == 1.0 and sum(after.logprobs) > sum(before.logprobs) + 0.3


def test_retrieval_sees_the_question_only(tiny):
    editor = make(tiny, **ACCEPT_ALL)
    editor.edit(REQUESTS)
    seen = []
    encode = editor.networks.encoder.encode_query
    editor.networks.encoder.encode_query = lambda texts: seen.append(list(texts)) or encode(texts)
    tiny.score(PROMPTS, TARGETS)
    tiny.generate(PROMPTS[:2], max_new_tokens=3)
    assert seen == [PROMPTS, PROMPTS[:2]]  # never prompt + teacher-forced target, never generated tokens


def test_edit_remove_rollback(tiny):
    base = outputs(tiny)
    editor = make(tiny, **ACCEPT_ALL)
    ids = editor.edit(REQUESTS)
    assert ids == [0, 1, 2] and len(editor.repository) == 3
    editor.remove([ids[1]])
    assert editor.repository.ids() == [0, 2] and list(editor.statements) == [0, 2]
    tiny.score(PROMPTS[1:2], TARGETS[1:2])
    assert editor.last_retrieval[0].edit_id in (0, 2)  # the removed entry is never retrieved
    with pytest.raises(RecipeError, match="unknown edit id"):
        editor.remove([ids[1]])
    with pytest.raises(RecipeError, match="nothing removed"):
        editor.remove([ids[0], 99])
    assert editor.repository.ids() == [0, 2]  # a failed remove changes nothing
    assert editor.edit([REQUESTS[1]]) == [3]  # re-adding a removed statement works, ids never reused
    editor.rollback()
    assert tiny.prefix_provider is None and len(editor.repository) == 0
    assert outputs(tiny) == base


def test_duplicate_and_empty_statements_are_refused(tiny):
    editor = make(tiny)
    editor.edit(REQUESTS[:1])
    with pytest.raises(RecipeError, match="duplicate statement .* edit 0"):
        editor.edit([REQUESTS[0]])
    with pytest.raises(RecipeError, match="twice"):
        editor.edit([REQUESTS[1], REQUESTS[1]])
    with pytest.raises(ValueError, match="empty"):
        editor.edit([EditRequest("  ", "Rome")])
    assert editor.repository.ids() == [0]
    replacing = make(tiny_lm(), duplicates="replace")
    replacing.edit(REQUESTS[:2])
    assert replacing.edit([REQUESTS[0]]) == [2] and replacing.repository.ids() == [1, 2]


def test_save_load_round_trip_gives_identical_prefixes_and_outputs(tmp_path):
    lm_a, lm_b = tiny_lm(), tiny_lm()
    a = make(lm_a, **ACCEPT_ALL)
    a.edit(REQUESTS)
    a.remove([1])
    a.save(tmp_path / "repo")
    b = make(lm_b, **ACCEPT_ALL)
    b.load(tmp_path / "repo")
    pa, pb = a._provide(PROMPTS), b._provide(PROMPTS)
    assert all(torch.equal(x.vectors, y.vectors) and x.token_ids == y.token_ids for x, y in zip(pa, pb))
    assert outputs(lm_a) == outputs(lm_b)
    assert b.statements == a.statements
    assert b.edit([REQUESTS[1]]) == [3]  # ids continue after load


def test_vectors_mode_prefix_has_l_rows(tiny):
    editor = make(tiny, prefix_mode="vectors", **ACCEPT_ALL)
    editor.edit(REQUESTS[:1])
    (prefix,) = editor._provide(PROMPTS[:1])
    assert prefix.vectors.shape == (3, tiny.hidden_size) and prefix.token_ids == ()
    statement = make(tiny_lm(), **ACCEPT_ALL)
    statement.edit(REQUESTS[:1])
    (prefix,) = statement._provide(PROMPTS[:1])
    want = tuple(tiny.tokenizer(REQUESTS[0].statement + "\n", add_special_tokens=False).input_ids)
    assert prefix.vectors.shape == (3, tiny.hidden_size) and prefix.token_ids == want  # vectors, statement, separator
    assert tiny.prefix_embeddings(prefix).shape == (3 + len(want), tiny.hidden_size)
    assert statement.separator == "\n"


def test_separator_comes_from_the_checkpoint_unless_configured(tiny, tmp_path):
    editor = make(tiny)
    save_artifact(editor.networks, tiny, tmp_path / "new", "vectors+statement", statement_separator=" | ")
    assert make(tiny, checkpoint=str(tmp_path / "new")).separator == " | "
    assert make(tiny, checkpoint=str(tmp_path / "new"), statement_separator="\n").separator == "\n"
    meta = json.loads((tmp_path / "new" / "recipe.json").read_text())
    del meta["statement_separator"]  # artefacts written before the separator existed were trained without one
    (tmp_path / "new" / "recipe.json").write_text(json.dumps(meta))
    reseal(tmp_path / "new")
    old = make(tiny, checkpoint=str(tmp_path / "new"), **ACCEPT_ALL)
    assert old.separator == ""
    old.edit(REQUESTS[:1])
    (prefix,) = old._provide(PROMPTS[:1])
    assert prefix.token_ids == tuple(tiny.tokenizer(REQUESTS[0].statement, add_special_tokens=False).input_ids)


def test_hidden_size_mismatch_is_incompatible(tmp_path):
    small, big = tiny_lm(hidden=32), tiny_lm()
    editor = make(big)
    editor.edit(REQUESTS[:1])
    editor.save(tmp_path / "repo")
    other = make(small)
    with pytest.raises(IncompatibleError, match="hidden size 64.*hidden size 32"):
        other.load(tmp_path / "repo")
    with pytest.raises(IncompatibleError, match="hidden size 64.*hidden size 32"):
        other.load_state_dict(editor.state_dict())
    save_artifact(editor.networks, big, tmp_path / "ckpt", "vectors+statement")
    with pytest.raises(IncompatibleError, match="hidden size 64.*hidden size 32"):
        make(small, checkpoint=str(tmp_path / "ckpt"))
    with pytest.raises(IncompatibleError, match="prefix_mode"):
        make(big, checkpoint=str(tmp_path / "ckpt"), prefix_mode="vectors")


def test_shipped_names_the_checkpoint_made_for_the_lm(tmp_path, monkeypatch):
    import recipe.artifacts

    monkeypatch.setattr(recipe.artifacts, "repo_root", lambda: tmp_path)
    small, big = tiny_lm(hidden=32), tiny_lm()
    (tmp_path / "checkpoints" / "notes").mkdir(parents=True)  # not an artefact: skipped
    for name, lm in (("recipe-big", big), ("recipe-small", small)):
        save_artifact(make(lm).networks, lm, tmp_path / "checkpoints" / name, "vectors+statement")
    assert make(big, checkpoint="shipped").config.checkpoint == "checkpoints/recipe-big"  # recorded as resolved
    assert make(small, checkpoint="shipped").config.checkpoint == "checkpoints/recipe-small"
    other = tiny_lm()
    other.tokenizer.add_tokens(["Epaspidoceras"])  # the same sizes, another tokenizer: no shipped one fits
    with pytest.raises(IncompatibleError, match="no shipped RECIPE checkpoint.*recipe train recipe --model"):
        make(other, checkpoint="shipped")


def test_repository_of_other_networks_is_incompatible(tmp_path, tiny):
    editor = make(tiny)
    editor.edit(REQUESTS[:1])
    editor.save(tmp_path / "repo")
    with pytest.raises(IncompatibleError, match="encoder"):
        make(tiny_lm(), seed=1).load(tmp_path / "repo")


def test_empty_repository_and_sentinel_modes():
    sentinel = KnowledgeSentinel(8, "fixed", threshold=0.5)
    r_q = torch.randn(3, 8)
    assert sentinel(r_q).tolist() == [0.5] * 3
    assert sentinel.accept(torch.tensor([1.0, 0.5, -math.inf]), r_q).tolist() == [True, False, False]
    learned = KnowledgeSentinel(8)
    assert torch.allclose(learned(r_q), r_q @ learned.r_s / math.sqrt(8))
    lm = tiny_lm()
    editor = make(lm)
    assert editor._provide(PROMPTS) == [None] * len(PROMPTS)


def test_encoder_trains_only_the_top_body_layers():
    body, tok = load_body("tiny-bert")
    encoder = KnowledgeEncoder(body, tok, RecipeArchitecture(**{**ARCH, "train_body_layers": 1}))
    trained = {n for n, p in encoder.body.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("encoder.layer.1.") for n in trained)
    r = encoder.encode_query(["a question", "another, longer question"])
    assert r.shape == (2, 32) and torch.isfinite(r).all()


def test_prompt_encoder_starts_near_the_init_text_and_gives_finite_gradients():
    lm = tiny_lm()
    networks = RecipeNetworks.build(lm, RecipeArchitecture(**ARCH))
    base = networks.prompt_encoder.base
    assert base.abs().sum() > 0
    r_k = networks.encoder.encode_knowledge([REQUESTS[0].statement])
    prompt = networks.prompt_encoder(r_k)[0]  # (l, H)
    logp, _, _, mask = lm.target_logprobs(PROMPTS[:1], TARGETS[:1], [Prefix(prompt)])
    (-(logp * mask).sum()).backward()
    used = [networks.prompt_encoder, networks.encoder.knowledge_head, networks.encoder.body.encoder.layer[-1]]
    grads = [p.grad for m in used for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert networks.prompt_encoder.base.grad.abs().sum() > 0


def test_subject_gate_uses_only_edits_whose_subject_the_query_names(tiny, tmp_path):
    base = outputs(tiny)
    editor = make(tiny, subject_gate=True, **ACCEPT_ALL)  # one entry: it is every query's top-1
    editor.edit([EditRequest("The capital of France is", "Rome", subject="France")])
    editor._provide(["What is the capital of FRANCE?", "The capital of Spain is"])
    assert [(r.edit_id, r.subject_in_query) for r in editor.last_retrieval] == [(0, True), (None, False)]
    editor.rollback()
    assert editor.records == {} and outputs(tiny) == base
    editor.edit([EditRequest("The Amazon river flows through", "Italy")])  # no subject: the gate cannot apply
    editor._provide(["The capital of Spain is"])
    assert [(r.edit_id, r.subject_in_query) for r in editor.last_retrieval] == [(0, None)]
    editor.edit([EditRequest("Hey Jude was performed by", "Madonna", subject="Hey Jude")])
    editor.save(tmp_path / "repo")  # subjects survive save/load and state_dict round trips
    loaded = make(tiny_lm(), subject_gate=True, **ACCEPT_ALL)
    loaded.load(tmp_path / "repo")
    again = make(tiny_lm(), subject_gate=True, **ACCEPT_ALL)
    again.load_state_dict(editor.state_dict())
    assert subjects(loaded) == subjects(again) == subjects(editor) == {1: "Hey Jude"}
    assert loaded.records == again.records == editor.records


def test_subject_gate_bypass_needs_a_verifier(tiny):
    with pytest.raises(RecipeError, match="subject_gate_bypass"):
        make(tiny, subject_gate=True, subject_gate_bypass=0.9)


def test_statement_over_the_bound_is_refused_and_changes_nothing(tiny):
    editor = make(tiny, **ACCEPT_ALL)
    ids = editor.edit(REQUESTS[:1])
    base = outputs(tiny)
    bound = editor.statement_bound
    assert bound == (tiny.max_length - 3) // 2  # the tiny LM's context (128) binds before max_statement_tokens
    long = EditRequest("The capital of France is", "Paris " * bound)
    with pytest.raises(ValueError, match=f"exceeds the bound of {bound}"):
        editor.edit([REQUESTS[1], long])
    assert editor.repository.ids() == ids and list(editor.records) == ids and outputs(tiny) == base
    assert editor.edit([REQUESTS[1]]) == [1]  # no id was used up by the refused call
    tight = make(tiny_lm(), max_statement_tokens=4)
    with pytest.raises(ValueError, match="bound of 4"):
        tight.edit(REQUESTS[:1])
    with pytest.raises(RecipeError, match="max_statement_tokens"):
        make(tiny_lm(), max_statement_tokens=0)


def test_a_statement_at_the_bound_leaves_room_for_the_question(tiny):
    editor = make(tiny, **ACCEPT_ALL)
    words = ["Paris"]
    while len(tiny.tokenizer(" ".join(["The capital of France is", *words, "Paris"]) + "\n").input_ids) <= \
            editor.statement_bound:
        words.append("Paris")
    request = EditRequest("The capital of France is", " ".join(words))
    assert len(editor._records_of([0], [request.statement], [None])[0].token_ids) == editor.statement_bound
    editor.edit([request])
    texts = tiny.generate(PROMPTS, max_new_tokens=20)  # every query retrieves the one long entry
    assert len(texts) == len(PROMPTS) and all(r.edit_id == 0 for r in editor.last_retrieval)


def test_invisible_characters_are_normalised_so_padding_is_no_new_fact(tiny):
    editor = make(tiny, **ACCEPT_ALL)
    padded = EditRequest("The capital of\u200b France is", "Rome" + "\u200b" * 500 + "\ufeff")
    (edit_id,) = editor.edit([padded])
    assert editor.statements == {edit_id: REQUESTS[0].statement}  # 500 zero-width spaces add no token
    with pytest.raises(RecipeError, match="duplicate statement"):
        editor.edit([REQUESTS[0]])
    tabbed = EditRequest("Hey Jude was\tperformed by", "Madonna\x07")
    editor.edit([tabbed])
    assert editor.statements[1] == "Hey Jude was performed by Madonna"


def test_a_loaded_entry_over_the_bound_is_refused_and_changes_nothing(tmp_path):
    roomy = make(tiny_lm(), max_statement_tokens=60)
    roomy.edit([EditRequest("The capital of France is", "Paris " * 20)])
    roomy.save(tmp_path / "repo")
    tight = make(tiny_lm(), max_statement_tokens=8)
    tight.edit([EditRequest("Hi", "there")])
    before = tight.records
    with pytest.raises(ValueError, match="saved RECIPE state: .*exceeds the bound of 8"):
        tight.load(tmp_path / "repo")
    with pytest.raises(ValueError, match="exceeds the bound of 8"):
        tight.load_state_dict(roomy.state_dict())
    assert tight.records == before and tight.repository.ids() == [0]


def test_gates_compose_and_each_sees_the_flags_before_it(tiny):
    editor = make(tiny, **ACCEPT_ALL)
    editor.edit(REQUESTS)
    seen = []

    class NoAmazon(Gate):
        def __call__(self, candidates, accept, diagnostics):
            seen.append((list(accept), sorted(diagnostics)))
            return GateResult([ok and "Amazon" not in q for ok, q in zip(accept, candidates.queries)])

    editor.gates.append(NoAmazon())
    editor._provide(PROMPTS)
    assert seen == [([True] * len(PROMPTS), ["threshold"])]  # after the sentinel, with its diagnostics
    assert [r.edit_id is None for r in editor.last_retrieval] == [False, False, True, False]
