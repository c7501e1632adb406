"""Knowledge statements as RECIPE stores them: normalised text, a bounded length, one record per edit.

A statement (``prompt + " " + target_new``) is both the text the knowledge encoder turns into a key
and, in "vectors+statement" mode, LM tokens inside every prefix that retrieves it. So it is checked
once, at edit time and when a saved repository is loaded:

- invisible and control characters are normalised (:func:`normalise_statement`): format characters
  (zero-width spaces, joiners, BOM, bidirectional controls) are dropped and control whitespace becomes
  a space, so padding a known fact with zero-width spaces gives that same fact, not a new entry;
- its length in LM tokens is bounded (:func:`check_statement_length`), so that prefix + statement +
  question fits well inside the LM's context and no stored entry can make a query fail. A longer
  statement is refused with a ``StatementError`` (a ``ValueError``) and the edit changes nothing; a
  saved repository or state holding one is refused at load, as a whole and changing nothing (a larger
  ``max_statement_tokens`` loads it), never truncated: a cut statement would no longer match its key.

Statements loaded from a saved repository are not re-normalised: their keys were computed from the
text as saved.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from recipe.errors import RecipeError
from recipe.types import EditId

if TYPE_CHECKING:
    from recipe.lm import EditedLM

DEFAULT_SEPARATOR = "\n"  # after the statement in a "vectors+statement" prefix (artefacts without the key: "")
_CONTROL_WHITESPACE = frozenset("\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85")


class StatementError(RecipeError, ValueError):
    """A knowledge statement that cannot be stored: empty, or longer than the configured bound."""


@dataclass(frozen=True)
class EditRecord:
    """One stored RECIPE edit. Its key and prompt vectors live in the repository under ``id``."""

    id: EditId
    statement: str  # normalised knowledge statement (the retrieval key's text)
    token_ids: tuple[int, ...] | None  # the statement's LM tokens in the prefix; None in "vectors" mode
    subject: str | None = None  # the entity the edit is about, where the request named one
    question: str | None = None  # the prompt's question key (recipe.retrieval.updates); None: saved without one
    superseded_by: EditId | None = None  # the edit that restated this fact; None: in use


def normalise_statement(text: str) -> str:
    """``text`` without format characters (Unicode category Cf: zero-width space/joiners, BOM, bidi
    controls) and other control characters; control whitespace (tab, newline, ...) becomes a space.
    Text without such characters comes back unchanged."""
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in _CONTROL_WHITESPACE:
            out.append(" ")
        elif category not in ("Cf", "Cc"):
            out.append(ch)
    return "".join(out)


def statement_token_ids(lm: EditedLM, statement: str, separator: str = DEFAULT_SEPARATOR) -> list[int]:
    """The LM's tokens of a knowledge statement as it appears inside a "vectors+statement" prefix.

    ``separator`` ends the statement before the query starts. Without one the statement runs into
    the question ("...is EnglishThe mother tongue of...") and the frozen LM copies far less: with
    the first shipped checkpoint (trained without it) and the right entry given, zsRE reliability /
    generality were 0.752 / 0.728 without and 0.969 / 0.928 with "\\n" (150 seeded edits).
    """
    return lm.tokenizer(statement + separator, add_special_tokens=False).input_ids


def statement_token_bound(lm: EditedLM, n_vectors: int, max_statement_tokens: int) -> int:
    """The longest statement (in LM tokens, separator included) an editor stores: the configured bound,
    and at most half of what the LM's context leaves after the prompt vectors (the other half is the
    question's and the generated answer's)."""
    return min(max_statement_tokens, (lm.max_length - n_vectors) // 2)


def check_statement_length(statement: str, n_tokens: int, bound: int, where: str = "") -> None:
    """StatementError when a statement of ``n_tokens`` LM tokens exceeds ``bound``."""
    if n_tokens > bound:
        raise StatementError(f"{where}knowledge statement of {n_tokens} LM tokens exceeds the bound of {bound} "
                             f"(max_statement_tokens, at most half the LM's context): {statement[:80]!r}...")


def make_records(lm: EditedLM, ids: Sequence[EditId], statements: Sequence[str], subjects: Sequence[str | None],
                 *, separator: str, with_tokens: bool, bound: int, where: str = "",
                 questions: Sequence[str | None] | None = None,
                 superseded_by: Sequence[EditId | None] | None = None) -> list[EditRecord]:
    """Checked records of (normalised) statements: StatementError on an empty or too long one.

    The length is measured on the tokens the prefix carries (statement + separator), whether or not
    this mode puts them there, so that switching modes never meets a stored entry over the bound."""
    records = []
    questions = [None] * len(ids) if questions is None else questions
    superseded_by = [None] * len(ids) if superseded_by is None else superseded_by
    for edit_id, statement, subject, question, newer in zip(ids, statements, subjects, questions, superseded_by):
        if not isinstance(statement, str) or not statement.strip():
            raise StatementError(f"{where}refusing an empty or non-text knowledge statement: {statement!r}")
        tokens = statement_token_ids(lm, statement, separator)
        check_statement_length(statement, len(tokens), bound, where)
        records.append(EditRecord(edit_id, statement, tuple(tokens) if with_tokens else None, subject, question, newer))
    return records


def check_entries(entries: Mapping, version: int, where: str) -> tuple[list, list, dict[str, list]]:
    """The saved edit lists of a RECIPE save (``ids``, ``statements``, then ``subjects``, ``questions``,
    ``superseded_by`` as keyword fields of :func:`make_records`), checked: RecipeError on a version
    other than 1 (no questions nor supersessions) and ``version``, lists of unequal lengths, bad ids,
    a ``next_id`` not above them, non-text subjects or questions, one statement in use twice, or a
    chain of supersessions that does not end at an edit in use."""
    ids, statements, next_id = entries.get("ids"), entries.get("statements"), entries.get("next_id")
    saved_version = entries.get("entries_version", 1)
    if saved_version not in (1, version) or isinstance(saved_version, bool):
        raise RecipeError(f"{where}: entries version {saved_version!r}; this recipe reads 1 and {version}")
    n = len(ids) if isinstance(ids, list) else 0
    fields = {name: entries.get(name) if saved_version > 1 or name == "subjects" else [None] * n
              for name in ("subjects", "questions", "superseded_by")}
    fields["subjects"] = [None] * n if fields["subjects"] is None else fields["subjects"]  # older saves
    if not all(isinstance(v, list) and len(v) == n for v in (ids, statements, *fields.values())):
        raise RecipeError(f"{where}: ids, statements, subjects, questions and superseded_by must be lists of one length")
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise RecipeError(f"{where}: edit ids must be distinct non-negative ints, got {ids[:10]}")
    if not isinstance(next_id, int) or isinstance(next_id, bool) or next_id <= max(ids, default=-1):
        raise RecipeError(f"{where}: next_id {next_id!r} must be an int above every saved id (the largest is "
                          f"{max(ids, default=None)}); later edits would reuse ids")
    if any(not (s is None or isinstance(s, str)) for s in fields["subjects"] + fields["questions"]):
        raise RecipeError(f"{where}: subjects and questions must be text or null")
    in_use = [s for s, newer in zip(statements, fields["superseded_by"]) if newer is None]
    if len(set(map(str, in_use))) != len(in_use):
        raise RecipeError(f"{where}: no statement may be in use twice")
    check_chains(dict(zip(ids, fields["superseded_by"])), where)
    return ids, statements, fields


def check_chains(superseded_by: Mapping[EditId, EditId | None], where: str) -> None:
    """RecipeError unless every superseded entry's chain of successors ends at an entry in use."""
    for start, newer in superseded_by.items():
        seen = {start}
        while newer is not None:
            if not isinstance(newer, int) or isinstance(newer, bool) or newer not in superseded_by or newer in seen:
                raise RecipeError(f"{where}: edit {start} is superseded by {newer!r}, which is "
                                  f"{'part of a cycle' if newer in seen else 'not a saved edit'}")
            seen.add(newer)
            newer = superseded_by[newer]
