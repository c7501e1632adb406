"""`recipe train`: every config field is a flag, --print-config, configs by name, any --model, outputs under
runs/ of the current folder, no silent overwrite, and a duration estimate in the log."""
import dataclasses
import logging

import pytest
import yaml

from recipe.config import repo_root
from recipe.errors import RecipeError
from train.cli import check_output, main, parse
from train.mend import MENDTrainConfig
from train.recipe import RecipeTrainConfig
from train.verifier import VerifierTrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--datasets", "[demo]", "--architecture.encoder", "tiny-bert", "--architecture.key-dim", "32",
        "--architecture.head-hidden", "64", "--architecture.head-blocks", "1", "--architecture.prompt-width", "32",
        "--architecture.prompt-blocks", "1", "--architecture.train-body-layers", "1", "--batch-size", "4",
        "--precision", "32-true", "--wandb", "disabled", "--max-steps", "2", "--val-every", "2",
        "--limit-val-batches", "1", "--warmup-steps", "1"]


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("kind, cls", [("recipe", RecipeTrainConfig), ("mend", MENDTrainConfig),
                                       ("verifier", VerifierTrainConfig)])
def test_print_config_prints_every_field(kind, cls, capsys):
    with pytest.raises(SystemExit) as done:
        main([kind, "--print-config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert _fields(cls) <= set(printed)
    nested = {name for name, value in printed.items() if isinstance(value, dict) and value}
    for name in nested & {"architecture", "weights"}:
        assert set(printed[name]) == _fields(type(getattr(cls(), name)))


def test_config_by_name_then_flags_override_it(capsys):
    with pytest.raises(SystemExit):
        main(["recipe", "--config", "recipe-finetune", "--max-steps", "7", "--architecture.key-dim", "16",
              "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["init_from"] == "checkpoints/recipe-smollm2" and printed["warmup_steps"] == 20  # from the YAML
    assert printed["max_steps"] == 7 and printed["architecture"]["key_dim"] == 16  # from the flags


def test_mend_defaults_to_its_shipped_yaml(capsys):
    with pytest.raises(SystemExit):
        main(["mend", "--print-config"])
    assert yaml.safe_load(capsys.readouterr().out)["max_steps"] == 700  # configs/train/mend.yaml, not the dataclass's 1000
    kind, cfg, options = parse(["mend", "--model", "Qwen/Qwen2.5-0.5B", "--val-every", "50"])
    assert (kind, cfg.max_steps, cfg.val_every, cfg.dataset_repeats["zsre-train"]) == ("mend", 700, 50, 4)
    assert cfg.out == "runs/mend-Qwen--Qwen2.5-0.5B/export" and options == {"force": False, "fast_dev_run": False,
                                                                           "no_resume": False}


def test_bad_flag_and_bad_config_give_one_clear_error(capsys):
    assert main(["recipe", "--max-steps", "many"]) == 2
    assert "max_steps" in capsys.readouterr().err
    assert main(["recipe", "--config", "no-such-config"]) == 2
    err = capsys.readouterr().err
    assert "no-such-config" in err and "recipe-finetune" in err


def test_default_paths_follow_kind_and_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RecipeTrainConfig(model="Qwen/Qwen2.5-0.5B", init_from="checkpoints/recipe-smollm2").resolved()
    assert (cfg.run_dir, cfg.out) == ("runs/recipe-Qwen--Qwen2.5-0.5B", "runs/recipe-Qwen--Qwen2.5-0.5B/export")
    assert cfg.init_from == str(repo_root() / "checkpoints" / "recipe-smollm2")  # found from any folder
    assert VerifierTrainConfig().resolved().out == "runs/verifier/export"
    assert RecipeTrainConfig(out="elsewhere").resolved().out == "elsewhere"


def test_shipped_checkpoints_are_never_overwritten_by_default(tmp_path):
    with pytest.raises(RecipeError, match="--force"):
        check_output(repo_root() / "checkpoints" / "recipe-smollm2", force=False)
    with pytest.raises(RecipeError, match="checkpoints/ folder"):
        check_output(repo_root() / "checkpoints" / "a-new-one", force=False)
    check_output(tmp_path / "new", force=False)  # a fresh folder is fine


def test_two_steps_from_any_folder_write_under_runs_and_refuse_a_second_run(tiny_folder, tmp_path, monkeypatch,
                                                                           caplog, capsys):
    from recipe.cli import main as recipe_main

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING)  # as `recipe` sets the root; `recipe train` must let its own logger speak
    caplog.handler.setLevel(logging.INFO)
    logging.getLogger("train").setLevel(logging.NOTSET)
    assert recipe_main(["train", "recipe", "--model", str(tiny_folder), *TINY]) == 0
    artifact = tmp_path / "runs" / "recipe-tiny-llama" / "export"
    assert (artifact / "recipe.json").is_file()
    assert (tmp_path / "runs" / "recipe-tiny-llama" / "checkpoints" / "last.ckpt").is_file()
    assert any("estimated duration" in r.getMessage() and "s/step x 2 steps" in r.getMessage() for r in caplog.records)

    before = (artifact / "weights.safetensors").read_bytes()
    assert main(["recipe", "--model", str(tiny_folder), *TINY]) == 2
    assert "already holds an artefact; pass --force" in capsys.readouterr().err
    assert (artifact / "weights.safetensors").read_bytes() == before

    out = tmp_path / "given"
    assert main(["recipe", "--model", str(tiny_folder), *TINY, "--out", str(out), "--no-resume"]) == 0
    assert (out / "recipe.json").is_file()


def test_keys_of_other_processes_are_negatives_unless_they_share_the_querys_statement():
    from train.data import TrainExample
    from train.module import RecipeModule

    def ex(name, paraphrase=None, loc=None):
        return TrainExample(prompt=f"{name}?", target="x", paraphrase=paraphrase or f"{name}, again?",
                            locality_prompt=loc, locality_answer="y" if loc else None)

    batch = [ex("a", loc="unrelated?"), ex("b")]
    other = [ex("a", paraphrase="a, said otherwise?"), ex("d")]  # another process's batch: its first edit is a's
    conflicts = RecipeModule._conflicts(batch, [0], other + batch, offset=2)  # rows: a, b, a', b', loc(a)
    assert conflicts.shape == (5, 4)
    assert conflicts[0].tolist() == [True, False, False, False]  # c is no fair negative for a; own key a kept
    assert conflicts[2].tolist() == [True, False, False, False]
    assert not conflicts[1].any() and not conflicts[4].any()  # the locality row keeps every key, own included


@pytest.mark.slow
def test_two_processes_on_cpu_score_every_query_against_both_batches(tiny_folder, tmp_path):
    """DDP (gloo) on the CPU: each process's retrieval softmax runs over the keys of both batches."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(repo_root()), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "train.cli", "recipe", "--model", str(tiny_folder), *TINY, "--max-steps", "3",
            "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "runs" / "recipe-tiny-llama" / "export" / "recipe.json").read_text())
    metrics = meta["training"]["last_metrics"]
    assert meta["training"]["steps"] == 3
    assert metrics["train/retrieval/keys"] == 2 * 4  # 2 processes x batch 4: the other batch's keys are negatives
    single = subprocess.run(argv[:-6] + ["--out", "single"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert json.loads((tmp_path / "single" / "recipe.json").read_text())["training"]["last_metrics"][
        "train/retrieval/keys"] == 4


@pytest.mark.parametrize("kind", ["recipe", "mend", "verifier"])
def test_python_m_train_kind_is_the_same_command(kind, capsys):
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"train.{kind}").main(["--max-steps", "5", "--print-config"])
    assert done.value.code == 0 and yaml.safe_load(capsys.readouterr().out)["max_steps"] == 5
