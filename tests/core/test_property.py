"""Property test: random task graphs through the core, against an independent oracle.

A simulated world plays clients and engines: it submits tasks with random
after/follow dependencies (random all/success/failure switches), timeouts and
retries, and engines that finish their oldest task (success or failure), refuse
tasks (functional dependencies), come and go.  The oracle keeps its own record
of every task and re-derives, from the rules alone, what the core must and must
not do.  After every event it checks:

* no task is lost, and none is assigned twice without a failure, refusal or
  engine death in between;
* an assignment respects after, follow, targets, refusals, soft exclusions and hwm;
* a task fails with ImpossibleDependency exactly when the rules say it can no
  longer run (never too early, and in the same call as the cause);
* timeouts fire exactly for tasks still unassigned at their deadline;
* walltimes: an Interrupt comes exactly once an attempt has run its walltime since its
  TaskStarted, a RestartEngine exactly once it has then run the grace period too (the
  engine is gone, its running task fails with WalltimeExceeded or is retried, the tasks
  queued behind it are queued again), and an interrupted attempt that fails is a
  WalltimeExceeded (or retried);
* no ready task waits while an engine it may use has a free slot, and a slot
  goes to the oldest task that may use it;
* every task ends (delivered or failed) once engines remain.

The core itself runs with ``validate=True``.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ipylb.core.events import (
    ABORTED,
    ENGINE_ERROR,
    IMPOSSIBLE,
    INVALID,
    TIMEOUT,
    WALLTIME,
    AbortRequested,
    Assign,
    Cancel,
    Deliver,
    DepSpec,
    EngineAdded,
    EngineRemoved,
    Fail,
    Interrupt,
    RestartEngine,
    TaskDone,
    TaskForgotten,
    TaskStarted,
    TaskSubmitted,
    TaskUnmet,
    Tick,
)
from ipylb.core.scheduler import Scheduler
from ipylb.core.schemes import SCHEMES

SWITCHES = [(True, False)] * 4 + [(False, True)] + [(True, True)] * 2
GRACE = 1.0  # the walltime grace period the worlds' cores run with


class Info:
    """The oracle's record of one task."""

    def __init__(self, tid: str, ev: TaskSubmitted, p_fail: float, refuse_p: float) -> None:
        self.tid = tid
        self.after = ev.after
        self.follow = ev.follow
        self.timeout = ev.timeout or 0.0
        self.submitted = ev.time
        self.retries = ev.retries
        self.targets = ev.targets
        self.p_fail = p_fail
        self.refuse_p = refuse_p
        self.final: str | None = None  # "ok" | "err" | "sched"
        self.error: str | None = None
        self.engine: int | None = None  # where it ran, once final
        self.assigned: int | None = None
        self.refused: set[int] = set()
        self.failed_on: set[int] = set()
        self.ran = False  # an attempt ran (failed or died): the timeout is over
        self.abort = False
        self.cancelled = False
        self.walltime = ev.walltime or 0.0
        self.started: float | None = None  # the running attempt's TaskStarted
        self.interrupted: float | None = None  # ... and its Interrupt

    def attempt_over(self) -> None:
        self.started = self.interrupted = None


