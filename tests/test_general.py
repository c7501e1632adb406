"""General-ability evaluation on the tiny model with tiny data files in the real formats."""
import json
import lzma
import math

import pytest
import torch

from recipe import cli
from recipe.data import load_dataset
from recipe.editors import load_editor
from recipe.errors import RecipeError
from recipe.eval.general import (Choice, Reading, choice_predictions, choice_prompt, load_general, measure,
                                 run_general, score_choices, score_squad, squad_prompt)

MAX_TOKENS = 100  # the tiny Llama's context is 128


def _write_xz(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt", encoding="utf-8") as f:
        f.write(text)


@pytest.fixture
def general_dir(tmp_path):
    """A data folder with three records per set, in the shared folder's layouts (xz-compressed)."""
    g = tmp_path / "general"
    mmlu = [{"question": f"Where is the Eiffel Tower {i}?", "subject": "geo",
             "choices": ["Rome", "Paris", "Ulm", "Oslo"], "answer": 1} for i in range(3)]
    csqa = [{"id": str(i), "question": "The fox jumps over the?", "question_concept": "fox",
             "choices": {"label": list("ABCDE"), "text": ["dog", "cat", "sky", "sea", "Rome"]}, "answerKey": "A"}
            for i in range(3)]
    anli = [{"premise": "The capital of Italy is Rome.", "hypothesis": "Rome is in Italy.", "label": label,
             "tag": f"r{r}_test"} for r in (1, 2, 3) for label in ("entailment", "neutral")]
    squad = {"version": "v2.0", "data": [{"title": "Paris", "paragraphs": [{
        "context": "The Eiffel Tower is located in the city of Paris.",
        "qas": [{"question": "Where is the tower?", "id": "a", "is_impossible": False,
                 "answers": [{"text": "Paris", "answer_start": 44}]},
                {"question": "Who built it?", "id": "b", "is_impossible": True, "answers": [],
                 "plausible_answers": [{"text": "Eiffel", "answer_start": 4}]}]}]}]}
    _write_xz(g / "mmlu" / "mmlu_test.hf.jsonl.xz", "".join(json.dumps(r) + "\n" for r in mmlu))
    _write_xz(g / "csqa" / "dev_rand_split.jsonl.xz", "".join(json.dumps(r) + "\n" for r in csqa))
    _write_xz(g / "anli" / "test.jsonl.xz", "".join(json.dumps(r) + "\n" for r in anli))
    _write_xz(g / "squad" / "dev-v2.0.json.xz", json.dumps(squad))
    wiki = "\r\n = Title = \r\n" + "".join(f" The quick brown fox jumps over the lazy dog {i} and the Amazon river "
                                          f"flows through Brazil . \r\n" for i in range(3))
    _write_xz(tmp_path / "wikitext" / "wiki.test.raw.xz", wiki)
    return tmp_path


def _items():
    return [Choice("Where is the Eiffel Tower?", ("Rome", "Paris", "Ulm", "Oslo"), 1),
            Choice("The fox jumps over the?", ("dog", "cat", "sky"), 0),
            Choice("Which river flows through Brazil? It is long.", ("Amazon", "Nile", "Thames", "Rhine", "Seine"), 0)]


def test_choice_prediction_is_argmax_of_first_option_token(tiny, one_thread):
    items = _items()
    preds = choice_predictions(tiny, items, MAX_TOKENS)
    for it, pred in zip(items, preds):  # one prompt at a time, no padding, the model's own forward
        ids = torch.tensor([tiny.prompt_ids(choice_prompt(tiny, it, MAX_TOKENS))])
        logits = tiny.model(input_ids=ids).logits[0, -1]
        option_ids = [tiny.tokenizer(" " + letter).input_ids[0] for letter in "ABCDE"[:len(it.options)]]
        assert pred == int(logits[option_ids].argmax())
    right = [Choice(it.question, it.options, p, group=g) for it, p, g in zip(items, preds, "xxy")]
    wrong = [Choice(it.question, it.options, (p + 1) % len(it.options)) for it, p in zip(items, preds)]
    chance = (1 / 4 + 1 / 3 + 1 / 5) / 3
    assert score_choices(tiny, right, MAX_TOKENS) == {"accuracy": 1.0, "n": 3, "ci95": [1.0, 1.0],
                                                      "chance": pytest.approx(chance),
                                                      "accuracy/x": 1.0, "accuracy/y": 1.0}
    assert score_choices(tiny, wrong, MAX_TOKENS)["accuracy"] == 0.0


def test_squad_inverse_perplexity_and_context_window(tiny, one_thread):
    items = [Reading("Paris", "The Eiffel Tower is located in the city of Paris.", "Where is the tower?", "Paris", 44),
             Reading("Rome", "The capital of Italy is Rome.", "Who built it?", "N/A", None, answerable=False)]
    inv = []
    for it in items:
        prompt_ids = tiny.prompt_ids(squad_prompt(tiny, it, MAX_TOKENS))
        target = tiny.tokenizer(" " + it.answer).input_ids
        logp = torch.log_softmax(tiny.model(input_ids=torch.tensor([prompt_ids + target])).logits[0], -1)
        nll = [-logp[len(prompt_ids) + j - 1, t].item() for j, t in enumerate(target)]
        inv.append(math.exp(-sum(nll) / len(nll)))
    out = score_squad(tiny, items, MAX_TOKENS)
    assert out["inv_ppl"] == pytest.approx(sum(inv) / 2, rel=1e-4)
    assert out["inv_ppl/answerable"] == pytest.approx(inv[0], rel=1e-4)
    context = "Mount Everest is the highest mountain on Earth. " * 30 + "The Eiffel Tower is in the city of Paris. " \
        + "London is big. " * 30
    long = Reading("Paris", context, "Where is the tower?", "Paris", context.index("Paris"))
    prompt = squad_prompt(tiny, long, 120)
    assert "city of Paris" in prompt and "Earth" in prompt and "London" in prompt  # a window around the answer
    assert len(tiny.prompt_ids(prompt)) + len(tiny.target_ids("Paris")) <= 120


def test_unedited_scores_return_after_rollback_and_outputs(tiny, one_thread, general_dir, tmp_path):
    items = load_general(general_dir, n=2, seed=0)
    assert [len(v) for v in items.values()] == [2, 2, 6, 2, 2]  # ANLI: n per round
    assert load_general(general_dir, n=2, seed=0) == items  # the same seeded subsets
    assert [c.group for c in items["anli"]] == ["r1", "r1", "r2", "r2", "r3", "r3"]
    editor = load_editor("ft", tiny, steps=5, lr=5.0e-2, norm_constraint=0.0)
    result = run_general(tiny, editor, load_dataset("demo"), [2, 1], items, max_tokens=MAX_TOKENS,
                         out_dir=tmp_path / "out", progress=False)
    assert [r["T"] for r in result["runs"]] == [0, 1, 2]
    assert result["runs"][2]["scores"] != result["runs"][0]["scores"]  # the edits changed something
    assert measure(tiny, items, MAX_TOKENS)["scores"] == result["runs"][0]["scores"]
    saved = json.loads((tmp_path / "out" / "general.json").read_text())
    assert saved["runs"][0]["scores"]["squad"]["n"] == 2 and "wikitext" in saved["runs"][0]["seconds"]
    assert "anli/r3" in (tmp_path / "out" / "general.txt").read_text()
    assert (tmp_path / "out" / "general.png").stat().st_size > 1000


def test_cli_end_to_end(tiny, one_thread, general_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda args: (tiny, load_editor(args.editor, tiny)))
    argv = ["general", "--editor", "none", "--dataset", "demo", "--edits", "1", "--n", "1",
            "--sets", "csqa,squad", "--data-dir", str(general_dir), "--max-tokens", str(MAX_TOKENS),
            "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "run" / "general.json").read_text())
    assert saved["items"] == {"csqa": 1, "squad": 1} and saved["runs"][0]["scores"] == saved["runs"][1]["scores"]
    assert "csqa" in capsys.readouterr().out


def test_missing_file_names_it_and_where_to_get_it(general_dir, capsys):
    (general_dir / "general" / "squad" / "dev-v2.0.json.xz").unlink()
    with pytest.raises(RecipeError, match=r"general/squad/dev-v2\.0\.json.*RECIPE_DATA_DIR"):
        load_general(general_dir, ["squad"])
    with pytest.raises(RecipeError, match="unknown general sets"):
        load_general(general_dir, ["hellaswag"])
    argv = ["general", "--dataset", "demo", "--sets", "squad", "--data-dir", str(general_dir)]
    assert cli.main(argv) == 2 and "dev-v2.0.json" in capsys.readouterr().err


def test_real_sets_load(data_dir):
    if not (data_dir / "general").is_dir():
        pytest.skip("general/ not in the data folder")
    items = load_general(data_dir, n=3, seed=0)
    assert {k: len(v) for k, v in items.items()} == {"mmlu": 3, "csqa": 3, "anli": 9, "squad": 3, "wikitext": 3}
    assert all(0 <= c.answer < len(c.options) for k in ("mmlu", "csqa", "anli") for c in items[k])


def test_cli_eval_saves_a_state_that_general_loads(tiny, one_thread, general_dir, tmp_path, monkeypatch, capsys):
    fast = {"steps": 5, "lr": 5.0e-2, "norm_constraint": 0.0}
    probe = tiny.tokenizer(["The capital of France is"], return_tensors="pt")
    base = tiny.model(**probe).logits
    monkeypatch.setattr(cli, "_load", lambda args: (tiny, load_editor(args.editor, tiny, fast)))
    assert cli.main(["eval", "--editor", "ft", "--dataset", "demo", "--edits", "2", "--no-generation",
                     "--checkpoint-every", "1", "--save-states", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "state-T2" / "state.json").exists()
    assert not (tmp_path / "ev" / "T2.round").exists()  # the mid-round checkpoint is gone once the round is written
    argv = ["general", "--editor", "ft", "--dataset", "demo", "--edits", "2", "--n", "1", "--sets", "csqa",
            "--data-dir", str(general_dir), "--max-tokens", str(MAX_TOKENS), "--out", str(tmp_path / "gen"),
            "--editor-state", str(tmp_path / "ev" / "state-T2")]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "gen" / "run.json").read_text())
    assert saved["editor_states"] == [str(tmp_path / "ev" / "state-T2")]
    assert torch.equal(tiny.model(**probe).logits, base)  # both commands rolled back
