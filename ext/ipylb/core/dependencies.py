"""Dependencies as the scheduler tracks them, and the explanations of impossible ones.

:mod:`.deps` holds the pure rules (:class:`~ipylb.core.deps.Tally`); this part applies
them to the task records: a finished task's dependents count its outcome and are
re-evaluated (ready, still waiting, or impossible, cascading from a work list), and
every impossible dependency gets a one-line reason that names the tasks, engines and
rule involved (API.md "Dependencies"; ipyparallel's ``ImpossibleDependency``).
"""

from __future__ import annotations

from .deps import Tally, rule, wants
from .events import Command, DepSpec
from .task import (
    ASSIGNED,
    CHAIN,
    DONE,
    FAILED,
    WAITING,
    Engine,
    Extra,
    Task,
    eids,
    said,
    show_ids,
)

__all__ = ["Dependencies"]


class Dependencies:
    """The dependency part of :class:`~ipylb.core.scheduler.Scheduler` (a mixin: the
    scheduler's ``__init__`` owns the state it uses)."""

    def _count(self, t: Task, d: Task) -> str | None:
        """Task ``t`` learns that its dependency ``d`` finished.

        Updates the tallies; returns why ``t`` became impossible, or None.  For a
        ready task with follow all=False a new engine may join its candidates:
        the caller queues it again.
        """
        x: Extra = t.x  # type: ignore[assignment]
        ok = d.state is DONE and d.ok
        why = None
        a = x.after
        if a is not None and d.id in a.spec.ids:
            counted = a.spec.success if ok else a.spec.failure
            a.add(counted)
            if not counted and a.dead:
                why = self._bad_dep_why("after", a, d)
        f = x.follow
        if f is not None and d.id in f.spec.ids:
            spec = f.spec
            e = d.engine if d.state is DONE else None
            counted = spec.success if ok else spec.failure
            if counted and e is not None:
                f.add(True)
                if e.alive:
                    e.followers.add(t)
                if spec.all:
                    if x.f_engine is None:
                        x.f_engine = e
                    elif x.f_engine is not e and why is None:
                        why = (f"its follow dependencies ran on different engines "
                               f"({self._where_ran(x.f_engine, spec)}, but {d.id} on engine {e.id}) "
                               "and follow with all=True needs them all on one engine")
                    if not e.alive and why is None:
                        why = f"its follow dependency {d.id} ran on engine {e.id}, which is gone"
                    if why is None and x.targets is not None and e.id not in x.targets:
                        why = (f"its follow dependency {d.id} ran on engine {e.id}, which is not "
                               f"among its targets ({eids(x.targets)})")
                else:
                    x.f_engines.add(e)  # type: ignore[union-attr]
            else:
                f.add(False)
                if spec.all and why is None:
                    if counted:
                        why = (f"its follow dependency {d.id} {self._outcome(d)} without running "
                               "on an engine, so there is no engine to follow it to")
                    else:
                        why = self._bad_dep_why("follow", f, d)
            if why is None and not spec.all and not f.pending:
                why = self._follow_any_dead(t)
        return why

    def _met(self, t: Task) -> bool:
        """Whether a waiting task's after and follow dependencies are met now."""
        x: Extra = t.x  # type: ignore[assignment]
        if x.after is not None and not x.after.met:
            return False
        f = x.follow
        if f is not None:
            if f.spec.all:
                return f.good == f.n
            return any(e.alive for e in x.f_engines)  # type: ignore[union-attr]
        return True

    def _when_dead(self, t: Task) -> str | None:
        """Why an unfinished task's dependencies can never be met (no refusals involved)."""
        x: Extra = t.x  # type: ignore[assignment]
        if x.targets is not None:
            why = self._off_target(t)
            if why is not None:
                return why
        f = x.follow
        if f is None:
            return None
        if f.spec.all:
            e = x.f_engine
            if e is not None and not e.alive:
                return (f"its follow dependencies ran on engine {e.id}, which is gone, "
                        "and follow with all=True needs that engine")
            return None
        if f.pending:
            return None
        return self._follow_any_dead(t)

    def _follow_any_dead(self, t: Task) -> str | None:
        """follow all=False with every dependency finished: is any live engine left?"""
        x: Extra = t.x  # type: ignore[assignment]
        f: Tally = x.follow  # type: ignore[assignment]
        ref = x.refused or ()
        engines = x.f_engines
        tg = x.targets
        if any(e.alive and e not in ref and (tg is None or e.id in tg)
               for e in engines):  # type: ignore[union-attr]
            return None
        if tg is not None and any(e.alive and e not in ref for e in engines):  # type: ignore[union-attr]
            return (f"the engines its follow dependencies ran on "
                    f"({eids(e.id for e in engines if e.alive)}) are not among its targets "
                    f"({eids(tg)}), and all of them have finished")
        if not engines:
            return (f"none of its follow dependencies ({show_ids(f.spec.ids)}) "
                    f"{self._past(f.spec)} on an engine, and follow({rule(f.spec)}) "
                    "needs one that did")
        gone = sorted(e.id for e in engines if not e.alive)
        refused = sorted(e.id for e in engines if e.alive)
        parts = []
        if gone:
            parts.append(f"engine(s) {', '.join(map(str, gone))} gone")
        if refused:
            parts.append(f"engine(s) {', '.join(map(str, refused))} refused it")
        return (f"every engine its follow dependencies ran on is unavailable "
                f"({' and '.join(parts)}) and all of them have finished")

    @staticmethod
    def _past(spec: DepSpec) -> str:
        w = wants(spec)
        return {"succeed": "succeeded", "fail": "failed", "finish": "finished"}[w]

    def _off_target(self, t: Task) -> str | None:
        """Why a task with targets can never run on one of them, or None."""
        x: Extra = t.x  # type: ignore[assignment]
        tg: frozenset[int] = x.targets  # type: ignore[assignment]
        live = [e for eid in tg if (e := self._engines.get(eid)) is not None]
        if not live:
            return (f"none of the engines it may run on (targets {eids(tg)}) is registered "
                    "any more, and engine ids are never reused")
        if x.refused and all(e in x.refused for e in live):
            return (f"refused by every engine it may run on (targets {eids(tg)}): a "
                    f"functional dependency (@require/@depend) is unmet on each{said(x)}")
        return None

    def _stuck(self, t: Task) -> str | None:
        """A ready constrained task has no candidate engine: impossible, or just wait?"""
        why = self._when_dead(t)
        if why is not None:
            return why
        x: Extra = t.x  # type: ignore[assignment]
        f = x.follow
        if f is None:
            if not self._engines:
                return None  # no engine at all: one may still come
            n = len(self._engines)
            return (f"refused by all {n} engine{'s' if n > 1 else ''} "
                    f"({', '.join(map(str, sorted(self._engines)))}): "
                    f"a functional dependency (@require/@depend) is unmet on each{said(x)}")
        if f.spec.all:  # its engine is alive (else _when_dead said so) and refused it
            return (f"refused by engine {x.f_engine.id}, the only engine its follow "  # type: ignore[union-attr]
                    f"dependencies allow (a functional dependency is unmet there{said(x)})")
        return None  # follow any: a pending dependency may still run somewhere usable

    def _where_ran(self, e: Engine, spec: DepSpec) -> str:
        """Which of ``spec``'s ids ran on engine ``e`` (for conflict messages)."""
        ids = [i for i in spec.ids if (d := self._tasks.get(i)) is not None
               and d.state is DONE and d.engine is e]
        return f"{show_ids(ids)} on engine {e.id}"

    def _outcome(self, d: Task) -> str:
        """How dependency ``d`` finished, with the chain of causes if we failed it."""
        if d.state is DONE:
            if d.ok:
                return f"succeeded on engine {d.engine.id}" if d.engine else "succeeded"
            x = d.x
            if x is not None and x.cancelled and d.engine is None:
                return "was aborted"
            return f"failed on engine {d.engine.id}" if d.engine else "failed"
        x: Extra = d.x  # type: ignore[assignment]  # failed by us: why is set
        if x.depth <= CHAIN:
            return f"failed ({x.why})"
        return f"failed ({x.why.split(' because ', 1)[0]} because of a chain of {x.depth} failures starting with: {x.root})"

    def _bad_dep_why(self, kind: str, tally: Tally, d: Task) -> str:
        """Explain an after/follow dependency made unreachable by ``d``'s outcome.

        The rule comes after a "; " so that cascades can quote only the reason.
        """
        spec = tally.spec
        if spec.all:
            return (f"its {kind} dependency {d.id} {self._outcome(d)}; "
                    f"{kind}({rule(spec)}) needs every one to {wants(spec)}")
        return (f"none of its {kind} dependencies did {wants(spec)} "
                f"(the last to finish, {d.id}, {self._outcome(d)}); "
                f"{kind}({rule(spec)}) needs one that did")

    def _waiting_for(self, t: Task) -> str:
        """What an unassigned task is waiting for, in words."""
        x: Extra = t.x  # type: ignore[assignment]
        if t.state is WAITING:
            parts = []
            for kind, tally in (("after", x.after), ("follow", x.follow)):
                if tally is not None and tally.pending:
                    pending = [i for i in tally.spec.ids
                               if (d := self._tasks.get(i)) is not None
                               and d.state is not DONE and d.state is not FAILED]
                    parts.append(f"its {kind} dependencies ({show_ids(pending)} unfinished)")
                elif kind == "follow" and tally is not None:
                    parts.append("an engine its follow dependencies ran on")
            return " and ".join(parts) or "its dependencies"
        if x.follow is not None or x.refused or x.targets is not None:
            return "an eligible engine with a free slot"
        if not self._engines:
            return "an engine (none is registered)"
        return f"a free engine (all {len(self._engines)} busy)"

    def _drop_follow_links(self, t: Task) -> None:
        """``t`` is finished: engines stop listing it as a follower or a targeter."""
        x = t.x
        if x is None:
            return
        if x.targets is not None:
            targeted = self._targeted
            for eid in x.targets:
                tasks = targeted.get(eid)
                if tasks is not None:
                    tasks.discard(t)
                    if not tasks:
                        del targeted[eid]
        if x.follow is None:
            return
        if x.f_engine is not None:
            x.f_engine.followers.discard(t)
        if x.f_engines:
            for e in x.f_engines:
                e.followers.discard(t)

    def _finished(self, t: Task, out: list[Command]) -> None:
        """``t`` reached a final state: its dependents count it, transitively.

        Runs from a work list rather than recursion, so a cascade down a chain of
        any length stays flat on the stack.
        """
        work = self._work
        work.append(t)
        if self._draining:
            return
        self._draining = True
        try:
            while work:
                d = work.pop()
                dependents = d.dependents
                d.dependents = None
                if not dependents:
                    continue
                for dep in dependents:
                    state = dep.state
                    if state is DONE or state is FAILED:
                        continue
                    fe = dep.x.f_engines  # type: ignore[union-attr]
                    before = len(fe) if fe is not None else 0
                    why = self._count(dep, d)
                    if state is ASSIGNED:
                        # Already running (an "any" dependency was met): the tally
                        # still matters if it comes back (refused, engine died).
                        continue
                    if why is not None:
                        self._fail_impossible(dep, why, out, d)  # adds dep to the work list
                    elif state is WAITING:
                        if self._met(dep):
                            self._ready(dep, out)
                    elif fe is not None and len(fe) > before and d.engine.alive:  # type: ignore[union-attr]
                        self._fresh.append(dep)  # a ready follow-any task gained an engine
        finally:
            self._draining = False
