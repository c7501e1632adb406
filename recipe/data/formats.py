"""A user's own dataset file: its format is told by the keys of its first record.

    >>> load_dataset_file("my-edits.json")     # a JSON list (or .json.xz) in any layout below

Supported layouts (the loaders' docstrings show a record of each), tried in this order:
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

from recipe.data.common import DatasetFormatError, DatasetNotFoundError, read_json_list
from recipe.data.counterfact import load_counterfact, load_counterfact_rome
from recipe.data.mquake import load_mquake
from recipe.data.ripple import load_ripple
from recipe.data.zsre import load_zsre
from recipe.data.zsre_knowedit import load_zsre_knowedit
from recipe.types import EditCase


class FileFormat(NamedTuple):
    name: str
    keys: frozenset[str]  # every record of this layout has these keys
    load: Callable[..., list[EditCase]]  # load(path, dataset=..., limit=...)
    description: str


FILE_FORMATS = (
    FileFormat("zsre", frozenset({"src", "alt", "subject"}), load_zsre, "zsRE, MEND/ROME layout (src, alt, rephrase, loc)"),
    FileFormat("counterfact-rome", frozenset({"requested_rewrite", "paraphrase_prompts"}), load_counterfact_rome,
               "CounterFact, ROME layout (requested_rewrite, paraphrase_prompts, neighborhood_prompts)"),
    FileFormat("mquake", frozenset({"requested_rewrite", "questions"}), load_mquake,
               "MQuAKE (requested_rewrite list, questions, new_answer)"),
    FileFormat("counterfact", frozenset({"prompt", "subject", "target_new", "rephrase_prompt", "locality_prompt"}),
               load_counterfact, "CounterFact, EasyEdit layout (prompt, target_new, rephrase_prompt, locality_prompt)"),
    FileFormat("zsre-knowedit", frozenset({"prompt", "subject", "target_new", "rephrase_prompt", "locality"}),
               load_zsre_knowedit, "KnowEdit zsRE (prompt, target_new, rephrase_prompt, locality, portability)"),
    FileFormat("ripple", frozenset({"prompt", "subject", "target_new", "portability"}), load_ripple,
               "KnowEdit RippleEdits (prompt, target_new, portability / locality groups)"),
)
__doc__ += "".join(f"\n- ``{f.name}``: {f.description}" for f in FILE_FORMATS) + "\n"


def detect_format(path: str | Path) -> FileFormat:
    """The first of :data:`FILE_FORMATS` whose keys the file's first record has."""
    records = read_json_list(Path(path))
    if not records or not isinstance(records[0], dict):
        raise DatasetFormatError(path, None, None, "holds no records (expected a JSON list of objects)")
    keys = set(records[0])
    for fmt in FILE_FORMATS:
        if fmt.keys <= keys:
            return fmt
    known = "; ".join(f"{f.name}: {', '.join(sorted(f.keys))}" for f in FILE_FORMATS)
    raise DatasetFormatError(path, 0, None, f"has keys {sorted(keys)}, which match no supported format. "
                                            f"Supported formats and the keys each needs: {known}")


def load_dataset_file(path: str | Path, limit: int | None = None) -> list[EditCase]:
    """The ``EditCase``s of a user's file in any supported layout; case ids start with the file's stem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(path)
    return detect_format(path).load(path, dataset=path.name.split(".")[0], limit=limit)
