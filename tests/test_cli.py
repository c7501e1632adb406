"""The command line: help, list, and one clear error line (exit 2) for bad names."""
import pytest

from recipe.cli import build_parser, main


def test_help_mentions_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "eval", "list"):
        assert cmd in out


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "ft" in out and "zsre" in out


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--editor", "nope", "--dataset", "demo"], "unknown editor"),
    (["eval", "--dataset", "nope"], "nope"),
    (["eval", "--dataset", "demo", "--model", "no-such-model"], "unknown model"),
    (["eval", "--dataset", "demo", "--set", "steps"], "key=value"),
])
def test_bad_names_give_one_clear_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("recipe: error:") and needle in err
    assert "Traceback" not in err


def test_list_marks_the_datasets_present_in_the_data_folder(tmp_path, capsys):
    (tmp_path / "zsre").mkdir()
    (tmp_path / "zsre" / "zsre_mend_eval_portability_gpt4.json").write_text("[]")
    assert main(["list", "--data-dir", str(tmp_path)]) == 0
    lines = {line[6:].split()[0]: line for line in capsys.readouterr().out.splitlines()
             if line.startswith("  [")}
    assert lines["zsre"].startswith("  [x]") and lines["demo"].startswith("  [x]")  # demo ships with recipe
    assert lines["counterfact"].startswith("  [ ]") and lines["zsre-train"].startswith("  [ ]")  # zsre-train needs 2 files


ZSRE = {"subject": "Danielle Darrieux", "src": "What is the mother tongue of Danielle Darrieux?", "alt": "English",
        "answers": ["French"], "rephrase": "Which language did Danielle Darrieux speak first?",
        "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
COUNTERFACT = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
               "target_new": "English", "ground_truth": "French",
               "rephrase_prompt": "Where Danielle Darrieux is from, people speak",
               "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}


@pytest.mark.parametrize("record, fmt", [(ZSRE, "zsre"), (COUNTERFACT, "counterfact")])
def test_a_users_file_is_read_in_the_format_its_keys_tell(record, fmt, tmp_path):
    import json

    from recipe.data import load_dataset
    from recipe.data.formats import detect_format

    path = tmp_path / "my-edits.json"
    path.write_text(json.dumps([record, record]))
    assert detect_format(path).name == fmt
    cases = load_dataset(str(path))
    assert len(cases) == 2 and cases[0].request.target_new == "English" and cases[0].case_id.startswith("my-edits/")
    assert cases[0].generality and cases[0].locality


def test_a_file_in_no_known_format_is_refused_naming_the_formats(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text('[{"question": "q", "answer": "a"}]')
    assert main(["eval", "--dataset", str(path)]) == 2
    err = capsys.readouterr().err
    assert "question" in err and "zsre" in err and "counterfact" in err and "mquake" in err


def test_eval_on_a_users_file_and_the_device_flag(tiny_folder, tmp_path, monkeypatch, capsys):
    import json

    import recipe.models

    seen = {}
    real = recipe.models.load_model

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe.models, "load_model", recording)
    path = tmp_path / "my-edits.json"
    path.write_text(json.dumps([COUNTERFACT] * 2))
    out = tmp_path / "out"
    assert main(["eval", "--dataset", str(path), "--model", str(tiny_folder), "--editor", "none", "--edits", "1",
                 "--no-generation", "--out", str(out), "--device", "cpu"]) == 0
    assert seen["device"] == "cpu" and (out / "summary.json").is_file()


def test_device_defaults_to_a_gpu_when_torch_sees_one(monkeypatch):
    import torch

    from recipe.cli import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


def test_demo_takes_a_data_folder_for_the_editors_text(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECIPE_DATA_DIR", "/nowhere")
    assert main(["demo", "--model", str(tiny_folder), "--editor", "none", "--edits", "1", "--max-new-tokens", "1",
                 "--data-dir", str(tmp_path)]) == 0
    import os

    assert os.environ["RECIPE_DATA_DIR"] == str(tmp_path)  # what WikiTextSource(data_dir=None) reads
    assert "unrelated" in capsys.readouterr().out


def test_key_covariance_is_announced_and_shows_progress(tiny, caplog, capsys):
    import logging

    from recipe.editors.covariance import KeyCovariance, RandomTokenSource

    caplog.set_level(logging.INFO, logger="recipe.editors.covariance")
    KeyCovariance(tiny, RandomTokenSource(length=8), n_samples=8, batch_size=4)(1)
    assert any("computing the key covariance of layer 1 over 8 random samples" in r.getMessage() for r in caplog.records)
    assert "key covariance, layer 1" in capsys.readouterr().err  # the progress bar
