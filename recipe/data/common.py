"""What every dataset loader shares: the errors, reading (xz-)JSON, typed record access, probe building.

Loaders never download: a missing file is a ``DatasetNotFoundError`` that says where to get it, and a
record that does not have the expected shape is a ``DatasetFormatError`` naming file, index and key.
"""
from __future__ import annotations

import json
import lzma
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from recipe.errors import RecipeError, UnknownNameError
from recipe.types import EditCase, EditRequest, Probe


class DataDirError(RecipeError):
    """No data folder was given, or the one given does not exist."""


class UnknownDatasetError(UnknownNameError, ValueError):
    """A dataset name that is not in the registry."""


class DatasetNotFoundError(RecipeError, FileNotFoundError):
    """A dataset file is missing; the message names the path looked for and where to obtain it."""

    def __init__(self, path: Path, source: str = ""):
        self.path = Path(path)
        hint = f" Get it from: {source}" if source else ""
        super().__init__(f"dataset file not found: {self.path} (also tried {self.path.name}.xz).{hint}")


class DatasetFormatError(RecipeError, ValueError):
    """A record lacks a key or holds a value of the wrong type."""

    def __init__(self, path: Path | str, index: int | None, key: str | None, problem: str):
        self.path, self.index, self.key = Path(path), index, key
        where = str(self.path) if index is None else f"{self.path}, record {index}"
        what = f"key {key!r} " if key else ""
        super().__init__(f"{where}: {what}{problem}")


def find_file(data_dir: Path, relative: str, source: str = "") -> Path:
    """``data_dir/relative``, or the same with ``.xz`` appended (how the shared copy stores big files)."""
    path = Path(data_dir) / relative
    for candidate in (path, path.with_name(path.name + ".xz")):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(path, source)


def read_text(path: Path) -> str:
    """The text of ``path``; ``*.xz`` files are decompressed. Line endings are kept as stored."""
    opener = lzma.open if Path(path).suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return f.read()


def read_json_list(path: Path) -> list:
    """A JSON file whose top level is a list of records."""
    try:
        value = json.loads(read_text(path))
    except (json.JSONDecodeError, lzma.LZMAError, UnicodeDecodeError) as err:
        raise DatasetFormatError(path, None, None, f"is not valid (xz-compressed) JSON: {err}") from err
    if not isinstance(value, list):
        raise DatasetFormatError(path, None, None, f"top level is a {type(value).__name__}, expected a list")
    return value


_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer"}


class Record:
    """Typed access to one JSON object; every error names the file, the record index and the key path."""

    def __init__(self, value: object, path: Path, index: int, prefix: str = ""):
        self.path, self.index, self.prefix = path, index, prefix
        if not isinstance(value, dict):
            raise self.error(None, f"is a {type(value).__name__}, expected a JSON object")
        self.value: dict[str, Any] = value

    def error(self, key: str | None, problem: str) -> DatasetFormatError:
        return DatasetFormatError(self.path, self.index, self._key(key) if key else self.prefix or None, problem)

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def has(self, key: str) -> bool:
        return self.value.get(key) is not None

    def get(self, key: str, kind: type, *, required: bool = True) -> Any:
        """``value[key]`` checked to be of ``kind``; a missing optional key (or null) gives None."""
        if key not in self.value or self.value[key] is None:
            if required:
                raise self.error(key, "is missing")
            return None
        item = self.value[key]
        if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
            raise self.error(key, f"is a {type(item).__name__}, expected {_TYPE_NAMES.get(kind, kind.__name__)}")
        return item

    def text(self, key: str) -> str:
        """A required, non-empty string."""
        item = self.get(key, str)
        if not item.strip():
            raise self.error(key, "is empty")
        return item

    def optional_text(self, key: str) -> str | None:
        """A string if present and non-empty, else None (a present non-string is still an error)."""
        item = self.get(key, str, required=False)
        return item if item and item.strip() else None

    def child(self, key: str) -> Record:
        return Record(self.get(key, dict), self.path, self.index, self._key(key))

    def children(self, key: str, *, required: bool = True) -> list[Record]:
        """A list of JSON objects (empty when an optional key is absent)."""
        items = self.get(key, list, required=required) or []
        return [Record(item, self.path, self.index, f"{self._key(key)}[{i}]") for i, item in enumerate(items)]

    def answers(self, key: str, *, required: bool = True) -> list[str]:
        """Answers given as a string, a list of strings, or a list of alias lists, flattened in order.

        The first alias of the first answer comes first; empty strings and repeats are dropped.
        """
        item = self.value.get(key)
        if item is None:
            if required:
                raise self.error(key, "is missing")
            return []
        flat: list[str] = []
        for part in item if isinstance(item, list) else [item]:
            for alias in part if isinstance(part, list) else [part]:
                if not isinstance(alias, str):
                    raise self.error(key, f"holds a {type(alias).__name__}, expected strings or lists of strings")
                if alias.strip() and alias not in flat:
                    flat.append(alias)
        return flat


def knowedit_request(record: "Record") -> EditRequest:
    """The edit of a KnowEdit-layout record (zsRE and the RippleEdits-derived files share it)."""
    truths = record.answers("ground_truth", required=False)
    return EditRequest(
        prompt=record.text("prompt"),
        target_new=record.text("target_new"),
        subject=record.text("subject"),
        target_true=truths[0] if truths else None,
    )


@dataclass
class ProbeSet:
    """Collects the probes of one case; probes with an empty prompt or no answer are counted, not kept."""

    generality: list[Probe] = field(default_factory=list)
    locality: list[Probe] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)
    skipped: int = 0

    def add(self, kind: str, prompt: str | None, answers: str | list[str] | None, group: str) -> None:
        """Append a probe to ``kind`` ("generality", "locality" or "portability")."""
        answers = [answers] if isinstance(answers, str) else [a for a in answers or [] if a and a.strip()]
        if not prompt or not prompt.strip() or not answers or not answers[0].strip():
            self.skipped += 1
            return
        aliases = tuple(a for a in dict.fromkeys(answers[1:]) if a != answers[0])
        getattr(self, kind).append(Probe(prompt=prompt, target=answers[0], group=group, aliases=aliases))

    def case_fields(self) -> dict:
        """The probe fields of an ``EditCase``."""
        return {
            "generality": tuple(self.generality),
            "locality": tuple(self.locality),
            "portability": tuple(self.portability),
        }


def convert(path: Path, limit: int | None, to_case: Callable[[Record], EditCase]) -> list[EditCase]:
    """Apply ``to_case`` to the first ``limit`` records of a JSON list file.

    A ``TypeError``/``ValueError`` raised while building the dataclasses (e.g. an empty target) becomes a
    ``DatasetFormatError`` naming the record.
    """
    records = read_json_list(path)
    cases = []
    for index, value in enumerate(records if limit is None else records[:limit]):
        record = Record(value, path, index)
        try:
            cases.append(to_case(record))
        except DatasetFormatError:
            raise
        except (TypeError, ValueError) as err:
            raise DatasetFormatError(path, index, None, str(err)) from err
    return cases
