"""Failures and retries: a failed attempt uses a retry (avoiding the engine it failed
on) or fails the task; a task the scheduler fails emits Fail and counts as a failed
dependency for its dependents (:meth:`~ipylb.core.dependencies.Dependencies._finished`).
"""

from __future__ import annotations

from .events import IMPOSSIBLE, Command, Fail
from .task import FAILED, READY, WAITING, Engine, Task, extra

__all__ = ["Failures"]


class Failures:
    """The failure part of :class:`~ipylb.core.scheduler.Scheduler` (a mixin: the
    scheduler's ``__init__`` owns the state it uses)."""

    def _retry(self, t: Task, e: Engine, what: str) -> None:
        """An attempt on ``e`` failed and ``t`` has retries left: use one, avoid ``e``."""
        t.retries -= 1
        x = extra(t)
        if x.failed_on is None:
            x.failed_on = set()
        x.failed_on.add(e)
        x.deadline = None  # it ran: the timeout no longer applies
        self._requeue(t, f"{what}, retrying ({t.retries} left)")

    def _attempt_failed(self, t: Task, e: Engine, error: str, message: str,
                        out: list[Command], why: str = "", retry: str = "") -> None:
        """The running attempt of ``t`` on ``e`` (already off its queue) failed for a reason
        the scheduler knows (``error``): retry it if it may, else fail it with ``message``.
        ``retry``: the story's words for the attempt's end (default: the message)."""
        x = t.x
        if t.retries and (x is None or not x.aborted):
            self._retry(t, e, retry or message)
            return
        t.engine = None
        self._fail(t, error, message, out, engine_id=e.id, why=why)

    def _fail(self, t: Task, error: str, message: str, out: list[Command], *,
              engine_id: int | None = None, why: str = "", cause: Task | None = None) -> None:
        """The scheduler fails ``t``: emit Fail, then let its dependents count it."""
        prev = t.state
        if prev is WAITING or prev is READY:
            self._unassigned -= 1
        t.state = FAILED
        t.engine = None
        x = extra(t)
        x.deadline = None
        self._ready_excl.discard(t)
        x.why = why or message
        cx = cause.x if cause is not None and cause.state is FAILED else None
        if cx is not None:
            x.depth, x.root = cx.depth + 1, cx.root
        else:
            x.depth, x.root = 1, x.why
        self._drop_follow_links(t)
        self._story.append((t.id, prev, FAILED, error, self._now))
        out.append(Fail(t.id, error, message, engine_id))
        if t.dependents:
            self._finished(t, out)

    def _fail_impossible(self, t: Task, why: str, out: list[Command],
                         cause: Task | None = None) -> None:
        """Fail ``t`` with ImpossibleDependency because ``why`` (``cause``: the dependency)."""
        self._fail(t, IMPOSSIBLE, f"task {t.id} cannot run: {why}", out,
                   why=f"{t.id} was impossible because {why.split('; ', 1)[0]}", cause=cause)
