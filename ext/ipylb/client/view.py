"""LoadBalancedView: submit functions to whichever engine the scheduler picks."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..dependency import dependent, to_spec
from ..error import PURE_REFUSES
from ..serialize import dumps, dumps_args, dumps_function, dumps_items, reason
from .asyncresult import AsyncMapResult, AsyncResult
from .autochunk import map_auto
from .client import _engine_list
from .imap import IMapIterator

if TYPE_CHECKING:
    from .client import Client

_FLAGS = ("block", "retries", "timeout", "after", "follow", "targets", "walltime", "label")
# What a view's attributes may be: its flags and its two private parts.  Anything else
# raises, so a misspelt or foreign flag (``v.tragets = [0]``) is never silently ignored.
_ATTRS = frozenset((*_FLAGS, "client", "_results"))


class _Chunk:
    """Runs ``f`` over one chunk of a map: ``[f(*item) for item in items]``.  ``first``
    (the map position of ``items[0]``, sent with the chunk) lets its messages name the
    item, not the chunk: an exception gets the note ``(raised by item 5 of the map)``, and
    a result that does not pickle is traced to its item (:meth:`_ipylb_culprit`)."""

    def __init__(self, f: Callable) -> None:
        self.f = f

    def __call__(self, items: list[tuple], first: int = 0) -> list[Any]:
        f = self.f
        out: list[Any] = []
        append = out.append
        try:
            for item in items:
                append(f(*item))
        except BaseException as e:
            add_note = getattr(e, "add_note", None)  # (Python 3.11)
            if add_note is not None:
                try:
                    add_note(f"(raised by item {first + len(out)} of the map)")
                except Exception:  # an exception that takes no attributes: as it is
                    pass
            raise
        return out

    @staticmethod
    def _ipylb_culprit(args: tuple, value: Any) -> str | None:
        """Which item of this chunk returned a value that does not pickle, and why (the
        engine asks when the chunk's list of values does not); None if none alone."""
        first = args[1] if len(args) > 1 else 0
        for k, v in enumerate(value if type(value) is list else ()):
            try:
                dumps(v)
            except Exception as e:
                return (f"item {first + k} of the map returned a {type(v).__name__} object: "
                        f"{reason(e)}")
        return None

    @property
    def __wrapped__(self) -> Callable:  # what messages name (serialize.dumps_function)
        return self.f

    def _ipylb_rebind(self, bind: Callable[[Any], Any]) -> _Chunk:
        return _Chunk(bind(self.f))


class LoadBalancedView:
    """Runs tasks on the engine the cluster's scheduler chooses.

    Flags (attributes): ``block`` (apply/map wait for results), ``retries``,
    ``timeout`` (seconds a task may wait to be assigned; 0/None: forever),
    ``after`` (run when these tasks are done), ``follow`` (run where they ran),
    ``targets`` (an engine id or a list: tasks run only on those; None: any),
    ``walltime`` (seconds each attempt may run, 0/None: no limit; past it the task is
    interrupted, its engine restarted if it does not stop within a grace period, 5 s by
    default, and it fails with ``WalltimeExceeded``, an attempt for ``retries``: API.md;
    each chunk of a map has it), ``label`` (a str naming the tasks, or None: kept in their
    records and shown in ``db_query``, their metadata, progress bars and the dashboard, as
    ipyparallel 9.1's ``label``).  Flags are validated when set; setting an attribute that
    is not a flag raises AttributeError.
    """

    def __init__(self, client: Client, targets: int | list[int] | None = None) -> None:
        self.client = client
        self.targets = targets
        self.block = False
        self.retries = 0
        self.timeout: float | None = 0
        self.after: Any = []
        self.follow: Any = []
        self.walltime: float | None = 0
        self.label: str | None = None
        # What this view submitted and someone still holds (wait() with no jobs waits for it).
        self._results: weakref.WeakSet[AsyncResult] = weakref.WeakSet()

    def __repr__(self) -> str:
        on = "" if self.targets is None else f" targets={self.targets!r}"
        return f"<LoadBalancedView scheme={self.client.scheme}{on}>"

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _ATTRS:
            raise AttributeError(
                f"{name!r} is not a flag of LoadBalancedView; its flags are {', '.join(_FLAGS)}"
            )
        if name in _FLAGS:
            _validate(name, value)
        object.__setattr__(self, name, value)

    def __len__(self) -> int:
        """How many engines this view may use (as ipyparallel: its targets, else the
        registered engines)."""
        t = self.targets
        return len(self.client) if t is None else 1 if isinstance(t, int) else len(t)

    def wait(self, jobs: Any = None, timeout: float | None = None) -> bool:
        """Wait for ``jobs`` (AsyncResults, msg_ids, Futures; default: every task submitted
        through this view whose result is still referenced), at most ``timeout`` seconds
        (None or -1: no limit); True if all finished.  See :meth:`Client.wait`."""
        if jobs is None:
            jobs = list(self._results)
        return self.client.wait(jobs, timeout)

    # -- flags -------------------------------------------------------------------

    def set_flags(self, **flags: Any) -> None:
        """Set several flags at once, validating each."""
        for name, value in flags.items():
            if name not in _FLAGS:
                raise KeyError(f"unknown flag {name!r}; LoadBalancedView flags are {', '.join(_FLAGS)}")
            _validate(name, value)
        for name, value in flags.items():
            setattr(self, name, value)

    @contextlib.contextmanager
    def temp_flags(self, **flags: Any) -> Iterator[LoadBalancedView]:
        """Set flags for the duration of a ``with`` block, restoring them on exit."""
        saved = {name: getattr(self, name) for name in _FLAGS}
        self.set_flags(**flags)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def _task_flags(self, f: Any) -> dict[str, Any] | None:
        """The scheduling flags for the core, or None when all are defaults (the fast path)."""
        if self.client.scheme == "pure" and isinstance(f, dependent):
            raise ValueError(f"{_name(f)} has functional dependencies: {PURE_REFUSES}")
        targets = self.targets
        if not (self.after or self.follow or self.retries or self.timeout or targets is not None
                or self.walltime):
            return None
        if self.client.scheme == "pure":
            raise ValueError(f"after/follow/retries/timeout/targets/walltime are set: {PURE_REFUSES}")
        _validate("retries", self.retries)
        _validate("timeout", self.timeout)
        _validate("walltime", self.walltime)
        return {
            "after": to_spec(self.after) if self.after else None,
            "follow": to_spec(self.follow) if self.follow else None,
            "retries": self.retries,
            "timeout": self.timeout or None,
            # checked against the engines registered now (IndexError), as ipyparallel does
            "targets": None if targets is None else frozenset(
                _engine_list(targets, self.client.ids)),
            "walltime": self.walltime or None,
        }

    # -- apply -------------------------------------------------------------------

    def apply(self, f: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run ``f(*args, **kwargs)`` on an engine; the result if ``block``, else an AsyncResult."""
        ar = self.apply_async(f, *args, **kwargs)
        return ar.get() if self.block else ar

    def apply_sync(self, f: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run ``f(*args, **kwargs)`` on an engine and return its result."""
        return self.apply_async(f, *args, **kwargs).get()

    def apply_async(self, f: Callable, *args: Any, **kwargs: Any) -> AsyncResult:
        """Submit ``f(*args, **kwargs)``; return an AsyncResult at once."""
        if not callable(f):
            raise TypeError(f"apply needs a callable, got {type(f).__name__}")
        flags = self._task_flags(f)
        fbufs = dumps_function(f)
        arg_bufs = dumps_args(args, kwargs)
        client = self.client
        msg_id = client._new_msg_id()
        ar = AsyncResult(client, [msg_id], _name(f))
        ar.label = self.label
        client._submit(fbufs, flags, ar, [(msg_id, arg_bufs)], tag=(self.label, ar._fname))
        self._results.add(ar)
        return ar

    # -- map ---------------------------------------------------------------------

    def map(self, f: Callable, *sequences: Any, block: bool | None = None,
            chunksize: int | str = 1, ordered: bool = True, return_exceptions: bool = False) -> Any:
        """Parallel, load-balanced ``map(f, *sequences)``: a list if blocking, else an
        AsyncMapResult (iterable as results arrive).

        ``chunksize``: items per task (1, the default, as in ipyparallel: one msg_id per
        item), or ``"auto"``: sized from the time the first items take, so that each task
        carries ~0.2 s of work and every engine gets several (see
        :mod:`ipylb.client.autochunk`; ``map_async`` then returns once the first items,
        two per engine, are done, within 2 s).

        ``return_exceptions``: a failed item's exception object takes its place in the
        list (and in iteration) instead of a CompositeError being raised (ipyparallel);
        with ``chunksize > 1`` a failed chunk's error stands in for each of its items."""
        ar = self.map_async(f, *sequences, chunksize=chunksize, ordered=ordered,
                            return_exceptions=return_exceptions)
        block = self.block if block is None else block
        return ar.get() if block else ar

    def map_sync(self, f: Callable, *sequences: Any, chunksize: int | str = 1, ordered: bool = True,
                 return_exceptions: bool = False) -> list[Any]:
        """``map`` that waits and returns the list."""
        return self.map_async(f, *sequences, chunksize=chunksize, ordered=ordered,
                              return_exceptions=return_exceptions).get()

    def map_async(self, f: Callable, *sequences: Any, chunksize: int | str = 1,
                  ordered: bool = True, return_exceptions: bool = False) -> AsyncMapResult:
        """``map`` that returns an AsyncMapResult at once."""
        if not callable(f):
            raise TypeError(f"map needs a callable, got {type(f).__name__}")
        if not sequences:
            raise TypeError("map() needs at least one sequence")
        if chunksize != "auto" and (type(chunksize) is not int or chunksize < 1):
            raise ValueError(f"chunksize must be an int >= 1 or 'auto', got {chunksize!r}")
        items = list(zip(*sequences))
        flags = self._task_flags(f)
        if chunksize == "auto":
            ar = map_auto(self.client, dumps_function(_Chunk(f)), flags, items, ordered,
                          _name(f), return_exceptions, self.label)
            self._results.add(ar)
            return ar
        chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
        chunked = chunksize > 1
        fbufs = dumps_function(_Chunk(f) if chunked else f)
        # All pickled before anything is sent; an item that does not is named by position.
        arg_bufs = [dumps_items(c, i * chunksize, chunked) for i, c in enumerate(chunks)]
        client = self.client
        msg_ids = [client._new_msg_id() for _ in chunks]
        ar = AsyncMapResult(client, msg_ids, [len(c) for c in chunks], ordered, _name(f),
                            return_exceptions)
        ar.label = self.label
        client._submit(fbufs, flags, ar, list(zip(msg_ids, arg_bufs)), tag=(self.label, ar._fname))
        self._results.add(ar)
        return ar

    def imap(self, f: Callable, *iterables: Any, ordered: bool = True,
             max_outstanding: int | str = "auto", return_exceptions: bool = False,
             chunksize: int | str = 1) -> IMapIterator:
        """Lazy, load-balanced ``map(f, *iterables)``: an iterator of results that reads
        its input only as results are consumed, so endless iterables work and client
        memory stays flat (ipyparallel's ``imap``).

        ``max_outstanding``: at most this many tasks submitted whose results have not been
        yielded yet ("auto": 64 per engine, at least 256; 0: no limit).  ``ordered=False``
        yields in completion order.  A failed task raises its RemoteError (and ends the
        iteration), or is yielded as the exception with ``return_exceptions``.  If the
        input raises, the results of the items before it are yielded, then its error is
        raised.  ``break``, ``close()`` or dropping the iterator aborts the tasks not
        started yet.  Flags (targets, after, retries...) apply to every task; imap tasks
        are not added to ``rc.history``.

        ``chunksize``: items per task (1: ipyparallel's), or ``"auto"``: one at first, then
        ~0.2 s of measured work per task (:mod:`ipylb.client.imap`); ``max_outstanding``
        then counts items, and a failed chunk stands for each of its items."""
        return IMapIterator(self, f, iterables, ordered, max_outstanding, return_exceptions,
                            chunksize)

    # -- decorator ---------------------------------------------------------------

    def parallel(self, block: bool | None = None, chunksize: int | str = 1, ordered: bool = True,
                 return_exceptions: bool = False) -> Callable[[Callable], ParallelFunction]:
        """Decorator: ``f.map(seq)`` maps in parallel, ``f(x)`` runs one task."""
        return lambda f: ParallelFunction(self, f, block, chunksize, ordered, return_exceptions)


class ParallelFunction:
    """A function made parallel by ``@view.parallel()``."""

    def __init__(self, view: LoadBalancedView, f: Callable, block: bool | None, chunksize: int | str,
                 ordered: bool, return_exceptions: bool = False) -> None:
        self.view, self.func = view, f
        self.block, self.chunksize, self.ordered = block, chunksize, ordered
        self.return_exceptions = return_exceptions
        self.__name__ = getattr(f, "__name__", "parallel")
        self.__doc__ = getattr(f, "__doc__", None)

    def _block(self) -> bool:
        return self.view.block if self.block is None else self.block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ar = self.view.apply_async(self.func, *args, **kwargs)
        return ar.get() if self._block() else ar

    def map(self, *sequences: Any) -> Any:
        """Map the function over ``sequences`` in parallel."""
        return self.view.map(self.func, *sequences, block=self._block(),
                             chunksize=self.chunksize, ordered=self.ordered,
                             return_exceptions=self.return_exceptions)


def _validate(name: str, value: Any) -> None:
    if name == "block":
        if not isinstance(value, bool):
            raise TypeError(f"block must be True or False, got {value!r}")
    elif name == "retries":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"retries must be an int >= 0, got {value!r}")
    elif name in ("timeout", "walltime"):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0 seconds (0 or None: no limit), got {value!r}")
    elif name == "label":
        if value is not None and not isinstance(value, str):
            raise TypeError(f"label must be a str or None, got {value!r}")
        if value is not None and len(value) > 200:
            raise ValueError(f"label must be at most 200 characters, got {len(value)}")
    elif name in ("after", "follow"):
        to_spec(value)  # raises TypeError for anything that is not ids/results/Dependency
    elif name == "targets" and value is not None:
        ids = [value] if isinstance(value, int) else value
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable) or any(
                type(t) is not int or t < 0 for t in ids):
            raise TypeError(f"targets must be an engine id, a list of them or None (all), "
                            f"got {value!r}")
        if not ids:
            raise ValueError("targets=[] names no engine; use None for all engines")


def _name(f: Any) -> str:
    return getattr(f, "__name__", type(f).__name__)
