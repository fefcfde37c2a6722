"""Handles on submitted tasks: AsyncResult, AsyncMapResult, AsyncHubResult.

A result arrives on the client's receiving thread, which only files it
(:meth:`AsyncResult._deliver`): checking the payload's MAC and unpickling happen
on first use, in the thread that asks for the value.

No user code runs on the receiving thread, so nothing a user writes can hold up the
delivery of a result (issue 9 item 6).  It sets each AsyncResult's state and wakes its
waiters (``get``, ``wait``, iteration, ``concurrent.futures.wait``/``as_completed``)
itself; done callbacks (``add_done_callback``, which ``asyncio.wrap_future`` also
uses) and ``cancel()``'s abort go to :class:`~ipylb.client.callbacks.CallbackRunner`,
which runs them in order on a thread of its own and starts another when one of them blocks.
"""

from __future__ import annotations

import numbers
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..error import CompositeError, RemoteError, SerializationError
from .callbacks import run_callback, runner
from .outcome import META_INDEX, METADATA_KEYS, Metadata, Outcome, as_datetime

if TYPE_CHECKING:
    from .client import Client


def wait_seconds(timeout: object) -> float | None:
    """The one rule for the ``timeout`` of every wait (``get``, ``wait``,
    ``wait_interactive``, ``Client.wait``, ``wait_for_engines``), ipyparallel's: None or a
    negative number means no limit, else seconds.  TypeError for what is not a number (a
    str, a bool), ValueError for NaN: never an error about comparing it later."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds (None or -1: no limit), "
                        f"got {timeout!r}")
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds (None or -1: no limit), got nan")
    return None if timeout < 0 else float(timeout)


class AsyncResult(Future):
    """The eventual result of one task (or several, see subclasses).

    Also a ``concurrent.futures.Future`` (as in ipyparallel): ``result()``, ``done()``,
    ``add_done_callback()``, ``concurrent.futures.wait`` and ``asyncio.wrap_future`` work.
    """

    def __init__(self, client: Client, msg_ids: list[str], fname: str = "",
                 return_exceptions: bool = False) -> None:
        super().__init__()
        self._client = client
        self.msg_ids = msg_ids
        self._fname = fname
        self.label: str | None = None  # the view's ``label`` flag when it was submitted
        # get() and iteration return failed items' exceptions in place instead of raising
        # (ipyparallel's map(..., return_exceptions=True)); get(return_exceptions=) overrides.
        self._return_exceptions = return_exceptions
        self._outcomes: list[Outcome | None] = [None] * len(msg_ids)
        self._remaining = len(msg_ids)
        self._failed = 0  # tasks finished with an error (for progress bars)
        self._split: tuple[AsyncResult, ...] | None = None  # split()'s results, fed by _deliver
        self._arrivals: list[int] = []  # indices in the order results came
        self._cond = self._condition  # the Future's own (one Condition per result, not two)
        self._submitted = time.time()
        self._callbacks: list[Callable[[Any], Any]] | None = None  # until finished
        if not msg_ids:  # nothing to wait for (an empty map): done at once
            Future.set_result(self, None)

    def __repr__(self) -> str:
        state = "finished" if self.ready() else "pending"
        return f"<{type(self).__name__}({self._fname}): {state}>"

    # -- filled in by the client's receiving thread -----------------------------

    def _deliver(self, index: int, outcome: Outcome) -> None:
        with self._cond:
            if self._outcomes[index] is not None:  # also fetched by get_result: once is enough
                return
            self._remaining -= 1
            self._outcomes[index] = outcome
            if not outcome.ok:
                self._failed += 1
            self._arrivals.append(index)
            self._cond.notify_all()
            finished = self._remaining == 0
            split = self._split
            callbacks = self._callbacks if finished else None
        if split is not None:
            split[index]._deliver(0, outcome)
        if finished:
            # The Future's own state: wakes concurrent.futures.wait (the value itself is
            # checked and unpickled by result()/get(), in the caller).  No callback is ever
            # registered with the Future itself, so this runs no user code.
            Future.set_result(self, None)
            if callbacks:
                for fn in callbacks:
                    runner.call(fn, self)

    # -- the Future interface ------------------------------------------------------

    def done(self) -> bool:
        """Same as :meth:`ready`."""
        return self.ready()

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        """Call ``fn(self)`` once every task has finished: on a thread of ipylb's, or at once
        in this thread if it has finished already (as ``concurrent.futures.Future`` does).

        Callbacks start in the order their results finished, and those of one result in the
        order they were added, one after another; one that runs longer than
        ``CALLBACK_STALL_S`` (it waits for something) no longer holds up the rest, which
        start on another thread.  A callback may wait for other results.  An exception it
        raises is logged (logger ``ipylb.client``) and does not stop the others."""
        with self._cond:
            if self._remaining:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        run_callback(fn, self)

    def result(self, timeout: float | None = None) -> Any:
        """Same as :meth:`get`."""
        return self.get(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error ``get()`` would raise (None if the tasks succeeded); waits like get."""
        if not self.wait(timeout):
            raise TimeoutError(f"{self!r} did not finish within {timeout} s")
        try:
            self._collect(False)
        except Exception as e:
            return e
        return None

    def cancel(self) -> bool:
        """Abort the tasks that have not started (they fail with TaskAborted), without
        waiting for the controller.  Returns False: the result still completes."""
        if not self.ready():
            runner.call(self.abort)
        return False

    def set_result(self, result: Any) -> None:  # noqa: D102 - results come from the cluster only
        raise RuntimeError("an AsyncResult is completed by its tasks, not by set_result")

    set_exception = set_result

    # -- waiting -----------------------------------------------------------------

    def ready(self) -> bool:
        """Whether every task has finished."""
        return self._remaining == 0

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until finished or ``timeout`` seconds pass (None or -1: no limit, as in
        ipyparallel); return ready().  TypeError if ``timeout`` is not a number."""
        timeout = wait_seconds(timeout)
        if self._remaining:
            self._client._flush()  # a submission held to leave with others goes now
        with self._cond:
            return self._cond.wait_for(self.ready, timeout)

    def successful(self) -> bool:
        """Whether every task succeeded; raises if not finished yet."""
        if not self.ready():
            raise ValueError(f"{self!r} is not finished yet: wait() for it first")
        return all(o is not None and o.ok for o in self._outcomes)

    def get(self, timeout: float | None = None, return_exceptions: bool | None = None) -> Any:
        """The result, waiting at most ``timeout`` seconds (builtin TimeoutError after;
        None or -1: no limit).

        A failed task raises its error (a map: a CompositeError), unless
        ``return_exceptions`` (default: as the call that made this result said): then
        each failed item's exception object is returned in its place (ipyparallel's rule).
        """
        timeout = wait_seconds(timeout)
        if not self.wait(timeout):
            done = len(self.msg_ids) - self._remaining
            raise TimeoutError(
                f"{self!r}: {done} of {len(self.msg_ids)} task(s) finished within {timeout} s"
            )
        if return_exceptions is None:
            return_exceptions = self._return_exceptions
        return self._collect(return_exceptions)

    def _collect(self, return_exceptions: bool = False) -> Any:
        return _items(self._client, self._outcomes[0], 1, return_exceptions)[0]

    def __len__(self) -> int:
        return len(self.msg_ids)

    def get_dict(self, timeout: float | None = None) -> dict[int, Any]:
        """The results keyed by the engine that ran each task (as ipyparallel's
        ``get_dict``); ValueError if two tasks ran on one engine.  Waits like get()."""
        values = self.get(timeout)
        per_task = [values] if self._single else self._per_task(values)
        out: dict[int, Any] = {}
        for engine_id, value in zip(self._each("engine_id"), per_task):
            if engine_id in out:
                n = self._each("engine_id").count(engine_id)
                raise ValueError(f"cannot build a dict keyed by engine: {n} tasks ran on "
                                 f"engine {engine_id}")
            out[engine_id] = value
        return out

    def _per_task(self, values: list[Any]) -> list[Any]:
        return values

    def split(self) -> tuple[AsyncResult, ...]:
        """One result per task, to wait on separately (e.g. with
        ``concurrent.futures.wait``), as ipyparallel 9's ``split()``: a single task's
        result is itself; a map's parts are AsyncMapResults of one task each (``get()``
        is the list of that task's items).  Always the same tuple for one result."""
        if len(self.msg_ids) == 1 and self._single:
            return (self,)
        with self._cond:
            if self._split is None:
                self._split = tuple(self._part(i) for i in range(len(self.msg_ids)))
            split, outcomes = self._split, list(self._outcomes)
        for part, outcome in zip(split, outcomes):
            if outcome is not None:
                part._deliver(0, outcome)
        return split

    def _part(self, index: int) -> AsyncResult:
        part = AsyncResult(self._client, [self.msg_ids[index]], self._fname,
                           self._return_exceptions)
        part._submitted = self._submitted
        part.label = self.label
        return part

    # -- what came back ----------------------------------------------------------

    def _each(self, name: str) -> list[Any]:
        i = META_INDEX[name]
        return [None if o is None else o.meta[i] for o in self._outcomes]

    def _metadata(self) -> list[Metadata]:
        return [
            o.metadata(self._submitted) if o is not None
            else Metadata(dict.fromkeys(METADATA_KEYS), msg_id=m, status="pending",
                          submitted=as_datetime(self._submitted), stdout="", stderr="", label=self.label)
            for m, o in zip(self.msg_ids, self._outcomes)
        ]

    @property
    def metadata(self) -> Any:
        """Per-task metadata (engine_id, submitted, started, completed, stdout, stderr, status)."""
        md = self._metadata()
        return md[0] if self._single else md

    def _check_ready(self) -> None:
        if not self.ready():
            raise TimeoutError(f"{self!r} is not finished yet: wait() for it first")

    def __getitem__(self, key: int | slice | str) -> Any:
        """``ar[i]`` / ``ar[i:j]``: items of the finished result (TimeoutError if not
        finished); ``ar["engine_id"]``: a metadata field (a list for several tasks)."""
        if isinstance(key, str):
            if key not in METADATA_KEYS:
                raise KeyError(f"no metadata field {key!r}; there are {', '.join(METADATA_KEYS)}")
            values = [m[key] for m in self._metadata()]
            return values[0] if self._single else values
        if not isinstance(key, (int, slice)):
            raise TypeError(f"index with an int, a slice or a metadata name, not {type(key).__name__}")
        self._check_ready()
        return self.get()[key]

    @property
    def sent(self) -> bool:
        """Whether the tasks have been sent (always: submission sends before it returns)."""
        return True

    def _times(self, field: str) -> list[datetime]:
        return [m[field] for m in self._metadata() if m[field] is not None]

    @property
    def elapsed(self) -> float:
        """Seconds from the first submission to now, or to the last completion once finished."""
        start = min(self._times("submitted"), default=None)
        if start is None:
            return 0.0
        end = max(self._times("completed"), default=None) if self.ready() else None
        return ((end or datetime.now()) - start).total_seconds()

    @property
    def wall_time(self) -> float:
        """Seconds from the first submission to the last completion (finished results only)."""
        self._check_ready()
        return self.elapsed

    @property
    def serial_time(self) -> float:
        """Total seconds the tasks ran on engines, summed (finished results only)."""
        self._check_ready()
        return sum((m.completed - m.started).total_seconds() for m in self._metadata()
                   if m.started is not None and m.completed is not None)

    def display_outputs(self) -> None:
        """Show what the tasks wrote to stdout and stderr, task by task.

        Finished: printed at once.  Still running (issue 15): their output is streamed
        from the engines while they run (at most 4 reports a second of at most 16 KiB per
        stream, the newest; a note marks what was skipped).  In a Jupyter kernel it is
        shown in a display in the cell that called this, which returns at once; the
        display keeps updating even while other cells run, and the full output
        (``stdout``/``stderr``) replaces it once the tasks end.  Elsewhere (plain Python,
        terminal IPython) it is printed to sys.stdout/sys.stderr as it comes and this
        returns once the tasks have ended, having printed their full output exactly once.
        Raises ControllerGone/ClientClosed if the cluster cannot be asked."""
        if self.ready():
            print_stdout(self)
            return
        from .live import LiveOutput

        live = LiveOutput.start(self)
        if not live.in_kernel:
            try:
                live.follow()
            finally:
                live.finish()

    _single = True

    def _one_or_list(self, name: str) -> Any:
        values = self._each(name)
        return values[0] if self._single else values

    @property
    def stdout(self) -> Any:
        """What the task printed to stdout (a list for several tasks)."""
        return self._one_or_list("stdout")

    @property
    def stderr(self) -> Any:
        """What the task printed to stderr (a list for several tasks)."""
        return self._one_or_list("stderr")

    @property
    def engine_id(self) -> Any:
        """Which engine ran the task (a list for several tasks)."""
        return self._one_or_list("engine_id")

    def __getattr__(self, name: str) -> Any:
        """Metadata fields as attributes, as in ipyparallel: ``ar.started``,
        ``ar.completed``, ``ar.submitted``, ``ar.status``, ``ar.msg_id``, ``ar.error``
        (a list, one per task, for several tasks; None where not known yet)."""
        if name in METADATA_KEYS:
            return self[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def wait_interactive(self, interval: float = 0.1, timeout: float | None = None) -> None:
        """Wait with a progress bar (a widget in a notebook, text in a terminal) that
        counts finished and failed tasks.  Failed tasks do not stop or raise here: get()
        afterwards raises, or returns them in place with ``return_exceptions``.
        ``timeout`` None or -1: no limit."""
        from .progress import wait_with_progress

        wait_with_progress(self, interval, wait_seconds(timeout))

    def progress(self) -> int:
        """How many tasks have finished."""
        return len(self.msg_ids) - self._remaining

    @property
    def name(self) -> str:
        """What progress bars call this submission: its ``label``, else its function's name."""
        return self.label or self._fname

    @property
    def failed_count(self) -> int:
        """How many of its tasks have finished with an error (of :meth:`progress`)."""
        return self._failed

    @property
    def submitted_at(self) -> float:
        """When it was submitted: seconds since the epoch (``time.time()``)."""
        return self._submitted

    def abort(self) -> None:
        """Abort the tasks that have not started yet."""
        self._client.abort(self)

    def _errors(self) -> list[RemoteError]:
        return [o.error() for o in self._outcomes if o is not None and not o.ok]


class AsyncMapResult(AsyncResult):
    """The eventual result of a map: one task per chunk, iterable as results arrive."""

    _single = False

    def __init__(
        self, client: Client, msg_ids: list[str], chunk_sizes: list[int], ordered: bool = True,
        fname: str = "", return_exceptions: bool = False,
    ) -> None:
        super().__init__(client, msg_ids, fname, return_exceptions)
        self._chunk_sizes = chunk_sizes
        self._chunked = any(n != 1 for n in chunk_sizes)
        self.ordered = ordered

    def __len__(self) -> int:
        return sum(self._chunk_sizes)

    def _chunk_values(self, index: int, return_exceptions: bool = False) -> list[Any]:
        """The items of task ``index``: its value(s), or its error repeated for each item
        of the chunk with ``return_exceptions`` (so positions stay those of the input)."""
        if self._chunked:
            return _items(self._client, self._outcomes[index], self._chunk_sizes[index],
                          return_exceptions, chunked=True)
        return _items(self._client, self._outcomes[index], 1, return_exceptions)

    def _collect(self, return_exceptions: bool = False) -> list[Any]:
        if not return_exceptions:
            failed = [i for i, o in enumerate(self._outcomes) if o is not None and not o.ok]
            if failed:
                raise _composite(self, failed)
        out: list[Any] = []
        for i in range(len(self.msg_ids)):
            out.extend(self._chunk_values(i, return_exceptions))
        return out

    def _per_task(self, values: list[Any]) -> list[Any]:
        if not self._chunked:
            return values
        out, pos = [], 0
        for n in self._chunk_sizes:
            out.append(values[pos:pos + n])
            pos += n
        return out

    def _part(self, index: int) -> AsyncResult:
        part = AsyncMapResult(self._client, [self.msg_ids[index]], [self._chunk_sizes[index]],
                              True, self._fname, self._return_exceptions)
        part._chunked = self._chunked  # its get() is the list of its task's items, as in ipyparallel
        part._submitted = self._submitted
        part.label = self.label
        return part

    def __iter__(self) -> Iterator[Any]:
        """Yield items as they arrive (in submission order unless ``ordered=False``); the
        first failed item raises, or is yielded as its exception with ``return_exceptions``."""
        n = len(self.msg_ids)
        re = self._return_exceptions
        if self._remaining:
            self._client._flush()
        for k in range(n):
            with self._cond:
                if self.ordered:
                    self._cond.wait_for(lambda k=k: self._outcomes[k] is not None)
                    index = k
                else:
                    self._cond.wait_for(lambda k=k: len(self._arrivals) > k)
                    index = self._arrivals[k]
            yield from self._chunk_values(index, re)


class AsyncHubResult(AsyncMapResult):
    """Results fetched by msg_id from the controller (get_result, resubmit)."""

    def __init__(self, client: Client, msg_ids: list[str], single: bool = False) -> None:
        super().__init__(client, msg_ids, [1] * len(msg_ids), True, "hub")
        self._single = single

    def _collect(self, return_exceptions: bool = False) -> Any:
        if self._single:
            return AsyncResult._collect(self, return_exceptions)
        return super()._collect(return_exceptions)

    def _part(self, index: int) -> AsyncResult:
        part = AsyncHubResult(self._client, [self.msg_ids[index]], single=True)
        part._submitted = self._submitted
        part.label = self.label
        return part


def _items(client: Client, outcome: Outcome | None, n: int, return_exceptions: bool,
           chunked: bool = False) -> list[Any]:
    """The ``n`` items one task stands for: its value (``chunked``: its list of values),
    or, with ``return_exceptions``, its error (or a value that cannot be unpickled here)
    once per item; without, that error is raised."""
    assert outcome is not None
    try:
        if not outcome.ok:
            raise outcome.error()
        value = outcome.value(client)
    except (RemoteError, SerializationError) as e:
        if return_exceptions:
            return [e] * n
        raise
    return value if chunked else [value]


def _composite(amr: AsyncMapResult, failed: list[int]) -> CompositeError:
    """One error for the failed tasks (positions ``failed``) of a map."""
    errors = [amr._outcomes[i].error() for i in failed]  # type: ignore[union-attr]
    elist = [(e.ename, e.evalue, e.traceback, e.engine_info) for e in errors]
    tasks, items = len(amr.msg_ids), len(amr)
    which = ", ".join(map(str, failed[:20])) + (", ..." if len(failed) > 20 else "")
    if items == tasks:
        what = f"{len(failed)} of {tasks} task(s) raised an exception (items {which})"
    else:  # chunked: a failed chunk loses all its items (each error says which raised)
        starts = [0]
        for n in amr._chunk_sizes:
            starts.append(starts[-1] + n)
        which = ", ".join(f"{i} (items {starts[i]}-{starts[i + 1] - 1})" for i in failed[:20])
        what = (f"{len(failed)} of {tasks} chunk(s) of a map over {items} items raised an "
                f"exception (chunks {which}{', ...' if len(failed) > 20 else ''})")
    return CompositeError(what, elist)


def print_stdout(ar: AsyncResult) -> None:
    """Echo what the tasks printed (used by the magics)."""
    for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        texts = getattr(ar, name)
        for text in texts if isinstance(texts, list) else [texts]:
            if text:
                stream.write(text)
