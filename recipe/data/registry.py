"""The dataset registry: name -> loader, files (relative to the data folder) and where to get them.

The data folder comes from the caller (``--data-dir``) or the ``RECIPE_DATA_DIR`` environment variable;
nothing is ever downloaded. Every file may also be stored xz-compressed as ``<name>.xz``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from recipe.data.common import DataDirError, DatasetNotFoundError, UnknownDatasetError, find_file
from recipe.data.counterfact import load_counterfact, load_counterfact_rome
from recipe.data.demo import load_demo
from recipe.data.mquake import load_mquake
from recipe.data.ripple import load_ripple
from recipe.data.wikitext import load_wikitext_file
from recipe.data.zsre import load_zsre
from recipe.data.zsre_knowedit import load_zsre_knowedit, load_zsre_train
from recipe.errors import RecipeError
from recipe.types import EditCase

DATA_DIR_ENV = "RECIPE_DATA_DIR"


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one named dataset: ``load(*resolved_files, dataset=name, limit=limit)``."""

    name: str
    load: Callable[..., list[EditCase]]
    description: str
    files: tuple[str, ...]  # relative to the data folder; () for data shipped with recipe
    source: str  # where to obtain the files

    @property
    def path(self) -> str | None:
        """The main file, relative to the data folder (None when the data ships with the package)."""
        return self.files[0] if self.files else None


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


_KNOWEDIT = "Hugging Face dataset zjunlp/KnowEdit (also in the Zijian007/EasyEdit fork, data/benchmark/)"
_ZSRE_EVAL = "zsre/zsre_mend_eval_portability_gpt4.json"
_ZSRE_EVAL_SOURCE = (
    "EasyEdit's zsre_mend_eval_portability_gpt4.json, e.g. JasonForJoy/Model-Editing-Hurt@82614b04 edited-data/"
)
_ZSRE_KNOWEDIT_SOURCE = f"{_KNOWEDIT}: ZsRE/ZsRE-test-all.json"
_PORTABILITY = (
    "EasyEdit portability data, e.g. 5456es/Edit_Evaluation@2a353b11 "
    "Method_Test/data/Datasets_for_Factual_Knowledge/data/portability/"
)
_RECIPE = "qizhou000/RECIPE data/"
_ROME_COUNTERFACT = "https://rome.baulab.info/data/dsets/counterfact.json (sha256 d0170561…, 45,108,470 bytes)"
_MQUAKE = "princeton-nlp/MQuAKE, datasets/"

