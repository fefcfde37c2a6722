"""``LoadBalancedView.imap``: a lazy, bounded map over possibly endless input.

The consumer's own thread does all the work: each ``next()`` first tops up the
window (reads input items, pickles them and submits them, a batch per message),
then waits for the next result.  So input is read only as results are consumed,
at most ``max_outstanding`` tasks are submitted and not yet yielded, and no
thread of ipylb ever runs the caller's input iterator.

Memory stays flat: an item's msg_id and result are held from its submission until
it is yielded, then dropped here and from the client's local cache; imap tasks are
not added to ``rc.history`` (the controller keeps their records, within its budget,
so ``rc.get_result`` and ``rc.db_query`` still find them).

Chunks (``chunksize`` > 1 or ``"auto"``): each task carries a list of items and
returns the list of their values, yielded one by one.  The window counts items, so
memory stays bounded the same way.  With ``"auto"`` the chunk size follows the
measured time per item (each result's engine ``completed - started`` over its
items, smoothed), so that a task carries ~0.2 s of work (:mod:`.autochunk`); the
first tasks carry one item each.

Two objects, so that garbage collection works: :class:`IMapIterator` is what the
caller holds; :class:`_Collector` is what the client's receiving thread files
results into (the client references it while tasks are in flight).  When the
iterator is closed or collected, the collector stays registered until its last
task's result has come and been thrown away, and the tasks not yet started are
aborted.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..error import RemoteError, SerializationError
from ..serialize import dumps_function, dumps_items
from . import autochunk
from .callbacks import runner
from .outcome import Outcome

if TYPE_CHECKING:
    from .client import Client

# max_outstanding="auto": tasks in flight per registered engine, and at least this many.
# A window this deep keeps every engine's pipeline full while the consumer is busy
# unpickling results and submitting the next batch (measured: see the closing note of
# issue 11); it costs about 1 KB of client memory per task in flight.
AUTO_PER_ENGINE = 64
AUTO_MIN = 256
# The window is topped up once this fraction of it is free, so submissions go out in
# batches (one message each) rather than one task per message.
REFILL_FRACTION = 4
# At most this many input items are read per top-up (so max_outstanding=0, no limit,
# still reads endless input a batch at a time, as results are consumed).
FILL_MAX = 1024


class _Collector:
    """Receives the results of one imap's tasks (on the client's receiving thread)."""

    def __init__(self, client: Client, ordered: bool) -> None:
        self.client = client
        self.ordered = ordered
        self.cond = threading.Condition(threading.Lock())
        self.by_index: dict[int, Outcome] = {}  # ordered: finished, not yet yielded
        self.arrived: deque[tuple[int, Outcome]] = deque()  # unordered: in arrival order
        self.closed = False
        self.unanswered = 0  # submitted tasks whose result has not come yet

    def _deliver(self, index: int, outcome: Outcome) -> None:
        with self.cond:
            self.unanswered -= 1
            if self.closed:  # nobody will read it: drop it from the client's cache too
                self.client._outcomes.pop(outcome.meta[0], None)
                return
            if self.ordered:
                self.by_index[index] = outcome
            else:
                self.arrived.append((index, outcome))
            self.cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Until every submitted task has answered (what ``rc.wait(msg_id)`` waits for)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.unanswered == 0, timeout)


class IMapIterator(Iterator[Any]):
    """The iterator ``imap`` returns: results of ``f`` over the input, lazily.

    ``close()`` (also on ``break`` out of a ``for`` loop, ``with``-exit or garbage
    collection) stops it: tasks not yet started are aborted, nothing stays behind.
    """

    def __init__(self, view: Any, f: Callable, iterables: tuple[Any, ...], ordered: bool,
                 max_outstanding: int | str, return_exceptions: bool,
                 chunksize: int | str = 1) -> None:
        from .view import _Chunk, _name

        if not callable(f):
            raise TypeError(f"imap needs a callable, got {type(f).__name__}")
        if not iterables:
            raise TypeError("imap() needs at least one iterable")
        client = view.client
        if max_outstanding == "auto":
            window = max(AUTO_MIN, AUTO_PER_ENGINE * len(client))
        elif type(max_outstanding) is int and max_outstanding >= 0:
            window = max_outstanding or (1 << 62)
        else:
            raise ValueError(f"max_outstanding must be 'auto', 0 (no limit) or an int >= 1, "
                             f"got {max_outstanding!r}")
        if chunksize != "auto" and (type(chunksize) is not int or chunksize < 1):
            raise ValueError(f"chunksize must be an int >= 1 or 'auto', got {chunksize!r}")
        self._auto = chunksize == "auto"
        self._chunk = 1 if self._auto else chunksize
        self._chunked = self._auto or self._chunk > 1  # tasks return lists of values
        self._item_s: float | None = None  # "auto": smoothed seconds per item
        self._input = zip(*iterables)  # TypeError now if one is not iterable
        self._flags = view._task_flags(f)
        self._fbufs = dumps_function(_Chunk(f) if self._chunked else f)
        self._client = client
        self._fname = _name(f)
        self.label = view.label
        self.max_outstanding = window
        self.ordered = ordered
        self.return_exceptions = return_exceptions
        self._refill_at = window - max(1, window // REFILL_FRACTION)
        self._col = _Collector(client, ordered)
        self._inflight: dict[int, str] = {}  # task index -> msg_id, submitted, not yet yielded
        self._sizes: dict[int, int] = {}  # chunked: task index -> its number of items
        self._items = 0  # items in flight (the window counts these)
        self._ready: deque[Any] = deque()  # chunked: values of a chunk not yet yielded
        self._next_index = 0  # of the next task
        self._sent_items = 0  # input items submitted so far (an item's position in the imap)
        self._next_yield = 0  # ordered: index of the next task to yield
        self._input_error: BaseException | None = None
        self._exhausted = False
        self._done = False
        self._fill()  # work starts now, not at the first next()

    def __repr__(self) -> str:
        state = "finished" if self._done else f"{len(self._inflight)} in flight"
        return f"<IMapIterator({self._fname}): {state}>"

    def __iter__(self) -> IMapIterator:
        return self

    def __enter__(self) -> IMapIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self.close()

    # -- submitting --------------------------------------------------------------

    def _chunk_size(self) -> int:
        """Items per task now: the fixed chunksize, or for "auto" ~TARGET_S of measured work
        (one item until a result says how long one takes), and never so many that the
        window holds fewer than CHUNKS_PER_ENGINE tasks per engine."""
        if not self._auto or self._item_s is None:
            return self._chunk
        per_task = math.ceil(autochunk.TARGET_S / max(self._item_s, 1e-7))
        window = min(self.max_outstanding, FILL_MAX)
        return max(1, min(per_task, window // (autochunk.CHUNKS_PER_ENGINE * max(len(self._client), 1))))

    def _fill(self) -> None:
        """Submit input items until the window is full (or the input ends or fails)."""
        if self._exhausted or self._items > self._refill_at:
            return
        client, col = self._client, self._col
        room = min(self.max_outstanding - self._items, FILL_MAX)
        tasks: list[tuple[str, list[Any]]] = []
        sizes: list[int] = []
        first = self._next_index
        size = self._chunk_size()
        chunk: list[tuple] = []

        def sent() -> str:
            """What an item that does not pickle leaves behind (said in its error)."""
            n = self._sent_items + sum(sizes)
            return (f"the {n} item(s) before it were sent: their results are yielded before "
                    "this error is raised" if n else "nothing was sent")

        def flush() -> None:
            """Submit the chunk read so far; if it does not pickle, its items one by one
            up to the one that does not (which raises, naming its position)."""
            nonlocal chunk
            items, chunk = chunk, []
            if not items:
                return
            try:
                pos = self._sent_items + sum(sizes)
                tasks.append((client._new_msg_id(), dumps_items(items, pos, True)))
                sizes.append(len(items))
            except SerializationError:
                for item in items:
                    pos = self._sent_items + sum(sizes)
                    tasks.append((client._new_msg_id(),
                                  dumps_items([item], pos, True, "imap", sent)))
                    sizes.append(1)
                raise

        read = 0
        try:
            for item in self._input:
                read += 1
                if not self._chunked:
                    pos = self._sent_items + len(sizes)
                    tasks.append((client._new_msg_id(),
                                  dumps_items((item,), pos, False, "imap", sent)))
                    sizes.append(1)
                else:
                    chunk.append(item)
                    if len(chunk) >= size:
                        flush()
                if read >= room:
                    break
            else:
                self._exhausted = True
            flush()
        except Exception as e:  # the input iterator raised, or an item does not pickle
            self._exhausted = True
            self._input_error = e
            try:
                flush()  # the items read before the input raised
            except Exception as earlier:  # one of them does not pickle: that came first
                self._input_error = earlier
        if not tasks:
            return
        with col.cond:
            col.unanswered += len(tasks)
        try:
            client._submit(self._fbufs, self._flags, col, tasks, base=first, record=False,
                           tag=(self.label, self._fname))
        except BaseException:
            with col.cond:
                col.unanswered -= len(tasks)
            raise
        for i, (msg_id, _args) in enumerate(tasks, first):
            self._inflight[i] = msg_id
        if self._chunked:
            self._sizes.update(enumerate(sizes, first))
        self._items += sum(sizes)
        self._sent_items += sum(sizes)
        self._next_index = first + len(tasks)

    # -- yielding ----------------------------------------------------------------

    def __next__(self) -> Any:
        if self._ready:
            return self._ready.popleft()
        if self._done:
            raise StopIteration
        self._fill()
        col = self._col
        with col.cond:
            if self.ordered:
                index = self._next_yield
                if index not in self._inflight:
                    outcome = None
                else:
                    col.cond.wait_for(lambda: index in col.by_index)
                    outcome = col.by_index.pop(index)
                    self._next_yield += 1
            elif self._inflight:
                col.cond.wait_for(lambda: bool(col.arrived))
                index, outcome = col.arrived.popleft()
            else:
                outcome = None
        if outcome is None:  # nothing in flight: the input ended (or failed)
            self._finish()
            error, self._input_error = self._input_error, None
            if error is not None:
                raise error
            raise StopIteration
        del self._inflight[index]
        n = self._sizes.pop(index, 1)
        self._items -= n
        self._client._outcomes.pop(outcome.meta[0], None)  # no per-item record stays behind
        try:
            if not outcome.ok:
                raise outcome.error()
            value = outcome.value(self._client)
        except (RemoteError, SerializationError) as e:
            if self.return_exceptions:
                self._ready.extend([e] * (n - 1))  # a failed chunk stands for each of its items
                return e
            self.close()  # like a generator that raised: finished, the rest aborted
            raise
        if not self._chunked:
            return value
        if self._auto:
            self._measured(outcome, n)
        self._ready.extend(value[1:])
        return value[0]

    def _measured(self, outcome: Outcome, n: int) -> None:
        """Fold one result's seconds per item (its engine's timestamps) into the estimate."""
        started, completed = outcome.meta[3], outcome.meta[4]
        if not (isinstance(started, float) and isinstance(completed, float)):
            return
        per_item = max(completed - started, 0.0) / n
        est = self._item_s
        self._item_s = per_item if est is None else 0.7 * est + 0.3 * per_item

    # -- stopping ----------------------------------------------------------------

    def _finish(self) -> None:
        self._done = True
        self._input = iter(())  # let go of the caller's iterators

    def close(self) -> None:
        """Stop: tasks not started yet are aborted (they never run), results still to
        come are dropped when they arrive.  Idempotent."""
        if self._done:
            return
        self._finish()
        col = self._col
        with col.cond:
            col.closed = True
            for outcome in col.by_index.values():
                self._client._outcomes.pop(outcome.meta[0], None)
            for _index, outcome in col.arrived:
                self._client._outcomes.pop(outcome.meta[0], None)
            col.by_index.clear()
            col.arrived.clear()
            waiting = col.unanswered
        ids = list(self._inflight.values())
        self._inflight.clear()
        self._ready.clear()
        if waiting and ids:
            # Not from here: close() may run in garbage collection on any thread, even the
            # client's receiving one, which must not wait for the controller's answer.
            runner.call(_abort_quietly, self._client, ids)


def _abort_quietly(client: Client, msg_ids: list[str]) -> None:
    """Abort what an abandoned imap left queued (nothing to do if the client closed)."""
    if client.closed:
        return
    try:
        client.abort(msg_ids)
    except KeyError:  # some finished and were dropped from the records: nothing to stop
        pass
