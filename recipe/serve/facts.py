"""Facts: the edits an editor holds, kept in step with a durable :class:`EditStore`.

Every change runs in three steps: check it, apply it to the editor, append it to the journal (fsync).
Only then is it acknowledged. If the editor refuses, nothing is written; if the journal write fails,
the editor is rebuilt from the store, so memory never holds an edit the disk does not.

A fact stated again (same :func:`normalise_prompt`) with a new answer supersedes the old one: the old
entry leaves the editor and stays listed with ``status: superseded``. The same answer again returns
the stored edit. Editors that cannot undo single edits (weight editors) are rolled back and given the
remaining edits again, batch by batch as they first came, whenever an edit leaves.

Not thread-safe: one caller at a time (the server's worker thread, or ``recipe edit``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from recipe.editors.base import Editor
from recipe.errors import RecipeError
from recipe.serve.store import EDITOR_DIR, EditRecord, EditStore, Snapshot, normalise_prompt
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


def _save_editor(editor: Editor, directory: Path) -> None:
    if hasattr(editor, "save"):
        editor.save(directory)
    else:
        from recipe.editors.state_file import save_state

        save_state(editor.state_dict(), directory)


def _load_editor(editor: Editor, directory: Path) -> None:
    if hasattr(editor, "load"):
        editor.load(directory)
    else:
        from recipe.editors.state_file import load_state

        editor.load_state_dict(load_state(directory)[0])


class Facts:
    """The store's records and the editor's entries, one to one for every active record."""

    def __init__(self, editor: Editor, store: EditStore, *, snapshot_every: int = 1000):
        self.editor, self.store, self.snapshot_every = editor, store, snapshot_every
        self.records: dict[int, EditRecord] = {}
        self.editor_ids: dict[int, int] = {}  # active store id -> the editor's id
        self.next_id = 1
        self._since_snapshot = 0
        self.can_remove = type(editor).remove is not Editor.remove
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
        keys = [normalise_prompt(f.prompt) for f in facts]
        if len(set(keys)) != len(keys):
            raise ConflictError("the same prompt occurs twice in one request; send one answer per prompt")
        stored = {normalise_prompt(r.prompt): r for r in self.active()}
        new, supersedes, out = [], {}, []
        for fact, key in zip(facts, keys):
            old = stored.get(key)
            if old is not None and old.target_new.strip() == fact.target_new.strip() and old.subject == fact.subject:
                out.append(old)
                continue
            edit_id = self.next_id + len(new)
            new.append({"id": edit_id, "prompt": fact.prompt, "target_new": fact.target_new, "subject": fact.subject})
            out.append(edit_id)
            if old is not None:
                supersedes[str(old.id)] = edit_id
        if new:
            self._commit({"op": "add", "edits": new, "supersedes": supersedes})
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
        key = normalise_prompt(fact.prompt)
        clash = [r.id for r in self.active() if r.id != edit_id and normalise_prompt(r.prompt) == key]
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
        if self._since_snapshot >= self.snapshot_every:
            try:
                self.snapshot()
            except Exception:  # the change is durable in the journal already; the next snapshot retries
                log.exception("snapshot of %s failed", self.store.dir)

    # ---- applying operations (live and on replay) --------------------------------------------
    def _apply(self, op: dict, seq: int) -> None:
        kind = op["op"]
        if kind == "add":
            self._apply_add(op, seq)
        elif kind == "remove":
            self._drop([i for i in op["ids"] if i in self.records], forget=True)
        elif kind == "update":
            self._apply_update(op, seq)
        else:
            raise RecipeError(f"journal operation {kind!r} is unknown")

    def _apply_add(self, op: dict, seq: int) -> None:
        entries = op["edits"]
        facts = [Fact(e["prompt"], e["target_new"], e.get("subject")) for e in entries]
        ids = self.editor.edit([f.request() for f in facts])  # raises: nothing changed
        for e, editor_id in zip(entries, ids):
            self.records[e["id"]] = EditRecord(e["id"], e["prompt"], e["target_new"], e.get("subject"),
                                               created=op["time"], updated=op["time"], batch=seq)
            self.editor_ids[e["id"]] = editor_id
        self.next_id = max(self.next_id, max(e["id"] for e in entries) + 1)
        old = [int(k) for k in op.get("supersedes", {}) if int(k) in self.editor_ids]
        self._drop(old, forget=False)
        for k, new_id in op.get("supersedes", {}).items():
            if int(k) in self.records:
                self.records[int(k)].status, self.records[int(k)].superseded_by = "superseded", new_id
                self.records[int(k)].updated = op["time"]

    def _apply_update(self, op: dict, seq: int) -> None:
        record = self.records[op["id"]]
        new_id = self.editor.edit([Fact(op["prompt"], op["target_new"], op.get("subject")).request()])[0]
        old_editor_id = self.editor_ids[op["id"]]
        self.editor_ids[op["id"]] = new_id
        record.prompt, record.target_new, record.subject = op["prompt"], op["target_new"], op.get("subject")
        record.updated, record.batch = op["time"], seq
        self._remove_from_editor([old_editor_id])

    def _drop(self, ids: list[int], *, forget: bool) -> None:
        """Take ``ids`` out of the editor (those active) and, with ``forget``, out of the records."""
        editor_ids = [self.editor_ids.pop(i) for i in ids if i in self.editor_ids]
        if forget:
            for i in ids:
                self.records.pop(i, None)
        self._remove_from_editor(editor_ids)

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

    def snapshot(self) -> Path:
        """Save the editor and the records as of the last journal operation."""
        snap = Snapshot(self.store.seq, self.next_id, self.records, self.editor.name, self.editor.lm.spec.name,
                        self.editor_ids)
        path = self.store.save_snapshot(snap, lambda d: _save_editor(self.editor, d))
        self._since_snapshot = 0
        return path

    def close(self) -> None:
        if self._since_snapshot:
            self.snapshot()
        self.store.close()
