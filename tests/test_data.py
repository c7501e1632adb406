"""Dataset loaders: real records (skipped without the data folder) and small hand-made files."""
from __future__ import annotations

import json
import lzma
from functools import lru_cache
from pathlib import Path

import pytest

from recipe.data import (
    DATASETS,
    DataDirError,
    DatasetFormatError,
    DatasetNotFoundError,
    RecipeError,
    UnknownDatasetError,
    load_counterfact,
    load_counterfact_rome,
    load_dataset,
    load_ripple,
    load_wikitext,
    load_zsre,
    resolve_data_dir,
    zsre_overlap,
)
from recipe.errors import UnknownNameError
from recipe.types import EditCase


@lru_cache(maxsize=None)
def _load(name: str, data_dir: Path) -> tuple[EditCase, ...]:
    return tuple(load_dataset(name, data_dir))


COUNTS = {
    "zsre": 1037,
    "zsre-knowedit": 1301,
    "zsre-train": 495,
    "counterfact": 10000,
    "counterfact-train": 10000,
    "ripple-recent-test": 1266,
    "ripple-recent-train": 570,
    "ripple-cf-train": 1427,
    "mquake-hard": 429,
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_record_counts_and_ids(name, data_dir):
    cases = _load(name, data_dir)
    assert len(cases) == COUNTS[name]
    assert len({case.case_id for case in cases}) == len(cases)
    assert all(case.case_id.startswith(f"{name}/") and case.dataset == name for case in cases)
    assert all(r.subject in r.prompt for case in cases for r in case.requests)
    assert all(case.meta["skipped_probes"] == 0 for case in cases)


def test_zsre_first_record(data_dir):
    case = _load("zsre", data_dir)[0]
    request = case.request
    assert request.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert (request.target_new, request.target_true) == ("2006", "1998")
    assert request.subject == "IAAF Combined Events Challenge"
    assert case.generality[0].prompt == "When was the IAAF Combined Events Challenge launched?"
    assert (case.generality[0].target, case.generality[0].group) == ("2006", "rephrase")
    assert case.locality[0].prompt == "nq question: what is the name of the last episode of spongebob"
    assert (case.locality[0].target, case.locality[0].group) == ("The String", "locality")
    assert (case.portability[0].target, case.portability[0].group) == ("Athletics", "portability")


def test_zsre_knowedit_first_record(data_dir):
    case = _load("zsre-knowedit", data_dir)[0]
    assert case.request.prompt == "Which family does Epaspidoceras belong to?"
    assert (case.request.target_new, case.request.target_true) == ("Noctuidae", "Aspidoceratidae")
    assert case.generality[0].prompt == "What family are Epaspidoceras?"
    assert [p.group for p in case.locality] == ["Relation_Specificity"] * 2
    assert case.locality[0].target == "genus"
    assert (case.portability[0].group, case.portability[0].target) == ("Reasoning", "Owlet moths")


def test_zsre_train_is_disjoint_from_evaluation(data_dir):
    train, evaluation = _load("zsre-train", data_dir), _load("zsre", data_dir)
    assert zsre_overlap(train, evaluation) == {"prompts": set(), "subjects": set()}
    eval_prompts = {case.request.prompt for case in evaluation}
    eval_subjects = {case.request.subject for case in evaluation}
    assert not any(c.request.prompt in eval_prompts or c.request.subject in eval_subjects for c in train)
    # and the check does find an overlap when there is one
    assert zsre_overlap(evaluation[:3], evaluation)["prompts"]


def test_counterfact_first_record(data_dir):
    case = _load("counterfact", data_dir)[0]
    assert case.case_id == "counterfact/0"
    assert case.request.prompt == "The mother tongue of Danielle Darrieux is"
    assert (case.request.target_new, case.request.target_true) == ("English", "French")
    assert case.generality[0].prompt == "Where Danielle Darrieux is from, people speak the language of"
    assert case.generality[0].target == "English"
    assert (case.locality[0].prompt, case.locality[0].target) == ("Michel Rocard is a native speaker of", "French")


def test_counterfact_splits_share_no_case(data_dir):
    edit = {c.case_id.split("/")[1] for c in _load("counterfact", data_dir)}
    train = {c.case_id.split("/")[1] for c in _load("counterfact-train", data_dir)}
    assert not edit & train


def test_ripple_groups(data_dir):
    test = _load("ripple-recent-test", data_dir)
    generality = {p.group for c in test for p in c.generality}
    locality = {p.group for c in test for p in c.locality}
    assert generality == {"rephrase", "Logical_Generalization", "Reasoning", "Subject_Aliasing"}
    assert locality == {"Relation_Specificity", "Forgetfulness"}
    first = test[0]
    assert first.request.prompt == "The place of death of Leo Arons is" and first.request.target_new == "Berlin"
    alive = next(p for p in first.generality if p.group == "Logical_Generalization")
    assert alive.prompt == "Is Leo Arons still alive?"
    assert alive.target == "no" and "is dead" in alive.aliases
    cf = _load("ripple-cf-train", data_dir)[0]
    assert (cf.request.target_new, cf.request.target_true) == ("Franche-Comté", "France")
    cf_locality = {p.group for c in _load("ripple-cf-train", data_dir) for p in c.locality}
    assert cf_locality == {"Relation_Specificity", "Forgetfulness"}


def test_mquake_hard(data_dir):
    cases = _load("mquake-hard", data_dir)
    assert all(len(case.requests) == 4 for case in cases)
    first = cases[0]
    assert first.case_id == "mquake-hard/7417"
    assert first.requests[0].prompt == "Hey Jude was performed by"
    assert (first.requests[0].target_new, first.requests[0].target_true) == ("Madonna", "The Beatles")
    assert [p.group for p in first.generality] == ["multi_hop"] * 3
    assert first.generality[0].target == "Arabic" and "Arabic language" in first.generality[0].aliases
    assert [p.target for p in first.portability] == ["Madonna", "Narendra Modi", "Australia", "Arabic"]
    assert {p.group for p in first.portability} == {"single_hop"}


def test_counterfact_rome_samples(data_dir):
    folder = data_dir / "counterfact" / "rome_format_samples"
    files = sorted(folder.glob("*.json"))
    if not files:
        pytest.skip("ROME-format samples not present")
    cases = [case for path in files for case in load_counterfact_rome(path)]
    assert len(cases) == 20
    case = cases[0]
    assert case.request.prompt == "Muslim follows the religion of"
    assert (case.request.target_new, case.request.target_true) == ("Christianity", "Islam")
    assert len(case.generality) == 2 and len(case.locality) == 10 and len(case.portability) == 10
    assert {p.target for p in case.locality} == {"Islam"}
    assert {(p.group, p.target) for p in case.portability} == {("attribute", "Christianity")}
    assert len(case.meta["generation_prompts"]) == 10


def test_limit(data_dir):
    assert len(load_dataset("counterfact", data_dir, limit=7)) == 7
    assert len(load_dataset("zsre-train", data_dir, limit=5)) == 5
    assert load_dataset("demo", limit=0) == []


def test_wikitext(data_dir):
    for split in ("test", "valid"):
        paragraphs = load_wikitext(data_dir, split)
        assert len(paragraphs) > 1000
        assert not any(p.startswith("=") and p.endswith("=") for p in paragraphs)
        assert all(len(p.split()) >= 10 and p == p.strip() for p in paragraphs)
    assert load_wikitext(data_dir)[0].startswith("Robert Boulter is an English film")
    with pytest.raises(RecipeError, match="valid"):
        load_wikitext(data_dir, "train")


# ---- no real data needed below -------------------------------------------------------------------


def test_demo_needs_no_data_dir(monkeypatch):
    monkeypatch.delenv("RECIPE_DATA_DIR", raising=False)
    cases = load_dataset("demo")
    assert len(cases) >= 25
    assert len({c.meta["relation"] for c in cases}) >= 15
    for case in cases:
        assert case.request.subject in case.request.prompt
        assert case.request.target_new != case.request.target_true
        assert case.generality and case.locality
        assert case.locality[0].target != case.request.target_new


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownDatasetError, match="counterfact.*zsre") as info:
        load_dataset("zsre-typo")
    assert isinstance(info.value, UnknownNameError)