class World:
    def __init__(self, seed: int, n_tasks: int, scheme: str, hwm: int, engines: int = 4,
                 validate: bool = True) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.n_tasks = n_tasks
        self.hwm = hwm
        self.core = Scheduler(scheme=scheme, hwm=hwm, seed=seed, validate=validate,
                              walltime_grace=GRACE)
        self.now = 0.0
        self.live: dict[int, deque[str]] = {}
        self.next_eid = 0
        self.tasks: dict[str, Info] = {}
        self.order: list[str] = []
        self.forgotten: set[str] = set()
        self.pending: set[str] = set()
        self.ran_on: dict[int, int] = {}  # engine -> attempts that ran there
        self.stats: dict[str, int] = {}
        for _ in range(engines):
            self.add_engine()

    # ------------------------------------------------------------ oracle rules

    def outcome(self, d: str) -> tuple[bool, bool, int | None]:
        """(finished, succeeded, engine it ran on) of dependency d."""
        i = self.tasks[d]
        return i.final is not None, i.final == "ok", i.engine

    @staticmethod
    def counts(spec: DepSpec, ok: bool) -> bool:
        return spec.success if ok else spec.failure

    def after_met(self, i: Info) -> bool:
        a = i.after
        if a is None or not a.ids:
            return True
        good = 0
        for d in a.ids:
            fin, ok, _ = self.outcome(d)
            good += fin and self.counts(a, ok)
        return good == len(a.ids) if a.all else good > 0

    def follow_engines(self, i: Info) -> tuple[set[int], bool, bool]:
        """(engines of located follow deps, some dep finished without a location, any pending)."""
        f = i.follow
        located: set[int] = set()
        deadend = pending = False
        for d in f.ids:  # type: ignore[union-attr]
            fin, ok, eng = self.outcome(d)
            if not fin:
                pending = True
            elif self.counts(f, ok) and eng is not None:  # type: ignore[arg-type]
                located.add(eng)
            else:
                deadend = True
        return located, deadend, pending

    def follow_ok(self, i: Info, e: int) -> bool:
        """Whether follow allows engine e now (all deps located there / some dep there)."""
        f = i.follow
        if f is None or not f.ids:
            return True
        located, deadend, pending = self.follow_engines(i)
        if f.all:
            return not deadend and not pending and located == {e}
        return e in located

    def impossible(self, i: Info) -> str | None:
        """Why the rules say task i can never run now, or None."""
        tg = i.targets
        if tg is not None:
            live = [e for e in tg if e in self.live]
            if not live:
                return "no target engine registered"
            if set(live) <= i.refused:
                return "refused by every target engine"
        a = i.after
        if a is not None and a.ids:
            bad = sum(1 for d in a.ids if self.outcome(d)[0]
                      and not self.counts(a, self.outcome(d)[1]))
            if (a.all and bad) or (not a.all and bad == len(a.ids)):
                return "after unreachable"
        f = i.follow
        if f is not None and f.ids:
            located, deadend, pending = self.follow_engines(i)
            if f.all:
                if deadend:
                    return "follow dep finished the wrong way or nowhere"
                if len(located) > 1:
                    return "follow deps on several engines"
                if located:
                    (e,) = located
                    if tg is not None and e not in tg:
                        return "follow engine not among the targets"
                    if e not in self.live:
                        return "follow engine dead"
                    if e in i.refused:
                        return "follow engine refused"
            elif not pending and not any(e in self.live and e not in i.refused
                                         and (tg is None or e in tg) for e in located):
                return "no live follow engine left"
        elif i.refused and self.live and set(self.live) <= i.refused:
            return "refused by every engine"
        return None

    def eligible(self, i: Info) -> list[int]:
        """Engines task i may go to now, soft exclusion applied (empty if deps unmet)."""
        if not self.after_met(i):
            return []
        base = [e for e in self.live if e not in i.refused and self.follow_ok(i, e)
                and (i.targets is None or e in i.targets)]
        preferred = [e for e in base if e not in i.failed_on]
        return preferred or base

    def free(self, e: int) -> bool:
        return self.hwm == 0 or len(self.live[e]) < self.hwm

    # ----------------------------------------------------------------- events

    def send(self, event, expect_deliver=(), expect_fail=None, expect_cancel=None,
             allow_fail=None):
        """Feed one event; check each command against the oracle; check global invariants.

        ``expect_fail``: {task: error} that must appear; ``allow_fail``: {task: error}
        that may (impossible cascades are always allowed if the oracle agrees).
        """
        cmds = self.core.handle(event)
        expect_fail = dict(expect_fail or {})
        allow_fail = dict(allow_fail or {})
        for c in cmds:  # an engine restarted for a walltime: its tasks as when it dies
            if isinstance(c, RestartEngine):
                assert c.engine_id in self.live, f"{c}: no such engine"
                head = self.tasks[self.live[c.engine_id][0]]
                assert head.interrupted is not None and self.now >= head.interrupted + GRACE, \
                    f"{c} before {head.tid} had its grace period"
                self.bump("restart")
                self.drop_engine(c.engine_id, expect_fail, WALLTIME)
        delivered = set()
        seen_fail = set()
        for c in cmds:
            if isinstance(c, Assign):
                self.check_assign(c.task_id, c.engine_id)
            elif isinstance(c, Deliver):
                assert c.task_id in expect_deliver, f"unexpected {c}"
                delivered.add(c.task_id)
            elif isinstance(c, Fail):
                self.check_fail(c, expect_fail, allow_fail)
                seen_fail.add(c.task_id)
            elif isinstance(c, Interrupt):
                i = self.tasks[c.task_id]
                q = self.live.get(c.engine_id)
                assert q and q[0] == c.task_id, f"{c}: not the task running there"
                assert i.started is not None and i.interrupted is None, f"{c}: {i.started}"
                assert self.now >= i.started + i.walltime, f"{c} before its walltime"
                i.interrupted = self.now
                self.bump("interrupt")
            elif isinstance(c, RestartEngine):
                pass  # done above
            elif isinstance(c, Cancel):
                assert expect_cancel == (c.task_id, c.engine_id), f"unexpected {c}"
                expect_cancel = None
                self.bump("cancel")
            else:  # pragma: no cover
                raise AssertionError(f"unknown command {c!r}")
        assert delivered == set(expect_deliver), (event, cmds)
        missing = set(expect_fail) - seen_fail
        assert not missing, f"expected Fail for {missing} after {event}: {cmds}"
        assert expect_cancel is None, f"expected Cancel{expect_cancel}: {cmds}"
        self.check_global()
        return cmds

    def check_assign(self, tid: str, e: int) -> None:
        i = self.tasks[tid]
        assert i.final is None, f"{tid} assigned after it ended"
        assert i.assigned is None, f"{tid} assigned twice (already on {i.assigned})"
        assert e in self.live, f"{tid} assigned to dead engine {e}"
        assert self.free(e), f"engine {e} over hwm"
        assert self.after_met(i), f"{tid} assigned before its after dependency was met"
        assert self.follow_ok(i, e), f"{tid} assigned to {e} against its follow dependency"
        assert e not in i.refused, f"{tid} sent back to engine {e}, which refused it"
        assert i.targets is None or e in i.targets, f"{tid} sent to {e}, not among its targets"
        if e in i.failed_on:
            base = [x for x in self.live if x not in i.refused and self.follow_ok(i, x)
                    and (i.targets is None or x in i.targets)]
            assert set(base) <= i.failed_on, f"{tid} retried on {e} while untried {base} exist"
        if i.timeout and not i.ran:
            assert self.now < i.submitted + i.timeout, f"{tid} assigned after its deadline"
        # oldest first: no older unassigned task could have had this slot
        n = int(tid[1:])
        for u in self.pending:
            j = self.tasks[u]
            if int(u[1:]) < n and j.assigned is None and self.impossible(j) is None:
                assert e not in self.eligible(j), f"{tid} got engine {e} before older {u}"
        i.assigned = e
        self.live[e].append(tid)
        self.bump("assign")
        if i.follow is not None:
            self.bump("follow_all" if i.follow.all else "follow_any")
        if i.targets is not None:
            self.bump("assign_targeted")

    def check_fail(self, c: Fail, expect_fail: dict, allow_fail: dict) -> None:
        i = self.tasks[c.task_id]
        assert i.final is None, f"{c.task_id} failed after it ended"
        assert c.message and c.task_id in c.message
        if c.task_id in expect_fail:
            assert c.error == expect_fail.pop(c.task_id), c
        elif c.task_id in allow_fail:
            assert c.error == allow_fail.pop(c.task_id), c
        elif c.error == IMPOSSIBLE:
            assert i.assigned is None, f"assigned task {c.task_id} failed as impossible"
            why = self.impossible(i)
            assert why is not None, f"core says impossible, oracle disagrees: {c}"
        elif c.error == TIMEOUT:
            assert i.assigned is None and i.timeout and not i.ran, c
            assert self.now >= i.submitted + i.timeout, c
        elif c.error == WALLTIME:
            raise AssertionError(f"WalltimeExceeded the oracle did not expect: {c}")
        else:
            raise AssertionError(f"unexpected {c}")
        i.final, i.error, i.engine, i.assigned = "sched", c.error, None, None
        self.pending.discard(c.task_id)
        self.bump(c.error)

    def check_global(self) -> None:
        for tid in self.pending:
            i = self.tasks[tid]
            state = self.core.task_state(tid)
            if i.assigned is not None:
                assert state == "assigned", (tid, state)
                assert tid in self.live[i.assigned], f"{tid} lost from engine {i.assigned}"
                if i.started is not None and self.now >= i.started + i.walltime:
                    assert i.interrupted is not None, f"{tid} past its walltime, not interrupted"
                    assert self.now < i.interrupted + GRACE, f"{tid}'s engine outlived the grace"
                continue
            assert state in ("waiting", "ready"), (tid, state)
            why = self.impossible(i)
            assert why is None, f"{tid} should have failed as impossible: {why}"
            if i.timeout and not i.ran:
                assert self.now < i.submitted + i.timeout, f"{tid} outlived its deadline"
            free = [e for e in self.eligible(i) if self.free(e)]
            assert not free, f"{tid} ({state}) waits while eligible engines {free} are free"

    def bump(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    # ---------------------------------------------------------------- actions

    def spec(self, ids, p_any: float = 0.3) -> DepSpec:
        s, f = self.rng.choice(SWITCHES)
        return DepSpec(frozenset(ids), self.rng.random() > p_any, s, f)

    def submit(self) -> None:
        rng = self.rng
        tid = f"t{len(self.order)}"
        if rng.random() < 0.3:
            self.now += rng.uniform(0, 0.3)  # deadlines may fall due at a submission
        recent = self.order[-30:]
        after = follow = None
        k = rng.choice((0, 0, 1, 1, 2, 3))
        if k and recent:
            ids = set(rng.sample(recent, min(k, len(recent))))
            if rng.random() < 0.01:
                ids.add(f"ghost{tid}")
            after = self.spec(ids)
        if recent and rng.random() < 0.2:
            follow = self.spec(rng.sample(recent, min(rng.choice((1, 1, 2)), len(recent))), 0.5)
        timeout = rng.uniform(0.5, 6) if rng.random() < 0.15 else None
        walltime = rng.uniform(0.2, 3) if rng.random() < 0.15 else None
        retries = rng.choice((0, 0, 0, 1, 2))
        targets = None
        if rng.random() < 0.15:  # some engines, maybe gone or not registered yet
            targets = frozenset(rng.sample(range(self.next_eid + 2), rng.choice((1, 1, 2))))
        ev = TaskSubmitted(tid, self.now, after, follow, timeout, retries, targets=targets,
                           walltime=walltime)
        p_fail = rng.choice((0,) * 12 + (0.3, 0.5, 1.0))
        i = Info(tid, ev, p_fail, rng.choice((0,) * 12 + (0.5, 1.0)))
        wanted = (after.ids if after else frozenset()) | (follow.ids if follow else frozenset())
        unknown = {d for d in wanted if d not in self.tasks or d in self.forgotten}
        self.tasks[tid] = i
        self.order.append(tid)
        self.pending.add(tid)
        self.send(ev, expect_fail={tid: INVALID} if unknown else None)
        if targets is not None:
            self.bump("targets")
        if not unknown:
            assert self.tasks[tid].error != INVALID

    def refuses(self, tid: str, e: int) -> bool:
        p = self.tasks[tid].refuse_p
        return p > 0 and random.Random(f"{self.seed}/{tid}/{e}").random() < p

    def finish(self, e: int | None = None) -> None:
        busy = [x for x, q in self.live.items() if q]
        if not busy:
            return
        self.now += 0.01
        if self.core.next_deadline() is not None and self.core.next_deadline() <= self.now:
            # What falls due first (an Interrupt, a restart) comes at the start of the
            # engine's report, as a Tick would: let one bring it, then report.
            self.send(Tick(self.now))
            busy = [x for x, q in self.live.items() if q]
            if not busy:
                return
        e = self.rng.choice(busy) if e is None or e not in busy else e
        tid = self.live[e].popleft()
        i = self.tasks[tid]
        i.assigned = None
        interrupted = i.interrupted is not None
        i.attempt_over()
        if not i.cancelled and self.refuses(tid, e):
            i.refused.add(e)
            self.bump("unmet")
            exp = {tid: ABORTED} if i.abort else None
            self.send(TaskUnmet(tid, e, self.now), expect_fail=exp)
            return
        if not i.cancelled:  # it runs (a cancelled one is skipped: completed nowhere)
            self.ran_on[e] = self.ran_on.get(e, 0) + 1
        ok = not i.cancelled and self.rng.random() >= i.p_fail
        if interrupted and not ok:  # stopped by its walltime's interrupt
            if i.retries > 0 and not i.abort:
                i.retries -= 1
                i.ran = True
                i.failed_on.add(e)
                self.bump("walltime_retry")
                self.send(TaskDone(tid, e, False, self.now))
            else:
                self.send(TaskDone(tid, e, False, self.now), expect_fail={tid: WALLTIME})
            return
        if not ok and i.retries > 0 and not i.abort:
            i.retries -= 1
            i.ran = True
            i.failed_on.add(e)
            self.bump("retry")
            self.send(TaskDone(tid, e, False, self.now))
            return
        i.final, i.engine = ("ok" if ok else "err"), (None if i.cancelled else e)
        self.pending.discard(tid)
        self.send(TaskDone(tid, e, ok, self.now, skipped=i.cancelled), expect_deliver=(tid,))

    def tick(self, dt: float) -> None:
        self.now += dt
        self.send(Tick(self.now))

    def abort(self) -> None:
        if not self.order:
            return
        assigned = [t for q in self.live.values() for t in q]
        if assigned and self.rng.random() < 0.5:
            tid = self.rng.choice(assigned)
        else:
            tid = self.rng.choice(self.order[-50:])
        if tid in self.forgotten:
            return
        i = self.tasks[tid]
        self.bump("abort")
        if i.final is not None:
            self.send(AbortRequested(tid, self.now))
        elif i.assigned is None:
            self.send(AbortRequested(tid, self.now), expect_fail={tid: ABORTED})
        else:
            q = self.live[i.assigned]
            cancel = None
            if q[0] != tid and not i.abort:
                cancel = (tid, i.assigned)
                i.cancelled = True
            i.abort = True
            self.send(AbortRequested(tid, self.now), expect_cancel=cancel)

    def add_engine(self) -> None:
        e = self.next_eid
        self.next_eid += 1
        self.live[e] = deque()
        self.send(EngineAdded(e, self.now))

    def remove_engine(self) -> None:
        if not self.live:
            return
        e = self.rng.choice(sorted(self.live))
        expect: dict[str, str] = {}
        self.drop_engine(e, expect, ENGINE_ERROR)
        self.bump("engine_removed")
        self.send(EngineRemoved(e, "killed", self.now), expect_fail=expect)

    def drop_engine(self, e: int, expect: dict[str, str], error: str) -> None:
        """Engine ``e`` is gone: what the rules say of its tasks (``error``: of the running
        one, unless it had been interrupted for its walltime)."""
        q = self.live.pop(e)
        for n, tid in enumerate(q):
            i = self.tasks[tid]
            i.assigned = None
            if n == 0:
                why = WALLTIME if i.interrupted is not None else error
                i.attempt_over()
                if i.retries > 0 and not i.abort:
                    i.retries -= 1
                    i.ran = True
                    i.failed_on.add(e)
                else:
                    expect[tid] = why
            elif i.abort:
                expect[tid] = ABORTED
            else:
                self.bump("requeued_behind")

    def report_starts(self) -> None:
        """Engines report the start of the walltime task they run (if not done yet)."""
        for e, q in list(self.live.items()):
            if q and e in self.live:
                i = self.tasks[q[0]]
                if i.walltime and i.started is None and not i.cancelled:
                    i.started = self.now
                    self.send(TaskStarted(i.tid, e, self.now))

    def forget(self) -> None:
        done = [t for t in self.order[-200:] if self.tasks[t].final and t not in self.forgotten]
        if done:
            tid = self.rng.choice(done)
            self.forgotten.add(tid)
            self.send(TaskForgotten(tid, self.now))

    # ------------------------------------------------------------------- run

    def run(self) -> None:
        rng = self.rng
        while len(self.order) < self.n_tasks:
            self.report_starts()
            r = rng.random()
            if r < 0.36:
                self.submit()
            elif r < 0.78:
                self.finish()
            elif r < 0.85:
                self.tick(rng.uniform(0.05, 1.5))
            elif r < 0.89:
                self.abort()
            elif r < 0.92:
                if len(self.live) < 8:
                    self.add_engine()
            elif r < 0.945:
                self.remove_engine()
            elif r < 0.96:
                self.forget()
            else:
                self.finish()
        # drain: engines remain, so everything must end
        for _ in range(50 * self.n_tasks):
            if not self.pending:
                break
            self.report_starts()
            if not self.live:
                self.add_engine()
            elif any(self.live.values()):
                self.finish()
            else:
                self.tick(5.0)
        assert not self.pending, f"tasks never ended: {sorted(self.pending)[:10]}"
        for tid in self.order:
            if tid not in self.forgotten:
                i = self.tasks[tid]
                want = "failed" if i.final == "sched" else "done"
                assert self.core.task_state(tid) == want, (tid, i.final)
        status = self.core.queue_status()
        assert status["unassigned"] == 0
        for e in self.live:  # queue_status's "completed": what ran there, not what was skipped
            assert status[e]["completed"] == self.ran_on.get(e, 0), (e, status[e])


CONFIGS = [
    ("leastload", 1),
    ("lru", 2),
    ("plainrandom", 0),
    ("twobin", 1),
    ("weighted", 3),
    ("leastload", 0),
]


@pytest.mark.parametrize("scheme,hwm", CONFIGS)
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_graphs_small(scheme, hwm, seed):
    w = World(seed, 300, scheme, hwm, engines=seed)
    w.run()
    assert w.stats.get("assign", 0) > 100


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    scheme=st.sampled_from(sorted(SCHEMES)),
    hwm=st.integers(0, 3),
    engines=st.integers(0, 5),
)
def test_random_graphs_hypothesis(seed, scheme, hwm, engines):
    World(seed, 120, scheme, hwm, engines=engines).run()


@pytest.mark.parametrize("scheme,hwm,seed", [("leastload", 2, 2024), ("weighted", 0, 7),
                                             ("lru", 1, 99)])
def test_random_graph_2000_tasks(scheme, hwm, seed):
    w = World(seed, 2000, scheme, hwm, engines=4)
    w.run()
    s = w.stats
    # the run exercised every rule, not just the easy path
    for key in ("assign", "retry", "unmet", IMPOSSIBLE, TIMEOUT, ABORTED, ENGINE_ERROR,
                INVALID, "engine_removed", "follow_all", "follow_any", "targets", "assign_targeted",
                "interrupt", "restart", WALLTIME):
        assert s.get(key, 0) > 0, (key, s)
    if hwm != 1:  # tasks queue behind others on an engine
        assert s.get("cancel", 0) > 0, s
        assert s.get("requeued_behind", 0) > 0, s
