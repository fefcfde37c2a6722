"""A thin harness over the scheduler core for tests: short calls, time kept for you."""

from __future__ import annotations

from typing import Any

from ipylb.core.events import (
    AbortRequested,
    Assign,
    DepSpec,
    EngineAdded,
    EngineRemoved,
    TaskDone,
    TaskForgotten,
    TaskStarted,
    TaskSubmitted,
    TaskUnmet,
    Tick,
)
from ipylb.core.scheduler import Scheduler


def dep(*ids: str, all: bool = True, success: bool = True, failure: bool = False) -> DepSpec:
    """A DepSpec over ``ids``."""
    return DepSpec(frozenset(ids), all, success, failure)


def _spec(value: Any) -> DepSpec | None:
    if value is None or isinstance(value, DepSpec):
        return value
    if isinstance(value, str):
        return dep(value)
    return dep(*value)


class Core:
    """A validating Scheduler plus the current time and one-line event helpers."""

    def __init__(self, engines: int = 2, **kw: Any) -> None:
        kw.setdefault("seed", 0)
        kw.setdefault("validate", True)
        self.s = Scheduler(**kw)
        self.now = 0.0
        for e in range(engines):
            assert self.add(e) == []

    def __call__(self, event: Any) -> list[Any]:
        return self.s.handle(event)

    def submit(self, tid: str, after: Any = None, follow: Any = None,
               timeout: float | None = None, retries: int = 0,
               walltime: float | None = None, targets: Any = None) -> list[Any]:
        tg = None if targets is None else frozenset(targets)
        return self(TaskSubmitted(tid, self.now, _spec(after), _spec(follow), timeout, retries,
                                  walltime=walltime, targets=tg))

    def started(self, tid: str, eid: int) -> list[Any]:
        return self(TaskStarted(tid, eid, self.now))

    def done(self, tid: str, eid: int, ok: bool = True, skipped: bool = False) -> list[Any]:
        return self(TaskDone(tid, eid, ok, self.now, skipped=skipped))

    def unmet(self, tid: str, eid: int, reason: str = "") -> list[Any]:
        return self(TaskUnmet(tid, eid, self.now, reason))

    def add(self, eid: int) -> list[Any]:
        return self(EngineAdded(eid, self.now))

    def remove(self, eid: int, reason: str = "killed by signal 9") -> list[Any]:
        return self(EngineRemoved(eid, reason, self.now))

    def abort(self, tid: str) -> list[Any]:
        return self(AbortRequested(tid, self.now))

    def forget(self, tid: str) -> list[Any]:
        return self(TaskForgotten(tid, self.now))

    def tick(self, t: float) -> list[Any]:
        self.now = t
        return self(Tick(t))

    def state(self, tid: str) -> str | None:
        return self.s.task_state(tid)

    def run(self, tid: str) -> int:
        """Submit a plain task and return the engine it was assigned to."""
        (cmd,) = self.submit(tid)
        assert isinstance(cmd, Assign) and cmd.task_id == tid
        return cmd.engine_id