for _spec in (
    DatasetSpec("zsre", load_zsre, "zsRE evaluation, 1,037 MEND-layout records with portability questions",
                (_ZSRE_EVAL,), _ZSRE_EVAL_SOURCE),
    DatasetSpec("zsre-mend-eval", load_zsre, "zsRE evaluation split of MEND/ROME (about 19k records)",
                ("zsre/zsre_mend_eval.json",), _RECIPE + "evaluation/zsre/zsre_mend_eval.json"),
    DatasetSpec("zsre-mend-train", load_zsre, "zsRE training split of MEND/ROME",
                ("zsre/zsre_mend_train.json",), _RECIPE + "meta-train/zsre/zsre_mend_train.json"),
    DatasetSpec("zsre-knowedit", load_zsre_knowedit, "KnowEdit zsRE test, 1,301 records with locality/portability",
                ("zsre/ZsRE-test-all.json",), _ZSRE_KNOWEDIT_SOURCE),
    DatasetSpec("zsre-train", load_zsre_train, "KnowEdit zsRE records sharing no question and no subject with `zsre`",
                ("zsre/ZsRE-test-all.json", _ZSRE_EVAL), f"{_ZSRE_KNOWEDIT_SOURCE}; and {_ZSRE_EVAL_SOURCE}"),
    DatasetSpec("zsre-inverse-relation", load_zsre, "zsRE edits with an inverse-relation question (portability)",
                ("zsre/zsre_inverse_relation.json",), _PORTABILITY + "Inverse Relation/"),
    DatasetSpec("zsre-subject-replace", load_zsre, "zsRE edits asked again about a subject alias (portability)",
                ("zsre/zsre_subject_replace.json",), _PORTABILITY + "Subject Replace/"),
    DatasetSpec("counterfact", load_counterfact, "CounterFact edit split of RECIPE/EasyEdit, 10,000 records",
                ("counterfact/counterfact-edit.json",), _RECIPE + "evaluation/cf/counterfact-edit.json"),
    DatasetSpec("counterfact-train", load_counterfact, "CounterFact train split of RECIPE/EasyEdit, 10,000 records",
                ("counterfact/counterfact-train.json",), _RECIPE + "meta-train/cf/counterfact-train.json"),
    DatasetSpec("counterfact-rome", load_counterfact_rome, "ROME's full CounterFact, 21,919 records",
                ("counterfact/counterfact.json",), _ROME_COUNTERFACT),
    DatasetSpec("ripple-recent-test", load_ripple, "RippleEdits RECENT as KnowEdit wiki_recent test, 1,266 records",
                ("rippleedits/knowedit/recent_test.json",), f"{_KNOWEDIT}: wiki_recent/recent_test.json"),
    DatasetSpec("ripple-recent-train", load_ripple, "RippleEdits RECENT as KnowEdit wiki_recent train, 570 records",
                ("rippleedits/knowedit/recent_train.json",), f"{_KNOWEDIT}: wiki_recent/recent_train.json"),
    DatasetSpec("ripple-cf-train", load_ripple, "RippleEdits POPULAR as KnowEdit wiki_counterfact train, 1,427 records",
                ("rippleedits/knowedit/train_cf.json",), f"{_KNOWEDIT}: wiki_counterfact/train_cf.json"),
    DatasetSpec("ripple-cf-test", load_ripple, "RippleEdits POPULAR as KnowEdit wiki_counterfact test, 839 records",
                ("rippleedits/knowedit/test_cf.json",), f"{_KNOWEDIT}: wiki_counterfact/test_cf.json"),
    DatasetSpec("mquake-hard", load_mquake, "MQuAKE-hard, 429 cases with 4 edits each",
                ("mquake/MQuAKE-hard.json",), "wangywUST/DeepEdit datasets/MQuAKE-hard.json"),
    DatasetSpec("mquake-cf-3k", load_mquake, "MQuAKE-CF-3k, 3,000 cases",
                ("mquake/MQuAKE-CF-3k.json",), _MQUAKE + "MQuAKE-CF-3k.json"),
    DatasetSpec("mquake-cf-3k-v2", load_mquake, "MQuAKE-CF-3k-v2, 3,000 cases",
                ("mquake/MQuAKE-CF-3k-v2.json",), _MQUAKE + "MQuAKE-CF-3k-v2.json"),
    DatasetSpec("mquake-cf", load_mquake, "MQuAKE-CF, 9,218 cases",
                ("mquake/MQuAKE-CF.json",), _MQUAKE + "MQuAKE-CF.json"),
    DatasetSpec("mquake-t", load_mquake, "MQuAKE-T (temporal edits)",
                ("mquake/MQuAKE-T.json",), _MQUAKE + "MQuAKE-T.json"),
    DatasetSpec("demo", load_demo, "32 hand-written counterfactual edits shipped with recipe (no data folder needed)",
                (), "shipped with recipe (recipe/data/demo.json)"),
):
    register_dataset(_spec)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir`` if given, else ``$RECIPE_DATA_DIR``; it must be an existing folder."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        raise DataDirError(
            f"no data folder given: pass --data-dir (data_dir=...) or set {DATA_DIR_ENV} to the folder that holds "
            "zsre/, counterfact/, rippleedits/, mquake/, wikitext/. Nothing is downloaded; "
            "recipe.data.DATASETS[name].source says where to get each file."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataDirError(f"data folder {path} does not exist or is not a folder")
    return path


def is_dataset_file(name: str) -> bool:
    """True when ``name`` is no registered dataset but names a file (a path or a ``.json`` name)."""
    return name not in DATASETS and (Path(name).expanduser().is_file() or name.endswith((".json", ".json.xz")))


def load_dataset(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[EditCase]:
    """The ``EditCase``s of the registered dataset ``name``, or of a JSON file in a supported layout
    (:mod:`recipe.data.formats`); the first ``limit`` of them when given."""
    if limit is not None and limit < 0:
        raise RecipeError(f"limit must be >= 0, got {limit}")
    if is_dataset_file(name):
        from recipe.data.formats import load_dataset_file

        return load_dataset_file(name, limit)
    if name not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))} "
                                  "(or the path of a JSON file in a supported format, see recipe.data.formats)")
    spec = DATASETS[name]
    paths = []
    if spec.files:
        root = resolve_data_dir(data_dir)
        paths = [find_file(root, relative, spec.source) for relative in spec.files]
    return spec.load(*paths, dataset=name, limit=limit)


def dataset_present(name: str, data_dir: str | Path | None = None) -> bool:
    """True when every file of the registered dataset ``name`` is in the data folder (always for shipped data)."""
    spec = DATASETS[name]
    if not spec.files:
        return True
    try:
        root = resolve_data_dir(data_dir)
    except DataDirError:
        return False
    try:
        return all(find_file(root, relative) for relative in spec.files)
    except DatasetNotFoundError:
        return False


def load_wikitext(data_dir: str | Path | None = None, split: str = "test", min_words: int = 10) -> list[str]:
    """Paragraphs of WikiText-2 ``split`` ("test": raw text; "valid": tokenized with ``<unk>``), headings dropped."""
    return load_wikitext_file(resolve_data_dir(data_dir), split, min_words)
