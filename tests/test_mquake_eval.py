"""MQuAKE evaluation on the tiny model with a 2-case synthetic MQuAKE-format file."""
import json

import pytest
import torch

from recipe import cli
from recipe.data import load_dataset
from recipe.editors import load_editor
from recipe.eval import mquake
from recipe.eval.mquake import MquakePrompts, mello_answers, run_mquake

DEMOS = "Q: Who is Joe Biden married to? A: Jill Biden"
MELLO = ("Question: Who?\nSubquestion: Who?\nGenerated answer: X is Y.\nRetrieved fact: X is Z.\n"
         "Retrieved fact contradicts to generated answer, so the intermediate answer is: Z\nFinal answer: Z")


def _hop(question, answer):
    return {"question": question, "cloze": question, "answer": answer, "answer_alias": []}


def _record(case_id, subject, questions, answer, new_answer, hops):
    rewrites = [{"prompt": f"The language of {{}} number {k} is", "subject": f"{subject}{k}", "question": q,
                 "relation_id": "P37", "target_new": {"str": a, "id": "Q1"}, "target_true": {"str": "Old", "id": "Q2"}}
                for k, (q, a) in enumerate(hops)]
    return {"case_id": case_id, "requested_rewrite": rewrites, "questions": questions, "answer": answer,
            "answer_alias": [], "new_answer": new_answer, "new_answer_alias": [],
            "single_hops": [_hop(q, "Old") for q, _ in hops], "new_single_hops": [_hop(q, a) for q, a in hops]}


A_QUESTIONS = ["Which tongue is spoken where Alpha's boss lives?",
               "Which official language has the home country of the boss of Alpha?",
               "What language is official in the country of citizenship of the boss of the singer Alpha?"]
B_QUESTIONS = ["Which tongue is spoken there?", "What is spoken in the land of Beta's maker now?",
               "What language do people speak in the country of the maker of the record Beta today?"]
A_HOPS = [("Who sang Alpha?", "Maria"), ("Who is the boss of Maria?", "Chen"),
          ("Where is Chen a citizen of?", "Peru"), ("What is spoken in Peru?", "Arabic")]
B_HOPS = [("Who made Beta?", "Jon"), ("Who is Jon's boss, please?", "Ana"),
          ("Which country is Ana a citizen of now?", "Fiji"), ("Which language is spoken in Fiji today?", "Spanish")]


@pytest.fixture
def mquake_dir(tmp_path):
    d = tmp_path / "mquake"
    (d / "prompts").mkdir(parents=True)
    records = [_record(1, "Alpha", A_QUESTIONS, "English", "Arabic", A_HOPS),
               _record(2, "Beta", B_QUESTIONS, "German", "Spanish", B_HOPS)]
    (d / "MQuAKE-hard.json").write_text(json.dumps(records))
    (d / "prompts" / "multihop-prompts.txt").write_text(DEMOS + "\nQ: Who made it? A: Jon\n")
    (d / "prompts" / "MeLLo-prompt.txt").write_text(MELLO + "\n\n" + MELLO.replace("Z", "W") + "\n")
    return tmp_path


@pytest.fixture
def answering(tiny):
    """The tiny model made to answer: ``tiny.answers[prompt]`` is what it writes after that prompt (others:
    " none"), one prompt per batch, told apart by their token lengths (which must differ)."""
    state = {"script": [], "step": 0}
    by_length = {}

    def favour(module, args, kwargs, output):
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        if inputs.shape[1] > 1:
            state["script"], state["step"] = by_length.get(inputs.shape[1], tiny.fallback), 0
        else:
            state["step"] += 1
        if state["step"] < len(state["script"]):
            output.logits[:, -1, state["script"][state["step"]]] += 1e4
        return output

    def answer(prompts_to_text: dict[str, str]) -> None:
        by_length.clear()
        for prompt, text in prompts_to_text.items():
            n = len(tiny.prompt_ids(prompt))
            assert n not in by_length, f"two scripted prompts of {n} tokens"
            by_length[n] = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]

    tiny.fallback = tiny.tokenizer(" none\n", add_special_tokens=False)["input_ids"]
    handle = tiny.model.register_forward_hook(favour, with_kwargs=True)
    batch, tiny.max_batch = tiny.max_batch, 1
    yield answer
    handle.remove()
    tiny.max_batch = batch


def _q(question):
    return f"{DEMOS}\nQ: {question} A:"


def test_multi_hop_counts_a_case_when_any_question_gets_the_new_answer_and_the_floor(tiny, one_thread, mquake_dir,
                                                                                    answering):
    answering({_q(A_QUESTIONS[0]): " English\n", _q(A_QUESTIONS[1]): " Arabic\n", _q(A_QUESTIONS[2]): " English\n",
               **{_q(q): " French\n" for q in B_QUESTIONS}, _q(A_HOPS[0][0]): " Maria\n"})
    cases = load_dataset("mquake-hard", mquake_dir)
    prompts = MquakePrompts(DEMOS, MELLO)
    result = run_mquake(tiny, load_editor("none", tiny), cases, prompts, progress=False, seed=0)
    by_id = {r["case_id"]: r for r in result["rows"]}
    assert by_id["mquake-hard/1"]["multi_hop"]["per_question"] == [0.0, 1.0, 0.0]
    assert result["edited"]["multi_hop"] == 0.5 and result["edited"]["multi_hop/question"] == pytest.approx(1 / 6)
    assert result["floor"]["multi_hop"] == 0.5 and result["floor"]["multi_hop/question"] == pytest.approx(2 / 6)
    assert by_id["mquake-hard/1"]["single_hop"]["accuracy"] == 0.25 and by_id["mquake-hard/2"]["single_hop"]["accuracy"] == 0
    assert by_id["mquake-hard/1"]["multi_hop"]["answers"][1] == "Arabic"
    assert "single_hop" not in result["floor"]


