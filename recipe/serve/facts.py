"""Facts: the edits an editor holds, kept in step with a durable :class:`EditStore`.

Every change runs in three steps: check it, apply it to the editor, append it to the journal (fsync).
Only then is it acknowledged. If the editor refuses, nothing is written; if the journal write fails,
the editor is rebuilt from the store, so memory never holds an edit the disk does not.

**Updates.** A fact stated again with a new answer supersedes the old one: the old entry stops being
used and stays listed with ``status: superseded``; deleting the newer edit makes it active again
(``recipe.retrieval.updates.after_removal``: in a chain A -> B -> C, deleting C brings back B). The
same answer again returns the stored edit. "Stated again" is one rule for every editor:
:func:`recipe.retrieval.updates.question_key` (same prompt up to case, spacing and final punctuation).
An editor that supersedes by itself (RECIPE: ``superseded()``, ``last_superseded``, also its opt-in
retrieval rule) is the authority and the records mirror what it reports; for the others (weight
editors) the store applies the rule, and because they cannot undo single edits they are rolled back
and given the remaining edits again, batch by batch as they first came, whenever an edit leaves.

**Snapshots.** Every ``snapshot_every`` operations the editor's state is captured on the caller's thread
(a consistent point between two operations: RECIPE's repository copy-on-write, other editors' state
dict copied) and written to disk on a background thread, so queries go on while the files are written
and fsynced; one snapshot is written at a time.

Not thread-safe: one caller at a time (the server's worker thread, or ``recipe edit``).
"""
from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from recipe.editors.base import Editor
from recipe.editors.state_file import STATE_FILE, load_state, save_state
from recipe.errors import RecipeError
from recipe.retrieval.updates import after_removal, question_key
from recipe.serve.store import EDITOR_DIR, EditRecord, EditStore, Snapshot
from recipe.types import EditRequest

log = logging.getLogger(__name__)


class UnknownEditError(RecipeError):
    """No stored edit has this id."""


class ConflictError(RecipeError):
    """The change contradicts another stored edit."""


@dataclass(frozen=True)
class Fact:
    """One fact as a client states it."""

    prompt: str
    target_new: str
    subject: str | None = None

    def request(self) -> EditRequest:
        return EditRequest(self.prompt, self.target_new, subject=self.subject)


