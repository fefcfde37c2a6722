"""Task records the controller keeps: the request's buffers (for retries and
resubmit) and, once known, the result's.

Memory is bounded: finished records beyond ``limit_bytes`` are dropped, oldest
first (pending ones are never dropped: they are the work).  With a TaskDB
(``--db sqlite``) every finished record is also written to SQLite, so results
outlive both eviction and a controller restart; a lookup that misses memory
reads it back.

Queries (``rc.db_query``, ipyparallel's operator dictionary): :func:`parse_query`
checks one into ``(key, op, value)`` conditions; the store answers from its records
in memory, or with SQL over indexed columns in SQLite (pending tasks, which are only
in memory, are added to the answer).
"""

from __future__ import annotations

import logging
import operator
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
# What one record really costs beyond its buffers, the core's task included: measured
# (issue 11), 1,000,000 no-op tasks grew a controller to 1.75 GB with about 958,000
# records kept under an allowance of 1024 bytes, i.e. about 1.7 KB each (CPython 3.11).
RECORD_OVERHEAD = 1700
# What a task query may test (ipyparallel's db_query keys that ipylb keeps), with the
# types its values may have; and what a row of the answer holds.
QUERY_KEYS: dict[str, tuple[type, ...]] = {
    "msg_id": (str,), "status": (str,), "engine_id": (int,),
    "submitted": (int, float), "started": (int, float), "completed": (int, float),
    "label": (str,),
}
ROW_KEYS = (*QUERY_KEYS, "client", "stdout", "stderr", "error")
# ipyparallel's operators (a plain value means equality); None only with equality and $ne.
_SQL_OPS = {"$eq": "IS", "$ne": "IS NOT", "$lt": "<", "$gt": ">", "$lte": "<=", "$gte": ">="}
_PY_OPS = {"$lt": operator.lt, "$gt": operator.gt, "$lte": operator.le, "$gte": operator.ge}
Condition = tuple[str, str, Any]
# (bufs, bufs_mac) -> the same buffers as bytes, under a MAC over those bytes.
Inline = Callable[[Sequence[Any], bytes], tuple[Sequence[Any], bytes]]


class Function:
    """A task function's frames, shared by every task that runs it.  ``key`` (a MAC over
    their content, made by the client) names it on the engines, which get the frames once
    each; ``mac`` authenticates the frames as they are (segments by identity)."""

    __slots__ = ("key", "bufs", "mac", "nbytes", "__weakref__")

    def __init__(self, key: bytes, bufs: list[Any], mac: bytes) -> None:
        self.key = key
        self.bufs = bufs
        self.mac = mac
        self.nbytes = sum(len(b) for b in bufs)


class Record:
    """One task as the controller knows it: its function, its argument frames (``bufs``,
    under ``bufs_mac``), and once known, its result."""

    __slots__ = ("msg_id", "client", "fn", "bufs", "bufs_mac", "flags", "submitted",
                 "watchers", "result", "result_bufs", "result_mac", "label", "func", "fn_charge")

    def __init__(self, msg_id: str, client: bytes, fn: Function, bufs: list[Any],
                 bufs_mac: bytes, flags: dict[str, Any] | None = None, label: str | None = None,
                 func: str = "", fn_charge: int = 0) -> None:
        """``fn_charge``: the function's bytes, counted in the memory budget by the first
        record that brought it (the others share it)."""
        self.msg_id = msg_id
        # The submission's ``label`` flag (API.md; shared by its tasks, not a copy each) and
        # its function's name: what the dashboard's task stream colours by.
        self.label = label
        self.func = func
        self.client = client  # the receive socket of the client that submitted it
        self.fn = fn
        self.fn_charge = fn_charge
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
        return (RECORD_OVERHEAD + self.fn_charge + sum(len(b) for b in self.bufs)
                + sum(len(b) for b in self.result_bufs))