def test_a_prefix_editor_retrieves_on_the_question_not_on_the_demonstrations(tiny, one_thread, monkeypatch):
    """RECIPE's retrieval reads the question alone; the few-shot demonstrations go to the model only,
    and the prefix retrieved for a question is the one that question's prompt gets."""
    from recipe.lm import Prefix

    seen, prefix = [], Prefix(torch.randn(2, tiny.hidden_size), (5, 6))
    monkeypatch.setattr(tiny, "prefix_provider", lambda texts: seen.extend(texts) or [prefix if "Biden" in t else None
                                                                                     for t in texts])
    got = {}
    monkeypatch.setattr(tiny, "_generate_batch", lambda prompts, prefs, n, kw: got.update(zip(prompts, prefs))
                        or torch.zeros(len(prompts), 1, dtype=torch.long))
    mquake.ask(tiny, DEMOS, ["Who is Biden married to?", "Who wrote Hamlet?"])
    assert seen == ["Who is Biden married to?", "Who wrote Hamlet?"]
    assert torch.equal(got[_q("Who is Biden married to?")], tiny.prefix_embeddings(prefix))
    assert got[_q("Who wrote Hamlet?")] is None


def test_each_case_gets_its_edits_in_one_call_then_a_rollback_or_all_at_once(tiny, one_thread, mquake_dir):
    cases = load_dataset("mquake-hard", mquake_dir)
    prompts = MquakePrompts(DEMOS, MELLO)
    editor = load_editor("none", tiny)
    calls = []
    editor.edit = lambda requests: calls.append(("edit", len(requests))) or []
    editor.rollback = lambda: calls.append(("rollback",))
    run_mquake(tiny, editor, cases, prompts, progress=False)
    assert calls == [("edit", 4), ("rollback",), ("edit", 4), ("rollback",), ("rollback",)]
    calls.clear()
    result = run_mquake(tiny, editor, cases, prompts, all_at_once=True, progress=False)
    assert calls == [("edit", 4), ("edit", 4), ("rollback",)] and result["edits"] == 8


def test_an_editor_is_rolled_back_after_the_run(tiny, one_thread, mquake_dir):
    cases = load_dataset("mquake-hard", mquake_dir)
    ids = tiny.tokenizer(["Who sang Alpha?"], return_tensors="pt")
    base = tiny.model(**ids).logits
    ft = load_editor("ft", tiny, steps=3, lr=5.0e-2, norm_constraint=0.0)
    run_mquake(tiny, ft, cases, MquakePrompts(DEMOS, MELLO), n_cases=1, all_at_once=True, progress=False)
    assert torch.equal(tiny.model(**ids).logits, base)


def test_mello_chain_puts_the_models_own_answer_in_as_the_fact(tiny, monkeypatch):
    steps = iter([["Subquestion: Who sang Alpha?\nGenerated answer: Alpha was sung by Maria.\nRetrieved fact:"],
                  [" Maria\nSubquestion: Who is Maria's boss?\nGenerated answer: It is Chen.\nRetrieved fact:"],
                  [" Chen\nFinal answer: Chen\nQuestion: more"]])
    prompts_seen = []
    monkeypatch.setattr(mquake, "generate_until", lambda lm, prompts, *a: prompts_seen.append(prompts) or next(steps))
    (answer, chain), = mello_answers(tiny, "DEMOS", ["Who is the boss of the singer of Alpha?"])
    assert answer == "Chen"
    assert "Retrieved fact: Alpha was sung by Maria.\nRetrieved fact does not contradict" in prompts_seen[1][0]
    assert chain.endswith("intermediate answer is: Chen\nFinal answer: Chen") and "Question: more" not in chain
    steps = iter([["I do not know.\n\n"]])
    assert mello_answers(tiny, "DEMOS", ["Who?"]) == [("", "Question: Who?\nI do not know.")]


def test_mello_runs_on_the_model(tiny, one_thread):
    out = mello_answers(tiny, MELLO[:40], ["Who sang Alpha?", "Who made Beta?"], max_hops=1, step_tokens=6)
    assert [chain.split("\n")[0] for _, chain in out] == ["Question: Who sang Alpha?", "Question: Who made Beta?"]


def test_cli_mquake(tiny, one_thread, mquake_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda args: (tiny, load_editor(args.editor, tiny)))
    argv = ["mquake", "--editor", "none", "--data-dir", str(mquake_dir), "--cases", "1", "--demos", "1",
            "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "run" / "mquake.json").read_text())
    assert saved["cases"] == 1 and saved["edits"] == 4 and set(saved["edited"]) >= {"edit", "single_hop", "multi_hop"}
    assert "floor" in capsys.readouterr().out
    (mquake_dir / "mquake" / "prompts" / "MeLLo-prompt.txt").unlink()
    assert cli.main(argv) == 2 and "MeLLo-prompt.txt" in capsys.readouterr().err
