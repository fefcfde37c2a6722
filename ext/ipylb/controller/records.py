"""Task records the controller keeps: the request's buffers (for retries and
resubmit) and, once known, the result's.

Memory is bounded: finished records beyond ``limit_bytes`` are dropped, oldest
first (pending ones are never dropped: they are the work).  With a TaskDB
(``--db sqlite``) every finished record is also written to SQLite, so results
outlive both eviction and a controller restart; a lookup that misses memory
reads it back.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..error import WireError
from ..shm import Segment

log = logging.getLogger("ipylb.controller")

# Finished records kept in memory, in bytes (buffers plus RECORD_OVERHEAD each).
DEFAULT_LIMIT_BYTES = 1 << 30
RECORD_OVERHEAD = 1024
# (bufs, bufs_mac) -> the same buffers as bytes, under a MAC over those bytes.
Inline = Callable[[Sequence[Any], bytes], tuple[Sequence[Any], bytes]]


class Record:
    """One task as the controller knows it."""

    __slots__ = ("msg_id", "client", "bufs", "bufs_mac", "flags", "submitted", "watchers",
                 "result", "result_bufs", "result_mac")

    def __init__(self, msg_id: str, client: bytes, bufs: list[Any], bufs_mac: bytes,
                 flags: dict[str, Any] | None = None) -> None:
        self.msg_id = msg_id
        self.client = client  # the receive socket of the client that submitted it
        self.bufs = bufs
        self.bufs_mac = bufs_mac
        self.flags = flags
        self.submitted = time.time()
        self.watchers: list[bytes] = []  # other clients waiting for it (get_result)
        # (engine_id, status, started, completed, stdout, stderr, error, submitted) once its
        # final attempt has ended (None while pending, also between a failure and its retry)
        self.result: tuple | None = None
        self.result_bufs: list[Any] = []
        self.result_mac = b""

    def nbytes(self) -> int:
        """Memory this record holds: its buffers plus a fixed allowance for the record itself
        (and the scheduler's), so a budget also bounds a flood of tiny tasks."""
        return RECORD_OVERHEAD + sum(len(b) for b in self.bufs) + sum(len(b) for b in self.result_bufs)


class TaskDB:
    """Finished task records in SQLite (stdlib sqlite3), one row each."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # private: it holds the key
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS tasks (msg_id TEXT PRIMARY KEY, client BLOB, flags BLOB,"
            " bufs BLOB, bufs_mac BLOB, result BLOB, result_bufs BLOB, result_mac BLOB)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB)")

    def key(self, new: bytes) -> bytes:
        """The cluster key the stored records were signed with (``new`` for a new database).

        A restarted controller reuses it, so stored results still authenticate."""
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('key', ?)", (new,))
        return self.db.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()[0]

    def save(self, rec: Record, inline: Inline) -> None:
        """Write a finished record.  Buffers are stored as bytes: ``inline`` (the
        controller's :meth:`ipylb.wire.Signer.inline`) reads shared-memory segments
        under a MAC over their bytes, since a segment's own MAC names a file that
        will be gone.  Raises WireError if a segment vanished or was replaced."""
        bufs, bufs_mac = inline(rec.bufs, rec.bufs_mac)
        result_bufs, result_mac = inline(rec.result_bufs, rec.result_mac)
        self.db.execute(
            "INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.msg_id, rec.client, pickle.dumps(rec.flags),
             _blobs(bufs), bufs_mac, pickle.dumps(rec.result),
             _blobs(result_bufs), result_mac),
        )

    def load(self, msg_id: str) -> Record | None:
        """The record of ``msg_id``, or None."""
        row = self.db.execute("SELECT * FROM tasks WHERE msg_id = ?", (msg_id,)).fetchone()
        if row is None:
            return None
        # Written by this controller only (the file lives in the private profile directory).
        _, client, flags, bufs, bufs_mac, result, result_bufs, result_mac = row
        rec = Record(msg_id, client, pickle.loads(bufs), bufs_mac, pickle.loads(flags))
        rec.result = pickle.loads(result)
        rec.result_bufs = pickle.loads(result_bufs)
        rec.result_mac = result_mac
        return rec

    def delete(self, msg_ids: list[str] | None) -> None:
        """Forget these records (None: all)."""
        if msg_ids is None:
            self.db.execute("DELETE FROM tasks")
        else:
            self.db.executemany("DELETE FROM tasks WHERE msg_id = ?", [(m,) for m in msg_ids])

    def ids(self) -> list[str]:
        """Every msg_id stored."""
        return [r[0] for r in self.db.execute("SELECT msg_id FROM tasks")]

    def close(self) -> None:
        """Close the database file."""
        self.db.close()


def _blobs(bufs: Sequence[Any]) -> bytes:
    """Buffers (frames, bytes) as one pickle of their bytes."""
    return pickle.dumps([bytes(b) for b in bufs])


def _no_segments(bufs: Sequence[Any], bufs_mac: bytes) -> tuple[Sequence[Any], bytes]:
    """The ``inline`` of a store without shared memory: there is nothing to read."""
    if any(type(b) is Segment for b in bufs):
        raise WireError("a shared-memory segment reached a store that cannot inline it")
    return bufs, bufs_mac


class TaskStore:
    """msg_id -> Record: pending records, plus finished ones within a memory budget."""

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES, db: TaskDB | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.db = db
        # Set by the controller to its Signer.inline: segments become bytes for the database.
        self.inline: Inline = _no_segments
        self.records: dict[str, Record] = {}
        self._finished: OrderedDict[str, int] = OrderedDict()  # msg_id -> nbytes, oldest first
        self._finished_bytes = 0

    def add(self, rec: Record) -> None:
        """Keep a new task's record."""
        self.records[rec.msg_id] = rec

    def get(self, msg_id: str) -> Record | None:
        """The record of ``msg_id`` (from memory, else the database), or None."""
        rec = self.records.get(msg_id)
        if rec is None and self.db is not None:
            rec = self.db.load(msg_id)
        return rec

    def __contains__(self, msg_id: str) -> bool:
        return self.get(msg_id) is not None

    def __getitem__(self, msg_id: str) -> Record:
        rec = self.get(msg_id)
        if rec is None:
            raise KeyError(msg_id)
        return rec

    def finished(self, rec: Record) -> list[str]:
        """``rec`` has its final result; returns the msg_ids evicted to stay within budget.

        Evicted records live on in the database if there is one; without one they
        are gone (the caller tells the scheduler core to forget them)."""
        if self.db is not None:
            try:
                self.db.save(rec, self.inline)
            except WireError as e:  # a segment vanished from under us: keep serving
                log.warning("task %s was not saved to the database: %s", rec.msg_id, e)
        if rec.msg_id in self._finished:  # finished again (a retry's final result)
            self._finished_bytes -= self._finished.pop(rec.msg_id)
        size = rec.nbytes()
        self._finished[rec.msg_id] = size
        self._finished_bytes += size
        evicted = []
        while self._finished_bytes > self.limit_bytes and len(self._finished) > 1:
            msg_id, size = self._finished.popitem(last=False)
            self._finished_bytes -= size
            self.records.pop(msg_id, None)
            evicted.append(msg_id)
        return evicted if self.db is None else []

    def purge(self, msg_ids: list[str] | None) -> list[str]:
        """Forget finished records (None: every finished one); returns the ids forgotten."""
        if msg_ids is None:
            ids = list(self._finished) + (self.db.ids() if self.db is not None else [])
            ids = list(dict.fromkeys(ids))
        else:
            ids = msg_ids
        for msg_id in ids:
            self.records.pop(msg_id, None)
            size = self._finished.pop(msg_id, None)
            if size is not None:
                self._finished_bytes -= size
        if self.db is not None:
            self.db.delete(None if msg_ids is None else ids)
        return ids