def parse_query(query: Any) -> list[Condition]:
    """``{"completed": {"$gt": t}, "engine_id": 1, ...}`` as ``(key, op, value)`` triples
    (op ``$eq`` for a plain value); ValueError/TypeError saying what is wrong otherwise.
    Keys: :data:`QUERY_KEYS` (times in seconds since the epoch); operators: ``$lt $gt
    $lte $gte $ne $in $nin`` (ipyparallel's)."""
    if not isinstance(query, dict):
        raise TypeError(f"a query is a dict such as {{'engine_id': 0}}, not {type(query).__name__}")
    conds: list[Condition] = []
    for key, test in query.items():
        types = QUERY_KEYS.get(key)
        if types is None:
            raise ValueError(f"cannot query {key!r}: the keys are {', '.join(QUERY_KEYS)}")
        tests = test.items() if isinstance(test, dict) else [("$eq", test)]
        if not tests:
            raise ValueError(f"an empty condition for {key!r}: use e.g. {{'$gt': value}}")
        for op, value in tests:
            if op in ("$in", "$nin"):
                if not isinstance(value, (list, tuple, set, frozenset)):
                    raise TypeError(f"{key} {op} takes a list of values, not {value!r}")
                value = list(value)
                values = value
            elif op in _SQL_OPS:
                values = [value]
                if value is None and op not in ("$eq", "$ne"):
                    raise ValueError(f"{key} {op} None compares with nothing; None goes with "
                                     "equality or $ne")
            else:
                raise ValueError(f"unknown operator {op!r} for {key!r}: use $lt $gt $lte $gte "
                                 "$ne $in $nin, or a plain value for equality")
            for v in values:
                if not (v is None and op in ("$eq", "$ne")) and (
                        not isinstance(v, types) or isinstance(v, bool)):
                    raise TypeError(f"{key} compares with {'/'.join(t.__name__ for t in types)}"
                                    f" values, got {v!r}")
            conds.append((key, op, value))
    return conds


def matches(row: dict[str, Any], conds: list[Condition]) -> bool:
    """Whether a row meets every condition (None only ever equals None, as in SQL's IS)."""
    for key, op, value in conds:
        x = row[key]
        if op == "$eq":
            ok = x == value
        elif op == "$ne":
            ok = x != value
        elif op == "$in":
            ok = x in value
        elif op == "$nin":
            ok = x not in value
        else:
            ok = x is not None and _PY_OPS[op](x, value)
        if not ok:
            return False
    return True


def _where(conds: list[Condition]) -> tuple[str, list[Any]]:
    """The SQL ``WHERE`` text and its parameters for parsed conditions (keys come from
    QUERY_KEYS, values only ever as parameters)."""
    parts, params = [], []
    for key, op, value in conds:
        if op in ("$in", "$nin"):
            marks = ", ".join("?" * len(value))
            parts.append(f"{key} IN ({marks})" if op == "$in"
                         else f"({key} IS NULL OR {key} NOT IN ({marks}))")
            params.extend(value)
        else:
            parts.append(f"{key} {_SQL_OPS[op]} ?")
            params.append(value)
    return " AND ".join(parts) or "1", params


def row(rec: Record) -> dict[str, Any]:
    """What a query answers about one record (times: seconds since the epoch; error:
    ``(ename, evalue, traceback)`` or None; client: the submitting client's session)."""
    return _row(rec.msg_id, rec.client, rec.submitted, rec.result, rec.label)


def _row(msg_id: str, client: bytes, submitted: float, result: tuple | None,
         label: str | None) -> dict[str, Any]:
    session = bytes(client)[len(b"client-"):-2].decode(errors="replace")
    if result is None:
        return {"msg_id": msg_id, "status": "pending", "engine_id": None, "submitted": submitted,
                "started": None, "completed": None, "label": label, "client": session,
                "stdout": "", "stderr": "", "error": None}
    engine_id, status, started, completed, stdout, stderr, error = result[:7]
    return {"msg_id": msg_id, "status": status, "engine_id": engine_id, "submitted": submitted,
            "started": started, "completed": completed, "label": label, "client": session,
            "stdout": stdout, "stderr": stderr, "error": error}