def test_every_dataset_says_where_to_get_it():
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.description and spec.source
        assert all(not f.endswith(".xz") for f in spec.files)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"counterfact-edit\.json.*qizhou000/RECIPE") as info:
        load_dataset("counterfact", tmp_path)
    assert info.value.path == tmp_path / "counterfact" / "counterfact-edit.json"
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, RecipeError)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("RECIPE_DATA_DIR", raising=False)
    with pytest.raises(DataDirError, match="--data-dir.*RECIPE_DATA_DIR"):
        resolve_data_dir(None)
    with pytest.raises(DataDirError, match="does not exist"):
        resolve_data_dir(tmp_path / "nowhere")
    monkeypatch.setenv("RECIPE_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    assert resolve_data_dir(str(explicit)) == explicit  # an explicit argument wins over the variable


def _counterfact_record(i: int) -> dict:
    return {
        "case_id": i, "prompt": f"Subject{i} speaks", "target_new": "English", "subject": f"Subject{i}",
        "ground_truth": "French", "rephrase_prompt": f"Subject{i} talks in",
        "locality_prompt": "Michel Rocard speaks", "locality_ground_truth": "French",
    }


def _write(path: Path, records: object, xz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(records)
    if xz:
        path = path.with_name(path.name + ".xz")
        with lzma.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("xz", [False, True])
def test_plain_and_xz_files_both_load(tmp_path, xz):
    _write(tmp_path / "counterfact" / "counterfact-edit.json", [_counterfact_record(i) for i in range(3)], xz)
    cases = load_dataset("counterfact", tmp_path)
    assert [c.case_id for c in cases] == ["counterfact/0", "counterfact/1", "counterfact/2"]


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda r: r.pop("target_new"), "target_new"),
        (lambda r: r.update(subject=["Subject1"]), "subject"),
        (lambda r: r.update(prompt="  "), "prompt"),
    ],
)
def test_malformed_record_names_file_index_and_key(tmp_path, change, key):
    records = [_counterfact_record(i) for i in range(3)]
    change(records[1])
    path = _write(tmp_path / "cf.json", records)
    with pytest.raises(DatasetFormatError, match=rf"cf\.json, record 1: key '{key}'") as info:
        load_counterfact(path)
    assert (info.value.path, info.value.index, info.value.key) == (path, 1, key)


