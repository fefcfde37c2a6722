"""Where user code that ipylb's own threads must not run goes: done callbacks
(``AsyncResult.add_done_callback``, which ``asyncio.wrap_future`` uses too),
``cancel()``'s abort, warnings and interrupts the receiving thread hands on.

The client's receiving thread files results and wakes waiters itself, and hands anything
else to :data:`runner` (issue 9 item 6: nothing a user writes may hold up the delivery of
a result).  One runner per process, made again in a forked child.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["CALLBACK_STALL_S", "CallbackRunner", "run_callback", "runner"]

# A callback still running after this many seconds counts as blocked: the callbacks queued
# behind it start on another thread.
CALLBACK_STALL_S = 0.2

log = logging.getLogger("ipylb.client")


def run_callback(fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn(*args)`` here; an exception it raises is logged (logger ``ipylb.client``),
    not raised, as ``concurrent.futures`` does for done callbacks."""
    try:
        fn(*args)
    except Exception:  # as concurrent.futures does: logged, the other callbacks still run
        log.exception("exception calling callback %r", fn)


class CallbackRunner:
    """Runs user code that ipylb's threads must not run themselves (done callbacks,
    cancel()'s abort): in the order given, one at a time, on a daemon thread.

    Sound under blocking: a watchdog thread (started with the first worker; it sleeps on a
    condition, never polls, while nothing is queued) gives the queue to a further worker
    when callbacks are queued but every worker has been inside one callback for
    ``CALLBACK_STALL_S`` (a callback waiting for a result whose own callbacks are queued
    behind it, or for anything else).  Start order stays the queue's order; workers beyond
    the first leave once idle.  So the common case costs one lock and one notify per
    callback and no thread per callback, and no callback can stall the others for good.
    """

    def __init__(self) -> None:
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # workers wait here for callbacks
        self._watch = threading.Condition(lock)  # the watchdog waits here
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._workers = 0  # worker threads alive
        self._idle = 0  # ... of them waiting for a callback
        self._taken = 0  # callbacks taken from the queue so far: the watchdog's progress mark
        self._watching = False

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` soon, after what was queued before (exceptions are logged)."""
        with self._work:
            self._queue.append((fn, args))
            if self._idle:
                self._work.notify()
            elif not self._workers:
                self._spawn()
            else:
                self._watch.notify()  # every worker is busy: time them

    def _spawn(self) -> None:  # with the lock held
        self._workers += 1
        threading.Thread(target=self._work_loop, daemon=True, name="ipylb-callbacks").start()
        if not self._watching:
            self._watching = True
            threading.Thread(target=self._watch_loop, daemon=True,
                             name="ipylb-callbacks-watchdog").start()

    def _work_loop(self) -> None:
        cond, queue = self._work, self._queue
        cond.acquire()
        try:
            while True:
                while not queue:
                    if self._idle:  # another worker is idle already: one is enough
                        self._workers -= 1
                        return
                    self._idle += 1
                    cond.wait()
                    self._idle -= 1
                fn, args = queue.popleft()
                self._taken += 1
                cond.release()
                try:
                    run_callback(fn, *args)
                finally:
                    cond.acquire()
        finally:
            cond.release()

    def _watch_loop(self) -> None:
        queue = self._queue
        with self._watch:
            while True:
                if not queue or self._idle:  # nothing waits, or a worker will take it
                    self._watch.wait()
                    continue
                mark = self._taken
                deadline = time.monotonic() + CALLBACK_STALL_S
                while queue and not self._idle and self._taken == mark:
                    left = deadline - time.monotonic()
                    if left <= 0:  # every worker is stuck in a callback: one more
                        self._spawn()
                        break
                    self._watch.wait(left)

    def _after_fork(self) -> None:
        self.__init__()  # type: ignore[misc]


# The process's runner (the receiving thread, AsyncResult, imap, live output use it).
runner = CallbackRunner()
os.register_at_fork(after_in_child=runner._after_fork)