def _own_copy(value):
    """``value`` with every tensor and array copied: later edits cannot change what a snapshot writes."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _own_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_own_copy(v) for v in value)
    return copy.copy(value)


def _editor_writer(editor: Editor) -> Callable[[Path], object]:
    """``write(directory)`` saving the editor as it is now, safe to call on another thread while it edits:
    its own ``snapshot_writer`` (RECIPE: copy on write, a fraction of a second at 100,000 edits), else
    a copy of its state dict written as a state file."""
    if hasattr(editor, "snapshot_writer"):
        return editor.snapshot_writer()
    state = _own_copy(editor.state_dict())
    return lambda directory: save_state(state, directory)


def _load_editor(editor: Editor, directory: Path) -> None:
    """A snapshot's editor state: a state file (``save_state``), or a folder of the editor's own ``save``."""
    if (directory / STATE_FILE).exists() or not hasattr(editor, "load"):
        editor.load_state_dict(load_state(directory)[0])
    else:
        editor.load(directory)


class Facts:
    """The store's records and the editor's entries, one to one for every record the editor holds."""

    def __init__(self, editor: Editor, store: EditStore, *, snapshot_every: int = 1000):
        self.editor, self.store, self.snapshot_every = editor, store, snapshot_every
        self.records: dict[int, EditRecord] = {}
        self.editor_ids: dict[int, int] = {}  # store id -> the editor's id (active, or superseded inside the editor)
        self.next_id = 1
        self._since_snapshot = 0
        self.can_remove = type(editor).remove is not Editor.remove
        self.editor_supersedes = callable(getattr(editor, "superseded", None))
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recipe-snapshot")
        self._writing: Future | None = None
        self._restore()

    # ---- reading -----------------------------------------------------------------------------
    def get(self, edit_id: int) -> EditRecord:
        if edit_id not in self.records:
            raise UnknownEditError(f"no edit with id {edit_id}")
        return self.records[edit_id]

    def find(self, subject: str | None = None, text: str | None = None, status: str | None = None
             ) -> list[EditRecord]:
        """Records in id order, filtered by subject (exact, case-insensitive), text (substring of prompt
        or target, case-insensitive) and status."""
        out = []
        for r in self.records.values():
            if subject is not None and (r.subject or "").casefold() != subject.casefold():
                continue
            if text is not None and text.casefold() not in f"{r.prompt}\n{r.target_new}".casefold():
                continue
            if status is not None and r.status != status:
                continue
            out.append(r)
        return out

    def active(self) -> list[EditRecord]:
        return [r for r in self.records.values() if r.status == "active"]

    def by_editor_id(self) -> dict[int, int]:
        """The editor's id -> store id, for the audit of each answer."""
        return {e: s for s, e in self.editor_ids.items()}

    # ---- changes -----------------------------------------------------------------------------
    def add(self, facts: Sequence[Fact]) -> list[EditRecord]:
        """Store ``facts`` (all or none); returns one record per fact (the stored one for a repeat)."""
        keys = [question_key(f.prompt) for f in facts]
        if len(set(keys)) != len(keys):
            raise ConflictError("the same prompt occurs twice in one request; send one answer per prompt")
        stored = {question_key(r.prompt): r for r in self.active()}
        new, out = [], []
        for fact, key in zip(facts, keys):
            old = stored.get(key)
            if old is not None and old.target_new.strip() == fact.target_new.strip() and old.subject == fact.subject:
                out.append(old)
                continue
            edit_id = self.next_id + len(new)
            new.append({"id": edit_id, "prompt": fact.prompt, "target_new": fact.target_new, "subject": fact.subject})
            out.append(edit_id)
        if new:
            self._commit({"op": "add", "edits": new})
        return [r if isinstance(r, EditRecord) else self.records[r] for r in out]

    def remove(self, edit_id: int) -> EditRecord:
        record = self.get(edit_id)
        self._commit({"op": "remove", "ids": [edit_id]})
        return record

    def update(self, edit_id: int, fact: Fact) -> EditRecord:
        record = self.get(edit_id)
        if record.status != "active":
            raise ConflictError(f"edit {edit_id} is {record.status}; only active edits can be changed")
        if (record.prompt, record.target_new, record.subject) == (fact.prompt, fact.target_new, fact.subject):
            return record
        key = question_key(fact.prompt)
        clash = [r.id for r in self.active() if r.id != edit_id and question_key(r.prompt) == key]
        if clash:
            raise ConflictError(f"edit {clash[0]} already states this prompt; change or delete that one")
        self._commit({"op": "update", "id": edit_id, "prompt": fact.prompt, "target_new": fact.target_new,
                      "subject": fact.subject})
        return self.records[edit_id]

    def _commit(self, op: dict) -> None:
        """Apply ``op`` to the editor, then journal it; a failed journal write rebuilds from the store."""
        op = {**op, "time": round(time.time(), 3)}
        self._apply(op, self.store.seq + 1)
        try:
            self.store.append(op)
        except BaseException:
            log.exception("journal write failed; restoring the edits from the store")
            self._restore()
            raise
        self._since_snapshot += 1
        if self._since_snapshot >= self.snapshot_every and (self._writing is None or self._writing.done()):
            self.snapshot(wait=False)  # one at a time: while one is written, the next operation asks again

    # ---- applying operations (live and on replay) --------------------------------------------
    def _apply(self, op: dict, seq: int) -> None:
        """Apply one journal operation; an "add" gains ``supersedes`` (old store id -> new) for the audit."""
        kind = op["op"]
        if kind == "add":
            self._apply_add(op, seq)
        elif kind == "remove":
            self._apply_remove(op["ids"])
        elif kind == "update":
            self._apply_update(op, seq)
        else:
            raise RecipeError(f"journal operation {kind!r} is unknown")

    def _apply_add(self, op: dict, seq: int) -> None:
        entries = op["edits"]
        stored = {} if self.editor_supersedes else {question_key(r.prompt): r.id for r in self.active()}
        ids = self.editor.edit([Fact(e["prompt"], e["target_new"], e.get("subject")).request() for e in entries])
        for e, editor_id in zip(entries, ids):  # raised above: nothing changed
            self.records[e["id"]] = EditRecord(e["id"], e["prompt"], e["target_new"], e.get("subject"),
                                               created=op["time"], updated=op["time"], batch=seq)
            self.editor_ids[e["id"]] = editor_id
        self.next_id = max(self.next_id, max(e["id"] for e in entries) + 1)
        if self.editor_supersedes:  # the editor decided; the records mirror it
            to_store = self.by_editor_id()
            newer = {to_store[old]: to_store[new] for new, old in self.editor.last_superseded.items()}
        else:  # the store's rule, decided against the records before this operation
            newer = {stored[k]: e["id"] for e in entries if (k := question_key(e["prompt"])) in stored}
        op["supersedes"] = {str(old): new for old, new in newer.items()}
        for old, new in newer.items():
            self.records[old] = replace(self.records[old], status="superseded", superseded_by=new, updated=op["time"])
        if not self.editor_supersedes:
            self._drop_from_editor(list(newer))

    def _apply_remove(self, ids: list[int]) -> None:
        removed = {i for i in ids if i in self.records}
        if self.editor_supersedes:
            self.editor.remove([self.editor_ids.pop(i) for i in removed if i in self.editor_ids])
            for i in removed:
                del self.records[i]
            self._mirror_editor()
            return
        superseded = {r.id: r.superseded_by for r in self.records.values() if r.status == "superseded"}
        relinked, restore = after_removal(superseded, removed)
        for i in removed:
            del self.records[i]
        for old, newer in relinked.items():
            self.records[old] = replace(self.records[old], superseded_by=newer)
        for old in restore:
            self.records[old] = replace(self.records[old], status="active", superseded_by=None)
        if restore:
            self._reapply()
        else:
            self._drop_from_editor(sorted(removed))

    def _apply_update(self, op: dict, seq: int) -> None:
        record = self.records[op["id"]]
        fact = Fact(op["prompt"], op["target_new"], op.get("subject"))
        new_id = self.editor.edit([fact.request()])[0]
        old_editor_id = self.editor_ids[op["id"]]
        self.editor_ids[op["id"]] = new_id
        self.records[op["id"]] = replace(record, prompt=fact.prompt, target_new=fact.target_new, subject=fact.subject,
                                         updated=op["time"], batch=seq)
        self._remove_from_editor([old_editor_id])
        if self.editor_supersedes:
            self._mirror_editor()

    def _mirror_editor(self) -> None:
        """Records take the superseded / active state the editor reports (it restores and relinks)."""
        to_store = self.by_editor_id()
        superseded = {to_store[old]: to_store[new] for old, new in self.editor.superseded().items()}
        for i, r in self.records.items():
            if i not in self.editor_ids:
                continue  # not held by the editor (superseded in a store written before the editor decided)
            newer = superseded.get(i)
            if r.superseded_by != newer:
                self.records[i] = replace(r, status="active" if newer is None else "superseded", superseded_by=newer)

    def _drop_from_editor(self, ids: list[int]) -> None:
        """Take store ``ids`` out of the editor (their records stay)."""
        self._remove_from_editor([self.editor_ids.pop(i) for i in ids if i in self.editor_ids])

    def _remove_from_editor(self, editor_ids: list[int]) -> None:
        if not editor_ids:
            return
        if self.can_remove:
            self.editor.remove(editor_ids)
        else:
            self._reapply()

    def _reapply(self) -> None:
        """Weight editors: roll back and apply every active record again, batch by batch in order."""
        self.editor.rollback()
        batches: dict[int, list[EditRecord]] = {}
        for r in sorted(self.active(), key=lambda r: r.id):
            batches.setdefault(r.batch, []).append(r)
        self.editor_ids = {}
        for _, group in sorted(batches.items()):
            ids = self.editor.edit([Fact(r.prompt, r.target_new, r.subject).request() for r in group])
            self.editor_ids.update({r.id: e for r, e in zip(group, ids)})

    # ---- persistence -------------------------------------------------------------------------
    def _restore(self) -> None:
        """Bring the editor and records to the store's state: newest snapshot, then the journal after it."""
        self.editor.rollback()
        self.records, self.editor_ids, self.next_id = {}, {}, 1
        snap, after = self.store.load_snapshot(), 0
        if snap is not None and snap.editor == self.editor.name and snap.model == self.editor.lm.spec.name:
            _load_editor(self.editor, snap.path / EDITOR_DIR)
            self.records, self.editor_ids, self.next_id, after = snap.records, snap.editor_ids, snap.next_id, snap.seq
        elif snap is not None:
            log.warning("snapshot made by editor %r on %r; replaying the whole journal for %r on %r",
                        snap.editor, snap.model, self.editor.name, self.editor.lm.spec.name)
        replayed = 0
        for op in self.store.read_journal(after):
            self._apply(op, op["seq"])
            replayed += 1
        self._since_snapshot = replayed
        log.info("store %s: %d active edits (%d journal operations replayed)", self.store.dir,
                 len(self.active()), replayed)

    def snapshot(self, wait: bool = True) -> Future:
        """Snapshot the editor and the records as of the last journal operation: copied now, written by
        the background writer (``wait``: block until it is on disk; an error is raised here)."""
        if self._writing is not None:
            wait_for([self._writing])  # the one before is complete first (its error, if any, was logged)
        snap = Snapshot(self.store.seq, self.next_id, dict(self.records), self.editor.name, self.editor.lm.spec.name,
                        dict(self.editor_ids))
        self._since_snapshot = 0
        self._writing = self._writer.submit(self._write, snap, _editor_writer(self.editor))
        if wait:
            self._writing.result()
        return self._writing

    def _write(self, snap: Snapshot, write_editor: Callable[[Path], object]) -> Path:
        try:
            return self.store.save_snapshot(snap, write_editor)
        except Exception:  # the operations are durable in the journal already; the next operation retries
            log.exception("snapshot of %s failed", self.store.dir)
            self._since_snapshot = self.snapshot_every
            raise

    def close(self) -> None:
        try:
            if self._writing is not None:
                wait_for([self._writing])  # a failed write sets _since_snapshot: written again below
            if self._since_snapshot:
                self.snapshot()
        finally:
            self._writer.shutdown()
            self.store.close()
