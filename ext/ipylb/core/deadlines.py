"""Time limits: ``timeout`` of tasks not yet started, ``walltime`` of running attempts.

Walltimes: when to interrupt, when to restart.

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

Timeouts (ipyparallel's meaning): a task with ``timeout`` T that has not started T
seconds after its submission fails with DependencyTimeout (ipyparallel's name); an
attempt that ran (failed and is retried, or died with its engine) drops its deadline.
A heap of deadlines is checked lazily: an entry whose task is no longer waiting or
ready is dropped.

This module keeps the walltime timers (:class:`Walltimes`) and :class:`Deadlines`, the
part of :class:`ipylb.core.scheduler.Scheduler` that applies both rules
(``Scheduler.handle`` stays the only way in).  Each walltime timer is a heap entry tagged
with the attempt's token: a task that finished, moved or started again made its old
entries stale, and they are dropped when they reach the top, never searched for.
"""

from __future__ import annotations

import heapq
from typing import Any

from .events import TIMEOUT, WALLTIME, Command, Interrupt, RestartEngine, TaskStarted
from .task import ASSIGNED, READY, WAITING, Engine, Extra, Task

__all__ = ["RUN", "GRACE", "Walltimes", "exceeded", "Deadlines", "wt_live"]

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


def wt_live(t: Task, token: int) -> bool:
    """Whether a walltime timer is still the running attempt's."""
    return t.state is ASSIGNED and t.x.wt_token == token  # type: ignore[union-attr]


class Deadlines:
    """The timing part of :class:`~ipylb.core.scheduler.Scheduler` (a mixin): timeouts of
    unassigned tasks and walltimes of running attempts."""

    def _on_started(self, ev: TaskStarted, out: list[Command]) -> None:
        """The engine started a task with a walltime: its run-time clock starts now."""
        t = self._tasks.get(ev.task_id)
        if t is None or t.state is not ASSIGNED or t.engine.id != ev.engine_id:  # type: ignore[union-attr]
            return  # stale: it moved on
        x = t.x
        if x is None or not x.walltime or x.started is not None or t.engine.queue[0] is not t:  # type: ignore[union-attr]
            return  # no limit, a duplicate report, or not the task its engine runs now
        x.started = ev.time
        x.wt_token = self._walltimes.arm(ev.time + x.walltime, t, RUN)
        self._story.append((t.id, ASSIGNED, ASSIGNED, f"started on engine {ev.engine_id}", self._now))

    def _expire_walltimes(self, now: float, out: list[Command]) -> None:
        """Interrupt running attempts past their walltime; restart the engines of those
        still running a grace period later."""
        while due := self._walltimes.pop_due(now):  # a grace of 0 is due at once: loop
            self._walltime_step(due, now, out)

    def _walltime_step(self, due: list[tuple[Task, int, int]], now: float,
                       out: list[Command]) -> None:
        for t, token, phase in due:
            x: Extra = t.x  # type: ignore[assignment]
            if t.state is not ASSIGNED or x.wt_token != token:
                continue  # stale: the attempt ended or moved
            e: Engine = t.engine  # type: ignore[assignment]
            if phase == RUN:
                x.interrupted = now
                x.wt_token = self._walltimes.arm(now + self._walltimes.grace, t, GRACE)
                self._story.append((t.id, ASSIGNED, ASSIGNED,
                                    f"walltime {x.walltime:g}s reached: interrupt", now))
                out.append(Interrupt(t.id, e.id))
                continue
            reason = (f"its task {t.id} ignored an interrupt for {self._walltimes.grace:g}s "
                      "after its walltime")
            self._engines.pop(e.id)
            self._unqueue(t, e)
            self._attempt_failed(t, e, WALLTIME, exceeded(
                t.id, x.walltime, now - x.started,  # type: ignore[operator]
                f"did not stop within {self._walltimes.grace:g}s of an interrupt, "
                f"so its engine {e.id} was restarted"), out)
            self._drop_engine(e, reason, out, running=False)
            out.append(RestartEngine(e.id, reason))

    def _push_deadline(self, t: Task) -> None:
        self._dl_count += 1
        heapq.heappush(self._deadlines, (t.x.deadline, self._dl_count, t))  # type: ignore[arg-type]

    def _expire(self, now: float, out: list[Command]) -> None:
        """Fail every unassigned task whose deadline is due."""
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            deadline, _, t = heapq.heappop(dl)
            if t.x.deadline == deadline and (t.state is WAITING or t.state is READY):
                self._fail_timeout(t, out)

    def _fail_timeout(self, t: Task, out: list[Command]) -> None:
        x: Extra = t.x  # type: ignore[assignment]
        waited = self._now - x.submitted
        what = self._waiting_for(t)
        self._fail(t, TIMEOUT,
                   f"task {t.id} timed out: it waited {waited:g}s (timeout {x.timeout:g}s) "
                   f"for {what} without starting", out,
                   why=f"{t.id} timed out waiting for {what}")
