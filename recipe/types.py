"""Typed edit requests and evaluation cases: frozen dataclasses, never dicts.

An ``EditRequest`` is one fact to write ("The mother tongue of Danielle Darrieux is" -> "English").
An ``EditCase`` is what a dataset gives for evaluation: one or more requests (MQuAKE cases carry
several) plus the probes that score them (paraphrases, locality prompts, portability prompts).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

EditId = int


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def normalize_text(text: str) -> str:
    """``text`` in one canonical spelling: NFC, without control or invisible format characters
    (zero-width spaces, joiners, BOM), whitespace runs collapsed to one space, no space at the ends."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(c for c in text if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
    return " ".join(text.split())


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model: after the edit, ``prompt`` should continue with ``target_new``.

    ``subject`` is the entity the fact is about; methods that locate the subject's tokens (ROME,
    MEMIT) need it to occur in ``prompt``. ``target_true`` is the old answer, when known. Every text
    is stored normalised (:func:`normalize_text`), so requests that differ only in spacing, invisible
    characters or Unicode composition are equal, and one of them is caught as a duplicate.
    """

    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "target_new", "subject"):
            value = getattr(self, name)
            if value is None and name == "subject":
                continue
            value = normalize_text(_check_text(value, f"EditRequest.{name}"))
            if not value:
                raise ValueError(f"EditRequest.{name} holds only invisible characters")
            object.__setattr__(self, name, value)
        if isinstance(self.target_true, str):  # informational: an empty old answer is no answer
            object.__setattr__(self, "target_true", normalize_text(self.target_true) or None)

    @property
    def statement(self) -> str:
        """The knowledge statement RECIPE encodes: prompt + " " + target_new."""
        return f"{self.prompt} {self.target_new}"


@dataclass(frozen=True)
class Probe:
    """A prompt with the answer it is scored against.

    ``target`` is the text teacher-forced scoring uses; ``aliases`` are further answers that count
    as an exact match under free generation. ``group`` names the sub-metric the probe belongs to
    (e.g. "rephrase", "Logical_Generalization", "Relation_Specificity").
    """

    prompt: str
    target: str
    group: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_text(self.prompt, "Probe.prompt")
        _check_text(self.target, "Probe.target")

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.target, *self.aliases)


@dataclass(frozen=True)
class EditCase:
    """One evaluation unit of a dataset.

    - ``requests``: the edits to apply (one for zsRE/CounterFact/RippleEdits, several for MQuAKE).
    - ``generality``: probes whose answer should become the new target (paraphrases, multi-hop questions).
    - ``locality``: probes whose answer should NOT change (scored against the unedited model).
    - ``portability``: further probes with dataset-given answers (reasoning, aliasing, ...), reported
      per ``Probe.group``.
    """

    case_id: str
    dataset: str
    requests: tuple[EditRequest, ...]
    generality: tuple[Probe, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"EditCase {self.case_id!r} of {self.dataset!r} has no edit request")

    @property
    def request(self) -> EditRequest:
        """The single request of a one-edit case."""
        if len(self.requests) != 1:
            raise ValueError(f"EditCase {self.case_id!r} holds {len(self.requests)} requests, not one")
        return self.requests[0]
