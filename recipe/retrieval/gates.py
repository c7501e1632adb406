"""Acceptance gates: whether a query uses its top-1 repository entry at all.

RECIPE retrieves the top-1 entry for every query; gates then decide, one after the other, which of
those matches are used. Each gate sees the candidates and the flags the gates before it left, and
returns new flags (it only ever turns a match down, except where its own rule says otherwise) plus
per-query diagnostics that end up in ``RecipeEditor.last_retrieval``:

- :class:`SentinelGate`: ``s(q, k) > s(q, r_s) + margin`` (the Knowledge Sentinel, RECIPE sec. 3.3);
- :class:`VerifierGate`: a cross-encoder's ``p(entry bears on query) > threshold``, asked only for the
  matches still accepted;
- :class:`SubjectGate`: the entry's edit names a subject that the query does not mention
  (case-insensitive): turned down, unless a verifier is sure (``p > bypass``).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor

from recipe.retrieval.sentinel import KnowledgeSentinel
from recipe.retrieval.statements import EditRecord
from recipe.retrieval.verifier import EditVerifier


@dataclass(frozen=True)
class Candidates:
    """Each query's top-1 repository entry."""

    queries: Sequence[str]
    query_keys: Tensor  # (b, D) r_q
    scores: Tensor  # (b,) s(q, k) of the top-1 entry
    records: Sequence[EditRecord]  # the top-1 entries

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class GateResult:
    """A gate's accept flag per query, and its diagnostics (name -> one value per query)."""

    accept: list[bool]
    diagnostics: dict[str, list] = field(default_factory=dict)


class Gate(abc.ABC):
    """One acceptance rule."""

    @abc.abstractmethod
    def __call__(self, candidates: Candidates, accept: list[bool], diagnostics: dict[str, list]) -> GateResult:
        """New flags from ``accept`` (the flags so far) and the earlier gates' ``diagnostics``."""


class SentinelGate(Gate):
    """The Knowledge Sentinel: diagnostics ``threshold`` = s(q, r_s) per query."""

    def __init__(self, sentinel: KnowledgeSentinel, margin: float = 0.0):
        self.sentinel, self.margin = sentinel, margin

    def __call__(self, candidates, accept, diagnostics) -> GateResult:
        thresholds = self.sentinel(candidates.query_keys)  # (b,)
        passed = self.sentinel.accept(candidates.scores, candidates.query_keys, self.margin).tolist()  # (b,)
        return GateResult([a and p for a, p in zip(accept, passed)], {"threshold": thresholds.tolist()})


class VerifierGate(Gate):
    """The verifier's veto: diagnostics ``verified`` = p for the matches it was asked about, nan elsewhere."""

    def __init__(self, verifier: EditVerifier, threshold: float):
        self.verifier, self.threshold = verifier, threshold

    def __call__(self, candidates, accept, diagnostics) -> GateResult:
        verified = [math.nan] * len(candidates)
        rows = [i for i, ok in enumerate(accept) if ok]
        if rows:
            p = self.verifier.probability([candidates.queries[i] for i in rows],
                                          [candidates.records[i].statement for i in rows])
            for i, v in zip(rows, p.tolist()):
                verified[i] = v
        return GateResult([ok and v > self.threshold for ok, v in zip(accept, verified)], {"verified": verified})


class SubjectGate(Gate):
    """Use an entry only when its edit's subject occurs in the query; edits without a subject pass.
    Diagnostics ``subject_in_query``: True/False where checked, None where not (turned down already, or
    no subject). ``bypass``: a subject-less match still passes when the verifier's p exceeds it."""

    def __init__(self, bypass: float | None = None):
        self.bypass = bypass

    def __call__(self, candidates, accept, diagnostics) -> GateResult:
        verified = diagnostics.get("verified", [math.nan] * len(candidates))
        named = [subject_in(q, r) if ok else None for q, r, ok in zip(candidates.queries, candidates.records, accept)]
        flags = [ok if n is not False else (self.bypass is not None and v > self.bypass)
                 for ok, n, v in zip(accept, named, verified)]
        return GateResult(flags, {"subject_in_query": named})


def subject_in(query: str, record: EditRecord) -> bool | None:
    """Whether the edit's subject occurs in the query (case-insensitive); None: the edit named no subject."""
    return None if record.subject is None else record.subject.casefold() in query.casefold()


def apply_gates(gates: Sequence[Gate], candidates: Candidates) -> tuple[list[bool], dict[str, list]]:
    """Every gate in turn, starting from "accept all": the final flags and all gates' diagnostics."""
    accept, diagnostics = [True] * len(candidates), {}
    for gate in gates:
        result = gate(candidates, accept, diagnostics)
        accept = result.accept
        diagnostics.update(result.diagnostics)
    return accept, diagnostics
