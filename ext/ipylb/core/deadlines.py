"""Run-time limits (``walltime``) of running tasks: when to interrupt, when to restart.

The rule (API.md "Flags"; ipylb's own: ipyparallel's ``timeout`` only limits the wait
before a task starts).  An attempt of a task with walltime ``W`` starts when its engine
reports it started (:class:`~ipylb.core.events.TaskStarted`, stamped with the controller's
clock when it arrives: the engine's clock is never trusted).  Then:

* at ``start + W``, if the attempt still runs, the core emits
  :class:`~ipylb.core.events.Interrupt` (KeyboardInterrupt in that task only);
* at ``start + W + grace``, if it still runs (it ignores or blocks SIGINT), the core
  forgets the engine and emits :class:`~ipylb.core.events.RestartEngine`;
* an interrupted attempt that ends in an error, or whose engine is restarted or dies,
  fails with ``WalltimeExceeded``: a failed attempt, retried while ``retries`` last.  An
  interrupted attempt that still returns a value (it caught the KeyboardInterrupt) succeeds.

This module keeps the timers; :class:`ipylb.core.scheduler.Scheduler` applies the rule
(``Scheduler.handle`` stays the only way in).  Each timer is a heap entry tagged with the
attempt's token: a task that finished, moved or started again made its old entries stale,
and they are dropped when they reach the top, never searched for.
"""

from __future__ import annotations

import heapq
from typing import Any

__all__ = ["RUN", "GRACE", "Walltimes", "exceeded"]

RUN = 0  # the entry fires at start + walltime: interrupt
GRACE = 1  # the entry fires at interrupt + grace: restart the engine


class Walltimes:
    """A heap of (due time, phase) timers for running attempts.

    ``grace``: seconds between the Interrupt and the RestartEngine (API.md: 5 by default).
    """

    __slots__ = ("grace", "heap", "_n")

    def __init__(self, grace: float = 5.0) -> None:
        if not grace >= 0:
            raise ValueError(f"the walltime grace period must be >= 0 seconds, not {grace!r}")
        self.grace = grace
        self.heap: list[tuple[float, int, Any, int, int]] = []
        self._n = 0  # tokens, and the heap's tie-breaker

    def arm(self, due: float, task: Any, phase: int) -> int:
        """Add a timer for ``task`` at ``due``; returns its token (keep it on the task:
        the entry is live only while the task's token is this one)."""
        self._n += 1
        heapq.heappush(self.heap, (due, self._n, task, self._n, phase))
        return self._n

    def pop_due(self, now: float) -> list[tuple[Any, int, int]]:
        """Remove and return the timers due at ``now``: (task, token, phase), oldest first.
        The caller drops those whose token is no longer the task's."""
        heap = self.heap
        due = []
        while heap and heap[0][0] <= now:
            _, _, task, token, phase = heapq.heappop(heap)
            due.append((task, token, phase))
        return due

    def next(self, live: Any) -> float | None:
        """The earliest due time of a live timer (``live(task, token)``), or None;
        stale entries on top are dropped."""
        heap = self.heap
        while heap:
            due, _, task, token, _ = heap[0]
            if live(task, token):
                return due
            heapq.heappop(heap)
        return None


def exceeded(task_id: str, walltime: float, ran: float, how: str) -> str:
    """The message of a WalltimeExceeded failure: the limit, how long it ran, and what
    stopped it (``how``: interrupted, or its engine restarted)."""
    return (f"task {task_id} exceeded its walltime of {walltime:g}s: it ran {ran:.1f}s "
            f"and {how}")
