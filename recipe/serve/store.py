"""The durable edit store: an append-only journal of operations plus snapshots of the editor.

Layout of a store folder (everything the server or ``recipe edit`` writes lives inside it)::

    DIR/journal.jsonl        one JSON record per operation ("add", "remove", "update"), fsynced
    DIR/CURRENT              name of the newest complete snapshot (replaced atomically)
    DIR/snapshot-<seq>/      store.json (the records after operation <seq>) + editor/ (the editor's state)
    DIR/lock                 held (flock) by the one process that has the store open

An operation is acknowledged only once its journal line is on disk (``os.fsync``). A crash can tear
at most the last line: it is ignored on replay and cut off before the next append. A snapshot is
written into ``snapshot-<seq>.tmp`` and renamed into place before CURRENT names it, so the newest
complete snapshot and the journal lines after it always give the state at the last acknowledgement.
The journal is never rewritten: it is also the audit trail of every change.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from recipe.errors import RecipeError
from recipe.storage import fsync_dir

log = logging.getLogger(__name__)

JOURNAL, CURRENT, LOCK, STORE_JSON, EDITOR_DIR = "journal.jsonl", "CURRENT", "lock", "store.json", "editor"
FORMAT = "recipe.edit_store"


class StoreError(RecipeError):
    """The store folder is in use, unreadable, or not an edit store."""


@dataclass(frozen=True)
class EditRecord:
    """One fact as the store lists it (changed by ``dataclasses.replace``, never in place). ``status``:
    active, superseded (by ``superseded_by``)."""

    id: int
    prompt: str
    target_new: str
    subject: str | None = None
    status: str = "active"
    superseded_by: int | None = None
    created: float = 0.0  # unix time of the operation that stored it
    updated: float = 0.0
    batch: int = 0  # seq of the operation that applied it (edits of one batch are re-applied together)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Snapshot:
    """The newest complete snapshot: the records after operation ``seq``, and where the editor state lies."""

    seq: int
    next_id: int
    records: dict[int, EditRecord]
    editor: str | None  # the editor name that wrote editor/ (None: no editor state)
    model: str | None
    editor_ids: dict[int, int] = field(default_factory=dict)  # store id -> the editor's id
    path: Path | None = None


class EditStore:
    """Journal + snapshots in one folder, held open (and locked) by one process at a time."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory).expanduser().resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / LOCK, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreError(f"store {self.dir} is open in another process (a running `recipe serve`?)") from None
        self._clean()
        self.journal_path = self.dir / JOURNAL
        self._cut_torn_tail()
        self._journal = open(self.journal_path, "ab")
        self.seq = max([self.snapshot_seq()] + [r["seq"] for r in self.read_journal()])

    def close(self) -> None:
        if not self._journal.closed:
            self._journal.close()
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    # ---- journal -----------------------------------------------------------------------------
    def _cut_torn_tail(self) -> int:
        """Drop a last line without its newline or not valid JSON (a write cut by a crash)."""
        if not self.journal_path.exists():
            return 0
        data = self.journal_path.read_bytes()
        end = data.rfind(b"\n") + 1
        last = data[data.rfind(b"\n", 0, end - 1) + 1:end] if end else b""
        if last and not _parses(last):
            end -= len(last)
        if end != len(data):
            log.warning("journal %s: ignoring a torn last record (%d bytes)", self.journal_path, len(data) - end)
            with open(self.journal_path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        return end

    def read_journal(self, after: int = 0) -> Iterator[dict]:
        """Every complete record with ``seq > after``, in order."""
        if not self.journal_path.exists():
            return
        with open(self.journal_path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    return  # a torn tail (only while another writer is mid-line)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise StoreError(f"{self.journal_path} line {n} is corrupt (not a torn last line)") from None
                if record["seq"] > after:
                    yield record

    def append(self, record: dict) -> dict:
        """Write one operation and fsync it: once this returns, the operation survives a crash."""
        record = {"seq": self.seq + 1, **record}
        self._journal.write((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self.seq = record["seq"]
        return record

    # ---- snapshots ---------------------------------------------------------------------------
    def _current(self) -> Path | None:
        name_file = self.dir / CURRENT
        if not name_file.exists():
            return None
        name = name_file.read_text().strip()
        path = self.dir / name
        if not name.startswith("snapshot-") or "/" in name or not (path / STORE_JSON).exists():
            raise StoreError(f"{name_file} names {name!r}, which is not a complete snapshot")
        return path

    def _clean(self) -> None:
        """Remove half-written snapshots and snapshots CURRENT no longer names."""
        keep = self._current()
        for path in self.dir.glob("snapshot-*"):
            if path != keep and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def snapshot_seq(self) -> int:
        path = self._current()
        return 0 if path is None else json.loads((path / STORE_JSON).read_text())["seq"]

    def load_snapshot(self) -> Snapshot | None:
        path = self._current()
        if path is None:
            return None
        meta = json.loads((path / STORE_JSON).read_text())
        if meta.get("format") != FORMAT:
            raise StoreError(f"{path / STORE_JSON} is not an edit store snapshot")
        records = {r["id"]: EditRecord(**r) for r in meta["records"]}
        return Snapshot(meta["seq"], meta["next_id"], records, meta.get("editor"), meta.get("model"),
                        {int(k): v for k, v in meta.get("editor_ids", {}).items()}, path)

    def save_snapshot(self, snap: Snapshot, save_editor: Callable[[Path], None] | None) -> Path:
        """Write ``snap`` (and the editor, through ``save_editor(dir)``) as the newest snapshot."""
        final = self.dir / f"snapshot-{snap.seq:012d}"
        if final == self._current():
            return final
        work = self.dir / f"snapshot-{snap.seq:012d}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        if save_editor is not None:
            save_editor(work / EDITOR_DIR)
        meta = {"format": FORMAT, "seq": snap.seq, "next_id": snap.next_id, "editor": snap.editor,
                "model": snap.model, "editor_ids": {str(k): v for k, v in snap.editor_ids.items()},
                "records": [r.to_json() for r in snap.records.values()]}
        _write_synced(work / STORE_JSON, json.dumps(meta, ensure_ascii=False).encode())
        fsync_dir(work)
        os.rename(work, final)
        _write_synced(self.dir / (CURRENT + ".tmp"), final.name.encode())
        os.replace(self.dir / (CURRENT + ".tmp"), self.dir / CURRENT)
        fsync_dir(self.dir)
        self._clean()
        return final


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
