"""Agreement with the unedited model and bootstrap intervals of general ability, on the tiny model."""
import json

import numpy as np
import pytest
import torch

from recipe import cli
from recipe.data import load_dataset
from recipe.editors import load_editor
from recipe.eval import agreement as agree
from recipe.eval.general import load_general, run_general
from recipe.eval.general_sets import ci95
from tests.test_general import MAX_TOKENS, general_dir  # noqa: F401  (the fixture)

PROMPTS = [("a", "The capital of France is"), ("a", "The Eiffel Tower is located in"),
           ("b", "The quick brown fox jumps over the"), ("b", "Rome is the capital of")]


def _full_kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (p.exp() * (p - q)).sum(-1)


def _last_logits(lm, prompts):
    return torch.stack([lm.model(input_ids=torch.tensor([lm.prompt_ids(p)])).logits[0, -1] for _, p in prompts])


@pytest.fixture
def shaken(tiny):
    """``shake()`` adds seeded noise to the tiny model's output layer; the weights come back afterwards."""
    saved = tiny.model.lm_head.weight.detach().clone()

    def shake(scale: float) -> None:
        with torch.no_grad():
            tiny.model.lm_head.weight.add_(scale * torch.randn(saved.shape, generator=torch.Generator().manual_seed(0)))

    yield shake
    with torch.no_grad():
        tiny.model.lm_head.weight.copy_(saved)


def test_the_unedited_model_agrees_with_itself_and_a_change_shows(tiny, one_thread, shaken):
    record = agree.record_next_tokens(tiny, [p for _, p in PROMPTS], top_k=8)
    same = agree.compare(tiny, PROMPTS, record)
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-5)
    assert same["by_set"] == {"a": {"agreement": 1.0, "kl": pytest.approx(0.0, abs=1e-5), "n": 2},
                              "b": {"agreement": 1.0, "kl": pytest.approx(0.0, abs=1e-5), "n": 2}}
    before = _last_logits(tiny, PROMPTS)
    shaken(0.5)
    after = _last_logits(tiny, PROMPTS)
    moved = agree.compare(tiny, PROMPTS, record)
    changed = (before.argmax(-1) != after.argmax(-1)).float().mean().item()
    assert changed > 0 and moved["agreement"] == pytest.approx(1 - changed)
    assert 0.01 < moved["kl"] <= _full_kl(before, after).mean().item() + 1e-4  # top-k + one bucket: a lower bound


def test_kl_over_the_whole_vocabulary_is_the_full_kl(tiny, one_thread, shaken):
    record = agree.record_next_tokens(tiny, [p for _, p in PROMPTS], top_k=tiny.model.config.vocab_size)
    before = _last_logits(tiny, PROMPTS)
    shaken(0.3)
    after = _last_logits(tiny, PROMPTS)
    full = agree.compare(tiny, PROMPTS, record)
    coarse = agree.compare(tiny, PROMPTS, {k: v[:, :4] for k, v in record.items()})
    assert full["kl"] == pytest.approx(_full_kl(before, after).mean().item(), rel=1e-3)
    assert 0 < coarse["kl"] < full["kl"] and coarse["tail_mass"] > full["tail_mass"]


def test_the_unedited_record_is_kept_and_reused_for_the_same_weights_and_prompts(tiny, one_thread, tmp_path,
                                                                                  monkeypatch):
    path = tmp_path / agree.RECORD_FILE
    record, kept = agree.unedited_record(tiny, PROMPTS, 8, path)
    assert not kept and path.exists()
    monkeypatch.setattr(agree, "record_next_tokens", lambda *a, **k: pytest.fail("the kept record was not read"))
    again, kept = agree.unedited_record(tiny, PROMPTS, 8, path)
    assert kept and torch.equal(again["top_ids"], record["top_ids"])
    monkeypatch.undo()
    _, kept = agree.unedited_record(tiny, PROMPTS[:3], 8, path)  # other prompts: made again
    assert not kept


def test_bootstrap_interval_is_seeded_and_about_four_points_at_500_items():
    hits = [1.0] * 150 + [0.0] * 350
    low, high = ci95(np.mean, hits)
    assert ci95(np.mean, hits) == [low, high]
    assert low < 0.3 < high and 0.07 < high - low < 0.09
    assert ci95(np.mean, [1.0]) is None


def test_general_run_reports_agreement_intervals_and_chance(tiny, one_thread, general_dir, tmp_path):  # noqa: F811
    items = load_general(general_dir, n=2, seed=0)
    editor = load_editor("ft", tiny, steps=5, lr=5.0e-2, norm_constraint=0.0)
    result = run_general(tiny, editor, load_dataset("demo"), [2], items, max_tokens=MAX_TOKENS,
                         out_dir=tmp_path / "out", progress=False, agreement_items=items, top_k=8)
    before, after = (r["agreement"] for r in result["runs"])
    assert before["agreement"] == 1.0 and before["n"] == sum(len(v) for v in items.values())
    assert after["kl"] > 0 and after["agreement"] < 1.0  # the FT edits moved the next-token distributions
    assert result["chance"] == {"mmlu": 0.25, "csqa": 0.2, "anli": pytest.approx(1 / 3)}
    assert set(result["at_chance"]) <= {"mmlu", "csqa", "anli"}
    scores = result["runs"][0]["scores"]
    for name in ("mmlu", "csqa", "anli", "squad", "wikitext"):
        low, high = scores[name]["ci95"]
        metric = {"squad": "inv_ppl", "wikitext": "ppl"}.get(name, "accuracy")
        assert low <= scores[name][metric] <= high
    text = (tmp_path / "out" / "general.txt").read_text()
    assert "agree" in text and "95% intervals" in text
    # a second run in the same folder reads the unedited record and measures T=0 against it
    again = run_general(tiny, load_editor("none", tiny), load_dataset("demo"), [1], items, max_tokens=MAX_TOKENS,
                        out_dir=tmp_path / "out", progress=False, agreement_items=items, top_k=8)
    assert [r["agreement"]["agreement"] for r in again["runs"]] == [1.0, 1.0]


def test_cli_agreement_flags(tiny, one_thread, general_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(cli, "_load", lambda args: (tiny, load_editor(args.editor, tiny)))
    argv = ["general", "--editor", "none", "--dataset", "demo", "--edits", "1", "--n", "2", "--agreement", "1",
            "--top-k", "4", "--sets", "mmlu,squad", "--data-dir", str(general_dir), "--max-tokens",
            str(MAX_TOKENS), "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "run" / "general.json").read_text())
    assert saved["agreement_prompts"] == {"mmlu": 1, "squad": 1}
    assert saved["runs"][1]["agreement"]["top_k"] == 4 and saved["runs"][1]["agreement"]["agreement"] == 1.0
    out = capsys.readouterr().out
    assert "agree" in out
    off = argv.index("--agreement") + 1
    assert cli.main(argv[:off] + ["0"] + argv[off + 1:]) == 0
    assert "agreement_prompts" not in json.loads((tmp_path / "run" / "general.json").read_text())