class TaskDB:
    """Finished task records in SQLite (stdlib sqlite3), one row each.

    Besides the record itself (pickled), the fields a query may test are columns, and
    the times are indexed, so ``db_query`` is a SQL query, not a scan."""

    _COLUMNS = {"status": "TEXT", "engine_id": "INTEGER", "submitted": "REAL",
                "started": "REAL", "completed": "REAL", "label": "TEXT", "func": "TEXT"}

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
        self._add_query_columns()

    def _add_query_columns(self) -> None:
        """The query columns and their indexes; a database written before they existed
        gets them filled in from its pickled results, once."""
        have = {r[1] for r in self.db.execute("PRAGMA table_info(tasks)")}
        missing = [c for c in self._COLUMNS if c not in have]
        for c in missing:
            self.db.execute(f"ALTER TABLE tasks ADD COLUMN {c} {self._COLUMNS[c]}")
        if missing:
            rows = self.db.execute("SELECT msg_id, client, result FROM tasks").fetchall()
            self.db.executemany(
                "UPDATE tasks SET status = ?, engine_id = ?, submitted = ?, started = ?, "
                "completed = ? WHERE msg_id = ?",
                [(*self._fields(pickle.loads(result)), msg_id) for msg_id, _c, result in rows])
        self.db.execute("CREATE INDEX IF NOT EXISTS tasks_submitted ON tasks (submitted)")
        self.db.execute("CREATE INDEX IF NOT EXISTS tasks_completed ON tasks (completed)")

    @staticmethod
    def _fields(result: tuple) -> tuple[Any, ...]:
        """(status, engine_id, submitted, started, completed) of a finished record's result."""
        submitted = result[7] if len(result) > 7 else None
        return result[1], result[0], submitted, result[2], result[3]

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
        fbufs, fmac = inline(rec.fn.bufs, rec.fn.mac)
        fn = (rec.fn.key, [bytes(b) for b in fbufs], fmac)
        self.db.execute(
            "INSERT OR REPLACE INTO tasks (msg_id, client, flags, bufs, bufs_mac, result,"
            " result_bufs, result_mac, status, engine_id, submitted, started, completed,"
            " label, func) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.msg_id, rec.client, pickle.dumps((rec.flags, fn)),
             _blobs(bufs), bufs_mac, pickle.dumps(rec.result),
             _blobs(result_bufs), result_mac, *self._fields(rec.result), rec.label, rec.func),
        )

    def load(self, msg_id: str) -> Record | None:
        """The record of ``msg_id``, or None."""
        found = self.db.execute(
            "SELECT client, flags, bufs, bufs_mac, result, result_bufs, result_mac, label, func"
            " FROM tasks WHERE msg_id = ?", (msg_id,)).fetchone()
        if found is None:
            return None
        # Written by this controller only (the file lives in the private profile directory).
        client, flags, bufs, bufs_mac, result, result_bufs, result_mac, label, func = found
        flags, fn = pickle.loads(flags)  # the function is stored with the flags
        rec = Record(msg_id, client, Function(*fn), pickle.loads(bufs), bufs_mac, flags, label,
                     func or "")
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

    def query(self, conds: list[Condition], details: bool = True) -> list[dict[str, Any]]:
        """Rows of the stored records that meet ``conds`` (in no particular order: the
        store sorts them, with the pending ones it adds); without ``details`` the pickled results are not read (client, stdout, stderr and
        error are then left out)."""
        where, params = _where(conds)
        cols = "msg_id, status, engine_id, submitted, started, completed, label"
        if not details:
            return [dict(zip(QUERY_KEYS, r)) for r in self.db.execute(
                f"SELECT {cols} FROM tasks WHERE {where}", params)]
        return [_row(msg_id, client, submitted, pickle.loads(result), label)
                for msg_id, client, submitted, result, label in self.db.execute(
                    f"SELECT msg_id, client, submitted, result, label FROM tasks WHERE {where}",
                    params)]

    def plan(self, conds: list[Condition]) -> str:
        """SQLite's query plan for ``conds`` (to check that an index is used)."""
        where, params = _where(conds)
        return " ".join(r[-1] for r in self.db.execute(
            f"EXPLAIN QUERY PLAN SELECT msg_id FROM tasks WHERE {where}", params))

    def close(self) -> None:
        """Close the database file."""
        self.db.close()


def _blobs(bufs: Sequence[Any]) -> bytes:
    """Buffers (frames, bytes) as one pickle of their bytes."""
    return pickle.dumps([bytes(b) for b in bufs])


def _by_submission(r: dict[str, Any]) -> float:
    return r["submitted"] or 0.0


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
        """``rec`` has its final result (once per record: the controller calls this only on
        the core's Deliver or Fail); returns the msg_ids evicted to stay within budget.

        Evicted records live on in the database if there is one; without one they
        are gone (the caller tells the scheduler core to forget them)."""
        if self.db is not None:
            try:
                self.db.save(rec, self.inline)
            except (WireError, sqlite3.Error) as e:  # a segment vanished, the disk is full...:
                # keep serving (raising here would drop the commands after this Deliver)
                log.warning("task %s was not saved to the database: %s", rec.msg_id, e)
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

    def query(self, conds: list[Condition], keys: list[str] | None = None) -> list[dict[str, Any]]:
        """The records that meet ``conds`` (see :func:`parse_query`), oldest submission
        first, each a dict of ``keys`` (default: all of :data:`ROW_KEYS`; msg_id always).
        From memory, or from SQLite plus the pending records (only in memory)."""
        if keys is None:
            keys = list(ROW_KEYS)
        else:
            if not isinstance(keys, (list, tuple)) or any(k not in ROW_KEYS for k in keys):
                raise ValueError(f"keys must be a list of {', '.join(ROW_KEYS)}; got {keys!r}")
            keys = ["msg_id", *(k for k in keys if k != "msg_id")]
        if self.db is None:
            rows = [r for r in map(row, self.records.values()) if matches(r, conds)]
        else:
            details = any(k not in QUERY_KEYS for k in keys)
            rows = self.db.query(conds, details)
            rows += [r for r in (row(rec) for rec in self.records.values() if rec.result is None)
                     if matches(r, conds)]
        rows.sort(key=_by_submission)
        return [{k: r[k] for k in keys} for r in rows]

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
