"""What came back for one task: :class:`Outcome` (status, timings, output, error, and
the payload, checked and unpickled on first use) and its :class:`Metadata`.

The receiving thread makes an Outcome per RESULT and files it (no unpickling, no user
code there); an AsyncResult, an imap or the client's own records read it later, in the
thread that asks.  A result this version cannot read still answers its task, with an
error that says why.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..error import SCHEDULER_ERRORS, RemoteError, SerializationError, WireError, safe_str
from ..serialize import loads

if TYPE_CHECKING:
    from .client import Client

__all__ = ["METADATA_KEYS", "META_INDEX", "Metadata", "Outcome", "as_datetime"]


class Metadata(dict):
    """A task's metadata: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_PENDING = object()
# Where a field sits in a result's meta tuple (see Outcome).
META_INDEX = {"engine_id": 1, "stdout": 5, "stderr": 6}
# What a task's metadata holds (a pending task's has None for what is not known yet).
METADATA_KEYS = ("msg_id", "engine_id", "status", "submitted", "started", "completed",
                 "stdout", "stderr", "error", "label")


class Outcome:
    """What came back for one task: status, timings, output, error, payload."""

    __slots__ = ("meta", "bufs", "mac", "_value")

    def __init__(self, meta: tuple, bufs: list[Any], mac: bytes) -> None:
        # (msg_id, engine_id, status, started, completed, stdout, stderr, error, submitted,
        # label); submitted (the controller's clock) is None in records stored by older
        # versions, and both are missing from results made here (lost) or by older versions.
        self.meta = meta
        self.bufs = bufs
        self.mac = mac
        self._value: Any = _PENDING

    @classmethod
    def received(cls, meta: Any, bufs: list[Any], mac: bytes) -> Outcome:
        """The outcome a RESULT message carries.  One whose fields are not what this
        version reads (a controller of another version, a bug) still answers its task,
        with an error that says so; raises WireError only if it names no task at all."""
        if type(meta) is tuple and len(meta) >= 8 and type(meta[0]) is str and (
                meta[2] == "ok" or _error_triple(meta[7])):
            return cls(meta, bufs, mac)
        msg_id = meta[0] if type(meta) is tuple and meta and type(meta[0]) is str else None
        if msg_id is None:
            raise WireError(f"a result message that names no task: {str(meta)[:200]}")
        why = (f"the controller's result for task {msg_id} is malformed ({str(meta)[:200]}): "
               "are the client and the cluster running different versions of ipylb?")
        return cls((msg_id, None, "error", None, None, "", "", ("WireError", why, "")), [], b"")

    @classmethod
    def lost(cls, msg_id: str, why: str, ename: str = "ClientClosed") -> Outcome:
        """A result that will not arrive here: the client closed first (or, ``ename``
        ControllerGone, its controller went away)."""
        return cls((msg_id, None, "error", None, None, "", "", (ename, why, "")), [], b"")

    @property
    def ok(self) -> bool:
        return self.meta[2] == "ok"

    def error(self) -> RemoteError:
        """The task's error as an exception object."""
        msg_id, engine_id, status = self.meta[:3]
        ename, evalue, tb = self.meta[7] or ("RemoteError", f"task ended with status {status}", "")
        info = {"engine_id": engine_id, "msg_id": msg_id}
        cls = SCHEDULER_ERRORS.get(ename)
        if cls is not None:
            return cls(evalue, tb, info)
        return RemoteError(ename, evalue, tb, info)

    def value(self, client: Client) -> Any:
        """The task's return value (checked and unpickled once)."""
        if self._value is _PENDING:
            client._signer.check_bufs(self.bufs, self.mac)
            try:
                self._value = loads(self.bufs)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # a __setstate__ may raise anything, SystemExit too
                raise SerializationError(
                    f"the result of task {self.meta[0]} could not be unpickled here: "
                    f"{type(e).__name__}: {safe_str(e, 4096)}. Is the module that defines it "
                    "importable in the client?"
                ) from e
            self.bufs = []
        return self._value

    def metadata(self, submitted: float | None) -> Metadata:
        """The task's metadata; ``submitted`` is used if the controller did not say."""
        msg_id, engine_id, status, started, completed, stdout, stderr = self.meta[:7]
        if len(self.meta) > 8 and self.meta[8] is not None:
            submitted = self.meta[8]
        return Metadata(
            msg_id=msg_id, engine_id=engine_id, status=status,
            submitted=as_datetime(submitted), started=as_datetime(started),
            completed=as_datetime(completed),
            stdout=stdout, stderr=stderr, error=self.error() if status != "ok" else None,
            label=self.meta[9] if len(self.meta) > 9 else None,
        )


def _error_triple(error: Any) -> bool:
    """Whether ``error`` is an (ename, evalue, traceback) triple of strings."""
    return type(error) is tuple and len(error) == 3 and all(type(x) is str for x in error)


def as_datetime(t: float | None) -> datetime | None:
    """A time in seconds since the epoch as a local datetime (None stays None)."""
    return None if t is None else datetime.fromtimestamp(t)
