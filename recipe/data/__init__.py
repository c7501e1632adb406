"""Dataset loaders: one module per file format, each turning records into ``EditCase``s; never downloads.

    >>> cases = load_dataset("counterfact", data_dir="path/to/data", limit=100)
    >>> cases[0].request.prompt, cases[0].request.target_new
    ('The mother tongue of Danielle Darrieux is', 'English')

``DATASETS`` lists every name with its files and where to get them; ``load_dataset("demo")`` needs no
data folder. Case ids are ``"<dataset name>/<id>"``.
"""
from recipe.data.common import DataDirError, DatasetFormatError, DatasetNotFoundError, UnknownDatasetError
from recipe.data.counterfact import load_counterfact, load_counterfact_rome
from recipe.data.demo import load_demo
from recipe.data.mquake import load_mquake
from recipe.data.registry import DATASETS, DatasetSpec, load_dataset, load_wikitext, register_dataset, resolve_data_dir
from recipe.data.ripple import load_ripple
from recipe.data.zsre import load_zsre
from recipe.data.zsre_knowedit import load_zsre_knowedit, load_zsre_train, zsre_overlap
from recipe.errors import RecipeError

__all__ = [
    "DATASETS",
    "DataDirError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "RecipeError",
    "UnknownDatasetError",
    "load_counterfact",
    "load_counterfact_rome",
    "load_dataset",
    "load_demo",
    "load_mquake",
    "load_ripple",
    "load_wikitext",
    "load_zsre",
    "load_zsre_knowedit",
    "load_zsre_train",
    "register_dataset",
    "resolve_data_dir",
    "zsre_overlap",
]