def test_malformed_file(tmp_path):
    with pytest.raises(DatasetFormatError, match="expected a list"):
        load_counterfact(_write(tmp_path / "cf.json", {"prompt": "x"}))
    with pytest.raises(DatasetFormatError, match="record 0: is a str"):
        load_counterfact(_write(tmp_path / "cf.json", ["not a record"]))
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="not valid"):
        load_counterfact(tmp_path / "broken.json")


def test_zsre_record_without_loc(tmp_path):
    record = {"subject": "NGC 3953", "src": "Which constellation is NGC 3953 in?", "alt": "Triangulum",
              "answers": ["Ursa Major"], "rephrase": "NGC 3953 is in which constellation?",
              "alternative_subject": "UGC 6870", "alter_subject_question": "What constellation is UGC 6870 in?"}
    (case,) = load_zsre(_write(tmp_path / "z.json", [record]), "zsre-subject-replace")
    assert case.locality == () and case.request.target_true == "Ursa Major"
    assert (case.portability[0].group, case.portability[0].target) == ("subject_replace", "Triangulum")


def test_ripple_misspelling_alias_lists_and_skipped_probes(tmp_path):
    record = {
        "subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
        "ground_truth": [["Munich", "München"]],
        "portability": {"Subject_Aliasing": [
            {"prompt": "The place of death of Martin Leo Arons is", "ground_truth": [["Berlin", "Berlin, Germany"]]},
            {"prompt": "", "ground_truth": "Berlin"},
            {"prompt": "Where did Leo Arons die?", "ground_truth": []},
        ]},
        "locality": {"Relation_Specifity": [{"prompt": "The occupation of Leo Arons is",
                                              "ground_truth": [["politician", "pol"], ["physicist"]]}]},
    }
    (case,) = load_ripple(_write(tmp_path / "r.json", [record]), "ripple-test")
    assert case.request.target_true == "Munich"
    assert [(p.group, p.target, p.aliases) for p in case.generality] == [
        ("Subject_Aliasing", "Berlin", ("Berlin, Germany",))
    ]
    assert [(p.group, p.target, p.aliases) for p in case.locality] == [
        ("Relation_Specificity", "politician", ("pol", "physicist"))
    ]
    assert case.meta["skipped_probes"] == 2
    record["locality"]["Relation_Specifity"][0]["ground_truth"] = [[1]]
    with pytest.raises(DatasetFormatError, match=r"record 0: key 'locality.Relation_Specifity\[0\].ground_truth'"):
        load_ripple(_write(tmp_path / "r.json", [record]))
