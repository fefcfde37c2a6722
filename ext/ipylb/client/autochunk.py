"""``map(..., chunksize="auto")``: chunks sized from a measured item time.

The model is joblib's auto batching: a message should carry enough work to hide
its own cost, and no engine should wait long at the end.  The client measures,
once per map, before it chooses:

1. Probe: the first items, two per registered engine, go out as tasks of one
   item each (they are the map's first tasks: their results are kept).
2. Once they are all back, the fastest gives the time one item takes on an
   engine (the engine's own ``started``/``completed``; the client's clock if the
   engine did not say).  The fastest, because each engine's second probe runs
   warm (a first call may import modules) and a loaded machine only ever adds
   time.  If none has come after ``PROBE_WAIT_S``, items are slow and chunks hold
   one item; if only some have, the fastest of those stands (an overestimate:
   smaller chunks, never wrong).
3. The rest go out in chunks of ``TARGET_S / item time`` items, but at least
   ``CHUNKS_PER_ENGINE`` chunks per engine (so the last chunks to finish are
   short) and at least one item.

So a map of no-ops travels in chunks of thousands of items and a map of
one-second items in chunks of one (as ``chunksize=1``).  ``map_async`` returns
once the first item is done (at most ``PROBE_WAIT_S`` seconds): with engines busy
with earlier tasks, that wait may run out and the map falls back to one item per
chunk, which is always correct, if slower for trivial items.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

from ..serialize import dumps_items
from .asyncresult import AsyncMapResult
from .outcome import Outcome

if TYPE_CHECKING:
    from .client import Client

# How long map_async waits for the first probe result, in seconds.  Engines are busy with
# the probes meanwhile, so a long wait costs no engine time; a short one would take a
# cold start or a loaded machine for slow items (and send trivial items one by one).
PROBE_WAIT_S = 2.0
# The work one chunk should carry, in seconds: joblib's minimum ideal batch duration
# (~400 task round trips here).  A one-item probe's time includes the engine's own cost
# per task (~0.1 ms), so for trivial items chunks come out ~2,000 items long.
TARGET_S = 0.2
# The rest of the map is cut into at least this many chunks per engine.
CHUNKS_PER_ENGINE = 4
# Probe tasks (one item each) per engine.
PROBES_PER_ENGINE = 2


def chunk_for(item_s: float | None, items: int, engines: int) -> int:
    """Items per chunk for ``items`` items of ``item_s`` seconds each on ``engines`` engines
    (``item_s`` None: slower than the probe waited for, so 1)."""
    if item_s is None or items <= 0:
        return 1
    by_time = math.ceil(TARGET_S / max(item_s, 1e-7))
    balance = math.ceil(items / (max(engines, 1) * CHUNKS_PER_ENGINE))
    return max(1, min(by_time, balance))


class _Probe:
    """Receives the probe tasks' results until the map's AsyncMapResult exists, then
    passes them (and later ones) on to it.  Has what the client needs of a result
    holder: ``_deliver(index, outcome)`` and ``wait(timeout)``."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.n = n
        self.got: dict[int, Outcome] = {}
        self.seconds: list[float] = []  # each probe's item time, as they come
        self.target: AsyncMapResult | None = None
        self.sent = time.time()

    def _deliver(self, index: int, outcome: Outcome) -> None:
        with self.cond:
            target = self.target
            if target is None:
                self.got[index] = outcome
                self.seconds.append(self._took(outcome))
                self.cond.notify_all()
                return
        target._deliver(index, outcome)

    def _took(self, outcome: Outcome) -> float:
        started, completed = outcome.meta[3], outcome.meta[4]
        if isinstance(started, float) and isinstance(completed, float) and completed >= started:
            return completed - started
        return time.time() - self.sent

    def wait(self, timeout: float | None = None) -> bool:
        with self.cond:
            target = self.target
            if target is None:
                return self.cond.wait_for(lambda: self.target is not None
                                          or len(self.got) == self.n, timeout)
        return target.wait(timeout)

    def item_seconds(self, wait_s: float) -> float | None:
        """Seconds an item takes: the fastest probe once all are back, waiting up to
        ``wait_s``; the fastest so far after that; None if none came."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) == self.n, wait_s)
            return min(self.seconds, default=None)

    def hand_over(self, ar: AsyncMapResult) -> None:
        """From now on results go to ``ar``; those already here go first."""
        with self.cond:
            self.target = ar
            got, self.got = self.got, {}
        for index, outcome in got.items():
            ar._deliver(index, outcome)


def map_auto(client: Client, fbuf: Any, flags: dict[str, Any] | None, items: list[tuple],
             ordered: bool, fname: str, return_exceptions: bool,
             label: str | None = None) -> AsyncMapResult:
    """Submit a map whose chunks are sized as the module docstring says.

    ``fbuf`` is the pickled chunk runner (``view._Chunk(f)``); ``items`` the argument
    tuples.  Raises SerializationError naming the first item that does not pickle by its
    position in the map (after aborting the probe tasks, if they were sent)."""
    n_probe = min(len(items), PROBES_PER_ENGINE * max(len(client), 1))
    probe = _Probe(n_probe)
    probe_tasks = [(client._new_msg_id(), dumps_items(items[i:i + 1], i, chunked=True))
                   for i in range(n_probe)]
    tag = (label, fname)
    client._submit(fbuf, flags, probe, probe_tasks, tag=tag)
    probe_ids = [msg_id for msg_id, _ in probe_tasks]
    rest = items[n_probe:]
    size = chunk_for(probe.item_seconds(PROBE_WAIT_S) if rest else None, len(rest),
                     len(client))
    chunks = [rest[i:i + size] for i in range(0, len(rest), size)]
    sent = (f"the map was not submitted: its first {n_probe} item(s), sent ahead to time the "
            "rest, were aborted (those already done are dropped)")
    try:
        arg_bufs = [dumps_items(chunk, n_probe + k * size, True, sent=sent)
                    for k, chunk in enumerate(chunks)]
    except BaseException:
        try:
            client.abort(probe_ids)  # nothing of a map that raised keeps running
        except KeyError:  # finished and dropped already
            pass
        raise
    ids = [client._new_msg_id() for _ in chunks]
    ar = AsyncMapResult(client, probe_ids + ids, [1] * n_probe + [len(c) for c in chunks],
                        ordered, fname, return_exceptions)
    ar.label = label
    ar._chunked = True  # every task, probes too, returns the list of its items' values
    probe.hand_over(ar)
    client._submit(fbuf, flags, ar, list(zip(ids, arg_bufs, strict=True)), base=n_probe, tag=tag)
    return ar
