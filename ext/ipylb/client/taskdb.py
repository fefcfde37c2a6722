"""The controller's task records as a client sees them (ipyparallel's Hub interface):
results of tasks by msg_id (any client's), resubmission, purging, the history and
``db_query``.  A part of :class:`~ipylb.client.client.Client` (a mixin: no state of its own).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .asyncresult import AsyncHubResult, AsyncResult
from .outcome import Outcome

if TYPE_CHECKING:
    from .client import Client

__all__ = ["TaskRecords", "Results", "as_list", "job_ids"]


class TaskRecords:
    """Tasks by msg_id, from this client's cache or the controller's records: a part of
    :class:`~ipylb.client.client.Client` (a mixin: ``Client`` owns the state)."""

    def get_result(self, indices_or_msg_ids: Any, block: bool | None = None) -> AsyncHubResult:
        """An AsyncHubResult for tasks by msg_id (or AsyncResult), pending ones included,
        submitted by any client of this cluster.  Unknown ids raise KeyError."""
        single = isinstance(indices_or_msg_ids, str)
        msg_ids = job_ids(indices_or_msg_ids, self.history)
        ar = AsyncHubResult(self, msg_ids, single=single)
        ask = []
        for i, msg_id in enumerate(msg_ids):
            outcome = self._outcomes.get(msg_id)
            if outcome is not None:
                ar._deliver(i, outcome)
                continue
            self._watchers.setdefault(msg_id, []).append((ar, i))
            if msg_id not in self._pending:
                ask.append(msg_id)
            outcome = self._outcomes.get(msg_id)  # it may have arrived meanwhile
            if outcome is not None:
                ar._deliver(i, outcome)
        if ask:
            try:
                self._request("get_result", ask)
            except KeyError:  # take back only what this call registered
                for i, msg_id in enumerate(msg_ids):
                    mine = self._watchers.get(msg_id, [])
                    if (ar, i) in mine:
                        mine.remove((ar, i))
                    if not mine:
                        self._watchers.pop(msg_id, None)
                raise
        if block:
            ar.wait()
        return ar

    def resubmit(self, indices_or_msg_ids: Any) -> AsyncHubResult:
        """Run finished tasks again under new msg_ids; ``get()`` gives their results in
        the given order.  Unknown or pending ids raise."""
        old = job_ids(indices_or_msg_ids, self.history)
        new = [self._new_msg_id() for _ in old]
        self.history.extend(new)
        ar = AsyncHubResult(self, new)
        for i, msg_id in enumerate(new):
            self._pending[msg_id] = (ar, i)
        try:
            self._request("resubmit", list(zip(old, new)))
        except BaseException:
            for msg_id in new:
                self._pending.pop(msg_id, None)
            raise
        return ar

    def purge_results(self, jobs: Any = "all") -> None:
        """Forget finished tasks here and on the controller (``"all"``, or AsyncResults/msg_ids).

        Their results can no longer be fetched; waiting for them raises KeyError."""
        msg_ids = None if isinstance(jobs, str) and jobs == "all" else job_ids(jobs, self.history)
        forgotten = self._request("purge", msg_ids)
        for msg_id in forgotten:
            self._outcomes.pop(msg_id, None)

    def purge_hub_results(self, jobs: Any = "all") -> None:
        """Forget finished tasks on the controller only (``"all"``, or jobs): this client's
        cache (``rc.results``) keeps what it has (ipyparallel).  Pending ones raise
        ValueError, unknown ones KeyError."""
        self._request("purge", None if isinstance(jobs, str) and jobs == "all"
                      else job_ids(jobs, self.history))

    def purge_local_results(self, jobs: Any = "all") -> None:
        """Drop finished results from this client's cache (``rc.results``) only
        (``"all"``, or jobs); the controller still has them for ``get_result``.
        RuntimeError for a task still pending here (as ipyparallel)."""
        if isinstance(jobs, str) and jobs == "all":
            self._outcomes.clear()
            return
        msg_ids = job_ids(jobs, self.history)
        pending = [m for m in msg_ids if m in self._pending]
        if pending:
            raise RuntimeError(f"cannot purge task(s) still pending: {', '.join(pending[:5])}"
                               f"{' ...' if len(pending) > 5 else ''}; wait for them first")
        for msg_id in msg_ids:
            self._outcomes.pop(msg_id, None)

    @property
    def results(self) -> Results:
        """This client's cache of finished tasks: ``{msg_id: value, or the task's error
        as an exception object}`` (read-only; ipyparallel's ``rc.results``)."""
        return Results(self)

    def hub_history(self, timeout: float | None = 30.0) -> list[str]:
        """msg_ids of every task the controller has a record of (any client's, pending
        ones too), oldest submission first (ipyparallel)."""
        return self._request("hub_history", None, timeout)

    def db_query(self, query: dict[str, Any], keys: list[str] | None = None,
                 timeout: float | None = 30.0) -> list[dict[str, Any]]:
        """Records of tasks (any client's, pending ones too) that meet ``query``, in
        ipyparallel's form: ``{key: value}`` for equality or ``{key: {op: value}}`` with
        op one of ``$lt $gt $lte $gte $ne $in $nin``, all conditions together.  Keys:
        ``msg_id``, ``status`` ("ok", "error", "pending"), ``engine_id``, ``submitted``,
        ``started``, ``completed`` (datetimes, or seconds since the epoch), ``label`` (the
        view's ``label`` flag; None if none was given).  Returns dicts
        of ``keys`` (default all: those plus ``client``, ``stdout``, ``stderr``, ``error``
        as an exception object), oldest submission first.  ValueError/TypeError for a
        query ipylb cannot answer.  Answered from the controller's records, or by SQL
        on indexed columns with ``--db sqlite``."""
        rows = self._request("db_query", (_epoch_query(query), keys), timeout)
        for r in rows:
            for k in ("submitted", "started", "completed"):
                if r.get(k) is not None:
                    r[k] = datetime.fromtimestamp(r[k])
            if r.get("error") is not None:
                r["error"] = Outcome((r["msg_id"], r.get("engine_id"), r.get("status"), None, None,
                                      "", "", tuple(r["error"])), [], b"").error()
        return rows


class Results(Mapping):
    """``rc.results``: msg_id -> value (or the error as an exception object) for the
    finished tasks in the client's cache; values are unpickled when read."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getitem__(self, msg_id: str) -> Any:
        outcome = self._client._outcomes[msg_id]
        return outcome.value(self._client) if outcome.ok else outcome.error()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._client._outcomes))

    def __len__(self) -> int:
        return len(self._client._outcomes)


def _epoch_query(query: Any) -> Any:
    """A db_query with datetimes as seconds since the epoch (what the controller keeps)."""
    if not isinstance(query, dict):
        return query  # the controller says what is wrong with it

    def conv(v: Any) -> Any:
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, (list, tuple, set, frozenset)):
            return [conv(x) for x in v]
        return v

    return {k: {op: conv(v) for op, v in t.items()} if isinstance(t, dict) else conv(t)
            for k, t in query.items()}


def as_list(jobs: Any) -> list[Any]:
    if isinstance(jobs, (str, AsyncResult, Future)) or not isinstance(jobs, Iterable):
        return [jobs]
    return list(jobs)


def job_ids(jobs: Any, history: list[str] | None = None) -> list[str]:
    """msg_ids of AsyncResults and/or msg_id strings (and, given ``history``, ints:
    indices into it, as ipyparallel)."""
    out: list[str] = []
    for job in as_list(jobs):
        if isinstance(job, AsyncResult):
            out.extend(job.msg_ids)
        elif isinstance(job, str):
            out.append(job)
        elif history is not None and type(job) is int:
            try:
                out.append(history[job])
            except IndexError:
                raise IndexError(f"job {job}: this client has submitted {len(history)} "
                                 "task(s) (rc.history)") from None
        else:
            raise TypeError(f"expected an AsyncResult or a msg_id string, got {type(job).__name__}")
    return out
