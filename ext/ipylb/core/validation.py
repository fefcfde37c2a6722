"""The scheduler's invariants, checked after every event when ``validate=True`` (tests)."""

from __future__ import annotations

from collections.abc import Callable

from .pipeline import MAX_DEPTH
from .task import ASSIGNED, READY, WAITING, Extra, Task, unrestricted

__all__ = ["Validation"]


class Validation:
    """The invariant checks of :class:`~ipylb.core.scheduler.Scheduler` (a mixin)."""

    def validate(self) -> None:
        """Check every invariant; raise AssertionError naming the first broken one."""

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise AssertionError(what)

        cap = self._cap
        need(all(e.id == i for i, e in self._engines.items()), "engines filed under their ids")
        nfree = 0
        assigned = 0
        for e in self._engines.values():
            need(e.alive, f"{e} registered but not alive")
            need(e.load == len(e.queue), f"{e}: load {e.load} != {len(e.queue)} outstanding")
            # hwm="auto": a lowered depth leaves tasks already sent where they are
            need(e.load <= (cap if self._pipe is None else MAX_DEPTH), f"{e}: over hwm {self.hwm}")
            nfree += e.load < cap
            for t in e.queue:
                need(t.state is ASSIGNED and t.engine is e, f"{t} queued on {e} but not assigned there")
            assigned += e.load
        need(nfree == self._nfree, f"free engine count {self._nfree} != {nfree}")
        if self._pipe is not None:
            idle = {e for e in self._engines.values() if not e.load}
            need(self._pipe.idle == idle, f"idle engines {self._pipe.idle} != {idle}")
            for e in self._engines.values():  # a busy engine is held, or will be checked
                need(not e.held or e.load >= 1, f"{e} held with nothing running")
                need(not e.load or e.held or e in self._pipe.timed, f"{e} busy with no timer")
        else:
            need(not any(e.held for e in self._engines.values()), "an engine held at a fixed hwm")
        wrong = self._free.check(self._by_lru())
        need(wrong is None, f"free-engine index: {wrong}")
        plain_ids = {id(t) for t in self._plain} | {id(t) for _, t in self._plain_late}
        heap_entries = {(e.id, id(t), g) for e in self._engines.values() for _, g, t in e.heap}
        unassigned = 0
        n_assigned = 0
        free = [e for e in self._engines.values() if e.load < cap and not e.held]
        for t in self._tasks.values():
            s = t.state
            if s is WAITING or s is READY:
                unassigned += 1
                need(t.engine is None, f"{t} unassigned but has an engine")
                need(t.x is None or t.x.deadline is None or t.x.deadline > self._now,
                     f"{t} is past its deadline but still unassigned")
            if s is ASSIGNED:
                n_assigned += 1
                need(t.engine is not None and t.engine.alive and t in t.engine.queue,
                     f"{t} assigned but not on a live engine's queue")
                if t.x is not None and t.x.started is not None:
                    self._check_walltime(t, need)
            if s is WAITING:
                need(not self._met(t), f"{t} waits although its dependencies are met")
                self._check_deps_live(t, need)
            if s is READY:
                x = t.x
                if x is not None:
                    if x.after is not None:
                        need(x.after.met, f"{t} ready but its after dependency is not met")
                    self._check_deps_live(t, need)
                if x is None or unrestricted(x):
                    need(not free, f"{t} ready and unconstrained while {free} have free slots")
                    need(id(t) in plain_ids, f"{t} ready but not in the global queue")
                else:
                    cands = self._candidates(t)
                    need(not any(e.load < cap and not e.held for e in cands),
                         f"{t} ready while its candidate engines {cands} have free slots")
                    for e in cands:
                        need((e.id, id(t), t.x.gen) in heap_entries, f"{t} missing from {e}'s queue")
                    if x.follow is None:
                        need(t in self._ready_excl, f"{t} ready with exclusions but not tracked")
                    if not cands:
                        need(self._stuck(t) is None, f"{t} has no candidate engine and should have failed")

        need(unassigned == self._unassigned, f"unassigned count {self._unassigned} != {unassigned}")
        need(n_assigned == assigned, f"{n_assigned} assigned tasks but engines hold {assigned}")
        for t in self._ready_excl:
            need(t.state is READY, f"{t} tracked as ready with exclusions but is {t.state}")

    def _check_walltime(self, t: Task, need: Callable[[bool, str], None]) -> None:
        """A running attempt with a walltime: it is its engine's first task, interrupted
        once past its walltime, and never past the grace period after that."""
        x: Extra = t.x  # type: ignore[assignment]
        need(t.engine.queue[0] is t, f"{t} started but not the first task of its engine")  # type: ignore[union-attr]
        need(x.wt_token != 0, f"{t} started without a walltime timer")
        if x.interrupted is None:
            need(self._now < x.started + x.walltime, f"{t} past its walltime, not interrupted")  # type: ignore[operator]
        else:
            need(self._now < x.interrupted + self._walltimes.grace,
                 f"{t} past its walltime's grace period, its engine not restarted")

    def _check_deps_live(self, t: Task, need: Callable[[bool, str], None]) -> None:
        """An unfinished task must not be impossible by the tallies' own account."""
        x = t.x
        if x is None:
            return
        if x.after is not None:
            need(not x.after.dead, f"{t} is alive but its after dependency is unreachable")
        if x.targets is not None:
            need(self._off_target(t) is None, f"{t} is alive but cannot run: {self._off_target(t)}")
            for eid in x.targets:
                if eid in self._engines:
                    need(t in self._targeted.get(eid, ()), f"{t} not listed under its target {eid}")
        if x.follow is not None:
            need(not x.follow.dead, f"{t} is alive but its follow dependency is unreachable")
            need(self._when_dead(t) is None, f"{t} is alive but cannot follow: {self._when_dead(t)}")
