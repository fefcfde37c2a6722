"""The load-balancing scheduler core: events in, commands out, no I/O.

Theory of operation
===================

The controller shell owns sockets, clocks and task payloads.  Whenever something
happens it builds an event (:mod:`ipylb.core.events`) and calls
:meth:`Scheduler.handle`, which updates the core's state and returns the
decisions as a plain list of commands (Assign, Deliver, Fail, Cancel) for the
shell to carry out, in order.  The core never reads a clock: every event carries
its time, and :meth:`Scheduler.next_deadline` tells the shell when to send a Tick.
Randomness comes from a seedable ``random.Random`` owned by the scheduler, so a
run is a pure function of its events and seed.

Tasks.  Each task has one record (:class:`_Task`) with an explicit state::

    waiting --deps met--> ready --engine chosen--> assigned --TaskDone--> done
       |                    ^                         |
       |                    +--- retry / unmet / -----+
       |                         engine died
       +---------------------------------------------------------------> failed
                 (impossible, timeout, aborted, invalid, engine error)

``done`` means the engine's result (success or error) was delivered; ``failed``
means the scheduler itself failed the task.  Both are final.  Rarely needed data
(dependencies, exclusions, abort flags, failure explanations) hangs off the
record in a separate ``_Extra`` object, so a plain task costs one small record.

Dependencies.  A task waiting on others is listed in each one's ``dependents``.
When a task reaches a final state, its dependents count the outcome in O(1)
(:class:`ipylb.core.deps.Tally`) and are re-evaluated: now ready, still waiting,
or impossible.  A task the scheduler fails is itself a failed dependency, so
impossibility cascades down chains; the cascade runs from an explicit work list,
not recursion, so chains of any length are fine.  ``follow`` ("where") records
the engine each counted dependency ran on; tasks failed by the scheduler ran
nowhere and so can never be followed.

Engines and queues.  Each engine keeps its outstanding tasks FIFO; the oldest is
the one running, the rest wait behind it (hwm > 1).  A ready task goes straight
to a free eligible engine chosen by the scheme (:mod:`ipylb.core.schemes`);
otherwise it is queued:

* unconstrained tasks in one global queue: a deque in submission order, plus a
  small heap for the few that become ready out of order;
* tasks restricted to some engines (``follow``, ``targets``, refusals, failed-on
  engines) in a heap per candidate engine.

When an engine gets a free slot it takes the ready task with the smallest
submission number among the heads of the global queue and its own heap.  Entries
are never searched for or removed in place: a stale entry (the task moved on, or
was re-queued under a new generation number) is dropped when it reaches a head.
So every decision costs O(log n) at worst, never a scan of the queue.

The invariant that makes this work ("work conservation"): between events, no
engine with a free slot has an eligible ready task.  An event can break it in
two ways, by freeing slots and by making tasks ready, so each handler only
records those (``_freed``, ``_fresh``) and :meth:`Scheduler._settle` restores
it at the end: it queues the new tasks, fills the freed slots from the queues
(oldest first, new tasks included), then gives the new tasks still waiting to
free engines chosen by the scheme.  Hence a Deliver or Fail always comes before
the Assigns it enables, and a slot always goes to the oldest task that may use
it.  A plain submission with a free engine skips all this and
is assigned on the spot (the hot path, a few microseconds).

Targets.  A task submitted with ``targets`` (engine ids) runs only on those;
follow, refusals and retries choose among them.  Engine ids are never reused, so
a task none of whose targets is registered can never run: it fails as impossible
(at submission, or when the last of them goes, waiting or not), and so does one
whose follow dependencies ran on engines outside its targets.  ``_targeted`` lists,
per engine id, the unfinished tasks that target it, for that check.

Exclusions.  An engine that refused a task (TaskUnmet) is excluded for it
forever; once every registered engine has refused it, it is impossible.  An
engine a task failed on is only avoided while some other eligible engine is
registered (soft), so retries can outnumber engines.  Engine arrivals and
departures re-examine the few ready tasks that have exclusions or follow that
engine.

Deadlines.  A task with a timeout gets an entry in a heap of deadlines.  Entries
are checked lazily: one whose task is no longer waiting or ready is dropped.  Due
deadlines expire at the start of every event (so the shell's Ticks need not be
exact).  A timeout limits the wait before a task runs, never the execution: an
assigned task cannot expire, and once an attempt has run (failed and is retried,
or died with its engine) the deadline is gone.  A task refused by an engine, or
queued behind another on an engine that died, has not run: its deadline holds.

Walltimes.  A running attempt's run-time limit is the other kind of deadline, with
timers of its own (:mod:`.deadlines`: the rule, the timers): an attempt that outlives
its walltime gets an Interrupt, and one that outlives the grace period after it costs
its engine (RestartEngine); either way it fails with WalltimeExceeded, or is retried.

Bookkeeping for debugging: every state transition is appended to a bounded log,
``story(task_id)`` replays one task's; ``validate=True`` checks the invariants
after every event (slow: for tests).
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from . import schemes
from .deadlines import GRACE, RUN, Walltimes, exceeded
from .deps import Tally, rule, wants
from .events import (
    ABORTED,
    ENGINE_ERROR,
    IMPOSSIBLE,
    INVALID,
    TIMEOUT,
    WALLTIME,
    AbortRequested,
    Assign,
    Cancel,
    Command,
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
from .free import FreeEngines

__all__ = ["Scheduler", "WAITING", "READY", "ASSIGNED", "DONE", "FAILED"]

WAITING = "waiting"
READY = "ready"
ASSIGNED = "assigned"
DONE = "done"
FAILED = "failed"

_BIG = 1 << 62  # "no limit" for hwm=0, an int so comparisons stay int/int
_CHAIN = 6  # cascade explanations quote at most this many levels, then the root
_SHOW = 5  # messages list at most this many ids


def _eids(engine_ids: Any) -> str:
    """Engine ids for messages: ``0, 2``."""
    return ", ".join(map(str, sorted(engine_ids)))


def _ids(items: Any) -> str:
    """A short, stable rendering of some task ids for messages."""
    ids = sorted(items)
    if len(ids) > _SHOW:
        return ", ".join(ids[:_SHOW]) + f", ... ({len(ids)} in all)"
    return ", ".join(ids)


class _Engine:
    """One registered engine: its FIFO of outstanding tasks and its private queue."""

    __slots__ = ("id", "alive", "used", "load", "completed", "queue", "heap", "followers",
                 "key", "pos")

    def __init__(self, engine_id: int) -> None:
        self.id = engine_id
        self.alive = True
        self.used = False  # has been assigned a task
        self.load = 0  # outstanding tasks == len(queue)
        self.completed = 0  # TaskDone results received from it
        self.queue: deque[_Task] = deque()  # assigned tasks; [0] is running
        self.heap: list[tuple[int, int, _Task]] = []  # (seq, gen, task) restricted to here
        self.followers: set[_Task] = set()  # unfinished tasks whose follow deps ran here
        self.key = 0  # LRU key: lower = assigned longer ago (see .free)
        self.pos = -1  # owned by the FreeEngines index

    def __repr__(self) -> str:
        return f"<engine {self.id} load={self.load}{'' if self.alive else ' dead'}>"


class _Extra:
    """The rarely needed part of a task record (dependencies, exclusions, failure)."""

    __slots__ = (
        "after",  # Tally | None
        "follow",  # Tally | None (good = counted and ran on an engine)
        "f_engine",  # follow all=True: the engine every counted dep ran on
        "f_engines",  # follow all=False: engines where counted deps ran
        "refused",  # engines that refused it (hard)
        "unmet",  # what the last engine to refuse it said
        "failed_on",  # engines it failed or died on (soft)
        "targets",  # frozenset of engine ids it may run on, or None (any)
        "timeout",
        "submitted",
        "aborted",  # abort requested while assigned
        "cancelled",  # ... and a Cancel went to its engine
        "why",  # when failed by the scheduler: one-line explanation, for chains
        "root",
        "depth",
        "walltime",  # run-time limit of each attempt (0: none)
        "started",  # when the running attempt started (None: not reported yet)
        "interrupted",  # when it was interrupted for its walltime (None: not)
        "wt_token",  # token of its live walltime timer (0: none)
    )

    def __init__(self) -> None:
        self.after: Tally | None = None
        self.follow: Tally | None = None
        self.f_engine: _Engine | None = None
        self.f_engines: set[_Engine] | None = None
        self.refused: set[_Engine] | None = None
        self.unmet = ""
        self.failed_on: set[_Engine] | None = None
        self.targets: frozenset[int] | None = None
        self.timeout = 0.0
        self.submitted = 0.0
        self.aborted = False
        self.cancelled = False
        self.why = ""
        self.root = ""
        self.depth = 0
        self.walltime = 0.0
        self.started: float | None = None
        self.interrupted: float | None = None
        self.wt_token = 0


class _Task:
    """One task: its state and where it is, plus rare details in ``x``."""

    __slots__ = ("id", "seq", "state", "engine", "retries", "ok", "deadline", "dependents", "x", "gen")

    def __init__(self, task_id: str, seq: int, retries: int) -> None:
        self.id = task_id
        self.seq = seq  # submission order: lower runs first
        self.state = WAITING
        self.engine: _Engine | None = None  # assigned to / ran on (None if failed by us)
        self.retries = retries if retries > 0 else 0  # attempts left after a failure
        self.ok = False  # when done: the engine reported success
        self.deadline: float | None = None
        self.dependents: list[_Task] | None = None
        self.x: _Extra | None = None
        self.gen = 0  # bumped on each (re)queueing; heap entries of older gens are stale

    def __repr__(self) -> str:
        return f"<task {self.id} {self.state}>"


def _said(x: _Extra) -> str:
    """What the last engine to refuse a task said, for its failure message."""
    return f" (the last refusal: {x.unmet})" if x.unmet else ""


def _extra(t: _Task) -> _Extra:
    x = t.x
    if x is None:
        x = t.x = _Extra()
    return x


class Scheduler:
    """The pure scheduler: feed it events with :meth:`handle`, carry out its commands.

    ``scheme``: routing scheme name (see :mod:`ipylb.core.schemes`; not ``pure``).
    ``hwm``: at most this many outstanding tasks per engine, 0 for no limit.
    ``seed``: seeds the scheduler's random generator (schemes that draw).
    ``validate``: check every invariant after every event (slow; for tests).
    ``story_size``: how many transitions the debugging log keeps.
    ``walltime_grace``: seconds between a walltime Interrupt and the RestartEngine of an
    engine whose task still runs (API.md: 5); ValueError if negative.
    """

    def __init__(
        self,
        scheme: str = "leastload",
        hwm: int = 1,
        seed: int | None = None,
        validate: bool = False,
        story_size: int = 100_000,
        walltime_grace: float = 5.0,
    ) -> None:
        self._scheme = schemes.get(scheme)
        self.scheme = scheme
        if not isinstance(hwm, int) or hwm < 0:
            raise ValueError(f"hwm must be an int >= 0 (0: no limit), not {hwm!r}")
        self.hwm = hwm
        self._cap = hwm or _BIG
        # Engines with a free slot, indexed for the scheme's pick in O(log engines).
        self._free = FreeEngines(scheme, self._cap)
        self._stamp = 0  # LRU keys of assignments: 1, 2, ...
        self._unused_stamp = -_BIG  # LRU keys of engines never assigned: below those
        self._rng = random.Random(seed)
        self._validate = validate
        self._tasks: dict[str, _Task] = {}
        self._seq = 0
        self._now = 0.0
        self._engines: dict[int, _Engine] = {}
        self._lru: OrderedDict[int, _Engine] = OrderedDict()  # least recently assigned first
        self._nfree = 0  # engines with a free slot
        self._unassigned = 0  # tasks waiting or ready
        self._plain: deque[_Task] = deque()  # ready, unconstrained, in submission order
        self._plain_late: list[tuple[int, _Task]] = []  # ... those that came out of order
        self._ready_excl: set[_Task] = set()  # ready, with exclusions but no follow
        self._targeted: dict[int, set[_Task]] = {}  # engine id -> unfinished tasks targeting it
        self._deadlines: list[tuple[float, int, _Task]] = []
        self._walltimes = Walltimes(walltime_grace)
        self._dl_count = 0
        self._fresh: list[_Task] = []  # made ready by this event, to place in _settle
        self._freed: list[_Engine] = []  # got a free slot in this event, to fill in _settle
        self._work: list[_Task] = []  # finished tasks whose dependents still need telling
        self._draining = False
        self._story: deque[tuple[Any, ...]] = deque(maxlen=story_size)
        self._dispatch: dict[type, Callable[[Any, list[Command]], None]] = {
            TaskSubmitted: self._on_submit,
            TaskStarted: self._on_started,
            TaskDone: self._on_done,
            TaskUnmet: self._on_unmet,
            EngineAdded: self._on_engine_added,
            EngineRemoved: self._on_engine_removed,
            AbortRequested: self._on_abort,
            Tick: self._on_tick,
            TaskForgotten: self._on_forget,
        }

    # ------------------------------------------------------------------ public

    def handle(self, event: Any) -> list[Command]:
        """Apply one event; return the commands it leads to, in the order to carry out.

        Raises ValueError for an event that contradicts the state (a task id
        submitted twice, an engine id registered twice) and TypeError for a
        non-event; stale reports (a result from an engine the task is no longer
        on) are ignored.
        """
        try:
            handler = self._dispatch[event.__class__]
        except KeyError:
            raise TypeError(f"not a scheduler event: {event!r}") from None
        now = self._now = event.time
        out: list[Command] = []
        dl = self._deadlines
        if dl and dl[0][0] <= now:
            self._expire(now, out)
            if self._fresh:  # place what the expiries freed before this event acts
                self._settle(out)
        wt = self._walltimes.heap
        if wt and wt[0][0] <= now:
            self._expire_walltimes(now, out)
            if self._fresh or self._freed:
                self._settle(out)
        handler(event, out)
        if self._fresh or self._freed:
            self._settle(out)
        if self._validate:
            self.validate()
        return out

    def next_deadline(self) -> float | None:
        """The earliest time a waiting task times out or a running one reaches its walltime
        or grace period (send a Tick then), or None."""
        dl = self._deadlines
        first = None
        while dl:
            deadline, _, t = dl[0]
            if t.deadline == deadline and (t.state is WAITING or t.state is READY):
                first = deadline
                break
            heapq.heappop(dl)
        wt = self._walltimes.next(_wt_live)
        if wt is not None and (first is None or wt < first):
            return wt
        return first

    def queue_status(self, verbose: bool = False) -> dict[Any, Any]:
        """Per-engine load for monitoring: queued behind, completed, running; and unassigned.

        ``verbose``: lists of task ids instead of counts (``completed``: the tasks still
        known, i.e. not forgotten); costs one pass over the known tasks."""
        if verbose:
            return self._queue_lists()
        status: dict[Any, Any] = {}
        for eid in sorted(self._engines):
            e = self._engines[eid]
            status[eid] = {
                "queue": max(e.load - 1, 0),
                "completed": e.completed,
                "tasks": 1 if e.load else 0,
            }
        status["unassigned"] = self._unassigned
        return status

    def _queue_lists(self) -> dict[Any, Any]:
        status: dict[Any, Any] = {
            eid: {"queue": [t.id for t in list(e.queue)[1:]], "completed": [],
                  "tasks": [t.id for t in list(e.queue)[:1]]}
            for eid, e in sorted(self._engines.items())
        }
        unassigned = []
        for t in self._tasks.values():
            if t.state is WAITING or t.state is READY:
                unassigned.append(t.id)
            elif t.state is DONE and t.engine is not None and t.engine.id in status:
                status[t.engine.id]["completed"].append(t.id)
        status["unassigned"] = unassigned
        return status

    def story(self, task_id: str) -> list[tuple[Any, ...]]:
        """One task's transitions, oldest first: (task_id, from, to, detail, time)."""
        return [entry for entry in self._story if entry[0] == task_id]

    def task_state(self, task_id: str) -> str | None:
        """waiting | ready | assigned | done | failed, or None for an unknown id."""
        t = self._tasks.get(task_id)
        return None if t is None else t.state

    @property
    def engines(self) -> dict[int, int]:
        """Registered engine ids and their outstanding-task counts (a fresh dict)."""
        return {eid: e.load for eid, e in self._engines.items()}

    # ------------------------------------------------------------------ events

    def _on_submit(self, ev: TaskSubmitted, out: list[Command]) -> None:
        tid = ev.task_id
        tasks = self._tasks
        if tid in tasks:
            raise ValueError(f"task {tid!r} was already submitted")
        if (ev.after is None and ev.follow is None and not ev.timeout and not ev.walltime
                and ev.targets is None):
            # The hot path: nothing to wait for, no constraint; _assign inlined.
            seq = self._seq = self._seq + 1
            t = tasks[tid] = _Task(tid, seq, ev.retries)
            if self._nfree and (e := self._pick_plain()) is not None:
                t.state = ASSIGNED
                t.engine = e
                e.queue.append(t)
                e.load += 1
                if e.load == self._cap:
                    self._nfree -= 1
                self._lru.move_to_end(e.id)
                e.key = self._stamp = self._stamp + 1
                self._free.update(e)
                e.used = True
                self._story.append((tid, None, ASSIGNED, e.id, self._now))
                out.append(Assign(tid, e.id))
            else:
                t.state = READY
                self._unassigned += 1
                self._story.append((tid, None, READY, "submitted", self._now))
                self._push_plain(t)
            return
        if ev.timeout is not None and ev.timeout < 0:
            raise ValueError(f"task {tid!r}: negative timeout {ev.timeout!r}")
        if ev.walltime is not None and ev.walltime < 0:
            raise ValueError(f"task {tid!r}: negative walltime {ev.walltime!r}")
        seq = self._seq = self._seq + 1
        t = tasks[tid] = _Task(tid, seq, ev.retries)
        self._unassigned += 1
        self._submit_slow(t, ev, out)

    def _submit_slow(self, t: _Task, ev: TaskSubmitted, out: list[Command]) -> None:
        """Submission with dependencies and/or a timeout."""
        x = t.x = _Extra()
        x.submitted = ev.time
        x.walltime = ev.walltime or 0.0
        after = ev.after if ev.after is not None and ev.after.ids else None
        follow = ev.follow if ev.follow is not None and ev.follow.ids else None
        tasks = self._tasks
        wanted = (after.ids if after else frozenset()) | (follow.ids if follow else frozenset())
        unknown = [d for d in wanted if d not in tasks or d == t.id]
        if unknown:
            self._story.append((t.id, None, WAITING, "submitted", self._now))
            self._fail(t, INVALID,
                       f"task {t.id} depends on unknown task(s): {_ids(unknown)} "
                       "(never submitted, or forgotten)", out,
                       why=f"{t.id} depended on unknown task(s) {_ids(unknown)}")
            return
        if ev.timeout:
            x.timeout = ev.timeout
            t.deadline = ev.time + ev.timeout
            self._push_deadline(t)
        if ev.targets is not None:
            x.targets = frozenset(ev.targets)
            for eid in x.targets:
                self._targeted.setdefault(eid, set()).add(t)
        if after is not None:
            x.after = Tally(after)
        if follow is not None:
            x.follow = Tally(follow)
            if follow.all is False:
                x.f_engines = set()
        self._story.append((t.id, None, WAITING, "submitted", self._now))
        why = None
        cause = None
        for did in sorted(wanted):
            d = tasks[did]
            if d.state is DONE or d.state is FAILED:
                w = self._count(t, d)
                if w is not None and why is None:
                    why, cause = w, d
            else:
                if d.dependents is None:
                    d.dependents = []
                d.dependents.append(t)
        if why is None:
            why = self._when_dead(t)
        if why is not None:
            self._fail_impossible(t, why, out, cause)
        elif self._met(t):
            self._ready(t, out)

    def _on_done(self, ev: TaskDone, out: list[Command]) -> None:
        t = self._tasks.get(ev.task_id)
        if t is None or t.state is not ASSIGNED:
            return  # stale: the task moved on (its engine was removed, ...)
        e: _Engine = t.engine  # type: ignore[assignment]
        if e.id != ev.engine_id:
            return
        q = e.queue
        if q[0] is t:
            q.popleft()
        else:
            q.remove(t)
        if e.load == self._cap:
            self._nfree += 1
        e.load -= 1
        self._free.update(e)
        e.completed += 1
        x = t.x
        if ev.success:
            t.state = DONE
            t.ok = True
            self._story.append((t.id, ASSIGNED, DONE, "success", self._now))
            out.append(Deliver(t.id))
        elif x is not None and x.interrupted is not None:  # stopped by its walltime
            self._attempt_failed(t, e, WALLTIME, exceeded(
                t.id, x.walltime, self._now - x.started,  # type: ignore[operator]
                "was interrupted (KeyboardInterrupt)"), out)
            self._freed.append(e)
            return
        elif t.retries and (x is None or not x.aborted):
            self._retry(t, e, f"failed on engine {e.id}")
            self._freed.append(e)
            return
        else:
            t.state = DONE
            if x is not None and x.cancelled:
                t.engine = None  # skipped by its engine: it ran nowhere
            self._story.append((t.id, ASSIGNED, DONE, "error", self._now))
            out.append(Deliver(t.id))
        if x is not None:
            t.deadline = None
            self._drop_follow_links(t)
        if t.dependents:
            self._finished(t, out)
        if self._fresh:
            self._freed.append(e)  # _settle fills it once the new tasks are queued
        elif self._plain or self._plain_late or e.heap:
            self._fill(e, out)

    def _on_unmet(self, ev: TaskUnmet, out: list[Command]) -> None:
        t = self._tasks.get(ev.task_id)
        if t is None or t.state is not ASSIGNED or t.engine.id != ev.engine_id:  # type: ignore[union-attr]
            return
        e: _Engine = t.engine  # type: ignore[assignment]
        self._unqueue(t, e)
        x = _extra(t)
        if x.refused is None:
            x.refused = set()
        x.refused.add(e)
        if ev.reason:
            x.unmet = ev.reason
        self._freed.append(e)
        if x.aborted:
            self._fail(t, ABORTED, f"task {t.id} was aborted before it ran", out,
                       why=f"{t.id} was aborted")
            return
        self._requeue(t, f"refused by engine {e.id}")
        if t.deadline is not None:
            self._push_deadline(t)

    def _on_engine_added(self, ev: EngineAdded, out: list[Command]) -> None:
        eid = ev.engine_id
        if eid in self._engines:
            raise ValueError(f"engine {eid} is already registered")
        e = _Engine(eid)
        self._engines[eid] = e
        # Never used counts as least recently used: after the other unused engines
        # (in registration order), before every engine that has had a task.
        unused = [u for u in self._lru.values() if not u.used]
        used = [u for u in self._lru.values() if u.used]
        self._lru = OrderedDict((u.id, u) for u in (*unused, e, *used))
        e.key = self._unused_stamp = self._unused_stamp + 1
        self._free.registered(e)
        self._nfree += 1
        self._story.append((None, None, None, f"engine {eid} added", self._now))
        if self._ready_excl:
            # Tasks held back by exclusions (or targets) may run here; soft exclusions elsewhere
            # narrow lazily (the entries fail their eligibility check).
            for t in sorted(self._ready_excl, key=_by_seq):
                if self._eligible(t, e):
                    heapq.heappush(e.heap, (t.seq, t.gen, t))
        self._freed.append(e)

    def _on_engine_removed(self, ev: EngineRemoved, out: list[Command]) -> None:
        e = self._engines.pop(ev.engine_id, None)
        if e is None:
            return
        self._drop_engine(e, ev.reason, out, running=True)

    def _drop_engine(self, e: _Engine, reason: str, out: list[Command], running: bool) -> None:
        """Forget engine ``e`` (gone, or being restarted): its running task (the first of its
        queue, if ``running``) fails or is retried, the tasks queued behind it are queued
        again (no retry used), and tasks tied to it are re-examined."""
        del self._lru[e.id]
        if e.load < self._cap:
            self._nfree -= 1
        e.alive = False
        self._free.unregistered(e)
        e.heap = []
        self._story.append((None, None, None, f"engine {e.id} removed: {reason}", self._now))
        outstanding = list(e.queue)
        e.queue.clear()
        e.load = 0
        for i, t in enumerate(outstanding):
            x = t.x
            aborted = x is not None and x.aborted
            if i == 0 and running:  # it was running: that counts as a failed attempt
                if x is not None and x.interrupted is not None:
                    self._attempt_failed(t, e, WALLTIME, exceeded(
                        t.id, x.walltime, self._now - x.started,  # type: ignore[operator]
                        f"was interrupted, then its engine {e.id} died ({reason})"), out)
                else:
                    self._attempt_failed(
                        t, e, ENGINE_ERROR,
                        f"task {t.id} was running on engine {e.id} when the engine died: {reason}",
                        out, why=f"{t.id} was running on engine {e.id} when it died ({reason})",
                        retry=f"engine {e.id} died while it ran")
            elif aborted:
                t.engine = None
                self._fail(t, ABORTED, f"task {t.id} was aborted before it ran", out,
                           why=f"{t.id} was aborted")
            else:  # queued behind: back to the queue, no retry used
                self._requeue(t, f"engine {e.id} died before it started")
                if t.deadline is not None:
                    self._push_deadline(t)
        # Tasks whose follow deps ran on the dead engine, and ready tasks with
        # exclusions (whose candidates may have shrunk, or widened back to the
        # engines they failed on), are re-examined.
        followers, e.followers = sorted(e.followers, key=_by_seq), set()
        for t in followers:
            if t.state is WAITING:
                why = self._when_dead(t)
                if why is not None:
                    self._fail_impossible(t, why, out)
            elif t.state is READY:
                self._fresh.append(t)
        for t in sorted(self._targeted.pop(e.id, ()), key=_by_seq):
            if t.state is WAITING or t.state is READY:
                why = self._off_target(t)
                if why is not None:
                    self._fail_impossible(t, why, out)
        self._fresh.extend(self._ready_excl)

    def _on_abort(self, ev: AbortRequested, out: list[Command]) -> None:
        t = self._tasks.get(ev.task_id)
        if t is None:
            return  # unknown ids are the shell's business
        state = t.state
        if state is WAITING or state is READY:
            self._fail(t, ABORTED, f"task {t.id} was aborted before it ran", out,
                       why=f"{t.id} was aborted")
        elif state is ASSIGNED:
            x = _extra(t)
            e: _Engine = t.engine  # type: ignore[assignment]
            if x.aborted:
                return
            x.aborted = True
            if e.queue[0] is t:
                self._story.append((t.id, ASSIGNED, ASSIGNED, "abort: already running", self._now))
            else:
                x.cancelled = True
                self._story.append((t.id, ASSIGNED, ASSIGNED, f"abort: cancel on engine {e.id}", self._now))
                out.append(Cancel(t.id, e.id))
        else:
            self._story.append((t.id, state, state, "abort: already finished", self._now))

    def _on_tick(self, ev: Tick, out: list[Command]) -> None:
        pass  # due deadlines already expired in handle()

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

    def _walltime_step(self, due: list[tuple[_Task, int, int]], now: float,
                       out: list[Command]) -> None:
        for t, token, phase in due:
            x: _Extra = t.x  # type: ignore[assignment]
            if t.state is not ASSIGNED or x.wt_token != token:
                continue  # stale: the attempt ended or moved
            e: _Engine = t.engine  # type: ignore[assignment]
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

    def _on_forget(self, ev: TaskForgotten, out: list[Command]) -> None:
        t = self._tasks.get(ev.task_id)
        if t is not None and (t.state is DONE or t.state is FAILED):
            del self._tasks[ev.task_id]
            self._story.append((t.id, t.state, None, "forgotten", self._now))

    # ------------------------------------------------------------- placement

    def _pick_plain(self) -> _Engine | None:
        """A free engine for an unconstrained task, by the scheme; None if there is none.
        O(log engines): see :mod:`.free`."""
        return self._free.pick(self._rng)

    def _choose(self, cands: list[_Engine]) -> _Engine:
        if len(cands) == 1:
            return cands[0]
        return cands[self._scheme([e.load for e in cands], self._rng)]

    def _push_plain(self, t: _Task) -> None:
        q = self._plain
        if not q or q[-1].seq < t.seq:
            q.append(t)
        else:
            heapq.heappush(self._plain_late, (t.seq, t))

    def _assign(self, t: _Task, e: _Engine, out: list[Command]) -> None:
        t.state = ASSIGNED
        t.engine = e
        e.queue.append(t)
        e.load += 1
        if e.load == self._cap:
            self._nfree -= 1
        self._lru.move_to_end(e.id)
        e.key = self._stamp = self._stamp + 1
        self._free.update(e)
        e.used = True
        self._unassigned -= 1
        if t.x is not None:
            self._ready_excl.discard(t)
        self._story.append((t.id, READY, ASSIGNED, e.id, self._now))
        out.append(Assign(t.id, e.id))

    def _ready(self, t: _Task, out: list[Command]) -> None:
        """A waiting task's dependencies are met: it is placed when the event settles."""
        t.state = READY
        self._story.append((t.id, WAITING, READY, "dependencies met", self._now))
        self._fresh.append(t)

    def _settle(self, out: list[Command]) -> None:
        """Place the tasks this event made ready and refill the slots it freed.

        In three steps, so that every freed slot goes to the oldest task eligible
        for it, whether it was queued before or became ready just now: queue the
        new tasks (oldest first; some may turn out impossible, which can make
        more tasks ready: repeat), fill the freed engines from the queues, then
        give the new tasks still unassigned to free engines chosen by the scheme.
        Failures and deliveries therefore always precede the assignments they
        enable.
        """
        fresh, freed = self._fresh, self._freed
        if not freed and len(fresh) == 1:  # the usual case: one new task, no freed slot
            t = fresh.pop()
            if t.state is READY:
                if t.deadline is not None and t.deadline <= self._now:
                    self._fail_timeout(t, out)
                else:
                    self._place(t, out)
            if not fresh:
                return
        queued: list[_Task] = []
        while fresh:
            batch = sorted(set(fresh), key=_by_seq)
            fresh.clear()
            for t in batch:
                if t.state is not READY:
                    continue
                if t.deadline is not None and t.deadline <= self._now:
                    self._fail_timeout(t, out)
                elif self._enqueue(t, out):
                    queued.append(t)
        for e in freed:
            if e.alive:
                self._fill(e, out)
        freed.clear()
        if queued:
            queued.sort(key=_by_seq)
            for t in queued:
                if t.state is READY:
                    self._place_free(t, out)

    def _enqueue(self, t: _Task, out: list[Command]) -> bool:
        """Queue ready task ``t`` where engines will find it; False if it turned out impossible."""
        x = t.x
        if x is None or _unrestricted(x):
            self._push_plain(t)
            return True
        cands = self._candidates(t)
        t.gen += 1
        if not cands:
            why = self._stuck(t)
            if why is not None:
                self._fail_impossible(t, why, out)
                return False
        else:
            entry = (t.seq, t.gen, t)
            for e in cands:
                heapq.heappush(e.heap, entry)
        if x.follow is None:
            self._ready_excl.add(t)
        return True

    def _place_free(self, t: _Task, out: list[Command]) -> None:
        """Assign queued ready task ``t`` to a free eligible engine, if there is one.

        Its queue entries are left behind: stale once it is assigned.
        """
        x = t.x
        if x is None or _unrestricted(x):
            if self._nfree and (e := self._pick_plain()) is not None:
                self._assign(t, e, out)
            return
        cap = self._cap
        free = [e for e in self._candidates(t) if e.load < cap]
        if free:
            self._assign(t, self._choose(free), out)

    def _place(self, t: _Task, out: list[Command]) -> None:
        """Give a ready task to a free eligible engine chosen by the scheme, or queue it."""
        x = t.x
        if x is None or _unrestricted(x):
            if self._nfree and (e := self._pick_plain()) is not None:
                self._assign(t, e, out)
            else:
                self._push_plain(t)
            return
        cands = self._candidates(t)
        t.gen += 1
        if not cands:
            why = self._stuck(t)
            if why is not None:
                self._fail_impossible(t, why, out)
                return
        else:
            cap = self._cap
            free = [e for e in cands if e.load < cap]
            if free:
                self._assign(t, self._choose(free), out)
                return
            entry = (t.seq, t.gen, t)
            for e in cands:
                heapq.heappush(e.heap, entry)
        if x.follow is None:
            self._ready_excl.add(t)

    def _candidates(self, t: _Task) -> list[_Engine]:
        """Live engines that may take constrained task ``t`` now, in LRU order."""
        x: _Extra = t.x  # type: ignore[assignment]
        ref = x.refused or ()
        tg = x.targets
        if x.follow is None:
            if tg is not None and len(tg) < len(self._engines):  # its targets only, not a scan
                eng = self._engines
                base = sorted((eng[i] for i in tg if i in eng), key=_by_key)
                base = [e for e in base if e not in ref]
                tg = None
            else:
                base = [e for e in self._lru.values() if e not in ref]
        elif x.follow.spec.all:
            e = x.f_engine
            base = [e] if e is not None and e.alive and e not in ref else []
        else:
            fe = x.f_engines
            base = [e for e in self._lru.values() if e in fe and e not in ref]  # type: ignore[operator]
        if tg is not None:
            base = [e for e in base if e.id in tg]
        fo = x.failed_on
        if fo and len(base) > 1:
            preferred = [e for e in base if e not in fo]
            if preferred:
                return preferred
        return base

    def _eligible(self, t: _Task, e: _Engine) -> bool:
        """Whether engine ``e`` may take constrained task ``t`` now (cheap in the usual case)."""
        x: _Extra = t.x  # type: ignore[assignment]
        if x.refused and e in x.refused:
            return False
        if x.targets is not None and e.id not in x.targets:
            return False
        f = x.follow
        if f is not None:
            if f.spec.all:
                if x.f_engine is not e:
                    return False
            elif e not in x.f_engines:  # type: ignore[operator]
                return False
        if x.failed_on and e in x.failed_on:
            return e in self._candidates(t)
        return True

    def _fill(self, e: _Engine, out: list[Command]) -> None:
        """Engine ``e`` has free slots: give it the oldest eligible ready tasks."""
        cap = self._cap
        while e.load < cap:
            t = self._next_for(e)
            if t is None:
                return
            self._assign(t, e, out)

    def _next_for(self, e: _Engine) -> _Task | None:
        """Pop the ready task with the lowest submission number that ``e`` may run."""
        best: _Task | None = None
        src = 0
        # A global-queue entry is stale unless its task is ready and still
        # unconstrained (it may have been assigned, refused and re-queued since).
        q = self._plain
        while q and not _plain_ready(q[0]):
            q.popleft()
        if q:
            best, src = q[0], 1
        late = self._plain_late
        while late and not _plain_ready(late[0][1]):
            heapq.heappop(late)
        if late and (best is None or late[0][0] < best.seq):
            best, src = late[0][1], 2
        h = e.heap
        while h:
            seq, gen, t = h[0]
            if t.gen == gen and t.state is READY and self._eligible(t, e):
                if best is None or seq < best.seq:
                    best, src = t, 3
                break
            heapq.heappop(h)
        if src == 1:
            q.popleft()
        elif src == 2:
            heapq.heappop(late)
        elif src == 3:
            heapq.heappop(h)
        return best

    def _requeue(self, t: _Task, detail: str) -> None:
        """An assigned task goes back to ready (retry, refusal, engine death)."""
        t.state = READY
        t.engine = None
        x = t.x
        if x is not None and x.started is not None:  # the attempt is over: so are its timers
            x.started = x.interrupted = None
            x.wt_token = 0
        self._unassigned += 1
        self._story.append((t.id, ASSIGNED, READY, detail, self._now))
        self._fresh.append(t)

    def _retry(self, t: _Task, e: _Engine, what: str) -> None:
        """An attempt on ``e`` failed and ``t`` has retries left: use one, avoid ``e``."""
        t.retries -= 1
        x = _extra(t)
        if x.failed_on is None:
            x.failed_on = set()
        x.failed_on.add(e)
        t.deadline = None  # it ran: the timeout no longer applies
        self._requeue(t, f"{what}, retrying ({t.retries} left)")

    def _attempt_failed(self, t: _Task, e: _Engine, error: str, message: str,
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

    def _unqueue(self, t: _Task, e: _Engine) -> None:
        """Take assigned task ``t`` off engine ``e``'s outstanding FIFO."""
        q = e.queue
        if q[0] is t:
            q.popleft()
        else:
            q.remove(t)
        if e.load == self._cap:
            self._nfree += 1
        e.load -= 1
        self._free.update(e)

    # ------------------------------------------------------------ dependencies

    def _count(self, t: _Task, d: _Task) -> str | None:
        """Task ``t`` learns that its dependency ``d`` finished.

        Updates the tallies; returns why ``t`` became impossible, or None.  For a
        ready task with follow all=False a new engine may join its candidates:
        the caller queues it again.
        """
        x: _Extra = t.x  # type: ignore[assignment]
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
                               f"among its targets ({_eids(x.targets)})")
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

    def _met(self, t: _Task) -> bool:
        """Whether a waiting task's after and follow dependencies are met now."""
        x: _Extra = t.x  # type: ignore[assignment]
        if x.after is not None and not x.after.met:
            return False
        f = x.follow
        if f is not None:
            if f.spec.all:
                return f.good == f.n
            return any(e.alive for e in x.f_engines)  # type: ignore[union-attr]
        return True

    def _when_dead(self, t: _Task) -> str | None:
        """Why an unfinished task's dependencies can never be met (no refusals involved)."""
        x: _Extra = t.x  # type: ignore[assignment]
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

    def _follow_any_dead(self, t: _Task) -> str | None:
        """follow all=False with every dependency finished: is any live engine left?"""
        x: _Extra = t.x  # type: ignore[assignment]
        f: Tally = x.follow  # type: ignore[assignment]
        ref = x.refused or ()
        engines = x.f_engines
        tg = x.targets
        if any(e.alive and e not in ref and (tg is None or e.id in tg)
               for e in engines):  # type: ignore[union-attr]
            return None
        if tg is not None and any(e.alive and e not in ref for e in engines):  # type: ignore[union-attr]
            return (f"the engines its follow dependencies ran on "
                    f"({_eids(e.id for e in engines if e.alive)}) are not among its targets "
                    f"({_eids(tg)}), and all of them have finished")
        if not engines:
            return (f"none of its follow dependencies ({_ids(f.spec.ids)}) "
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

    def _off_target(self, t: _Task) -> str | None:
        """Why a task with targets can never run on one of them, or None."""
        x: _Extra = t.x  # type: ignore[assignment]
        tg: frozenset[int] = x.targets  # type: ignore[assignment]
        live = [e for eid in tg if (e := self._engines.get(eid)) is not None]
        if not live:
            return (f"none of the engines it may run on (targets {_eids(tg)}) is registered "
                    "any more, and engine ids are never reused")
        if x.refused and all(e in x.refused for e in live):
            return (f"refused by every engine it may run on (targets {_eids(tg)}): a "
                    f"functional dependency (@require/@depend) is unmet on each{_said(x)}")
        return None

    def _stuck(self, t: _Task) -> str | None:
        """A ready constrained task has no candidate engine: impossible, or just wait?"""
        x: _Extra = t.x  # type: ignore[assignment]
        if x.targets is not None:
            why = self._off_target(t)
            if why is not None:
                return why
        f = x.follow
        if f is None:
            if not self._engines:
                return None  # no engine at all: one may still come
            n = len(self._engines)
            return (f"refused by all {n} engine{'s' if n > 1 else ''} "
                    f"({', '.join(map(str, sorted(self._engines)))}): "
                    f"a functional dependency (@require/@depend) is unmet on each{_said(x)}")
        if f.spec.all:
            e: _Engine = x.f_engine  # type: ignore[assignment]
            if not e.alive:
                return (f"its follow dependencies ran on engine {e.id}, which is gone, "
                        "and follow with all=True needs that engine")
            return (f"refused by engine {e.id}, the only engine its follow dependencies allow "
                    f"(a functional dependency is unmet there{_said(x)})")
        if f.pending:
            return None  # a pending follow dependency may still run somewhere usable
        return self._follow_any_dead(t)

    def _where_ran(self, e: _Engine, spec: DepSpec) -> str:
        """Which of ``spec``'s ids ran on engine ``e`` (for conflict messages)."""
        ids = [i for i in spec.ids if (d := self._tasks.get(i)) is not None
               and d.state is DONE and d.engine is e]
        return f"{_ids(ids)} on engine {e.id}"

    def _outcome(self, d: _Task) -> str:
        """How dependency ``d`` finished, with the chain of causes if we failed it."""
        if d.state is DONE:
            if d.ok:
                return f"succeeded on engine {d.engine.id}" if d.engine else "succeeded"
            x = d.x
            if x is not None and x.cancelled and d.engine is None:
                return "was aborted"
            return f"failed on engine {d.engine.id}" if d.engine else "failed"
        x: _Extra = d.x  # type: ignore[assignment]  # failed by us: why is set
        if x.depth <= _CHAIN:
            return f"failed ({x.why})"
        return f"failed ({x.why.split(' because ', 1)[0]} because of a chain of {x.depth} failures starting with: {x.root})"

    def _bad_dep_why(self, kind: str, tally: Tally, d: _Task) -> str:
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

    # ----------------------------------------------------------------- endings

    def _fail(self, t: _Task, error: str, message: str, out: list[Command], *,
              engine_id: int | None = None, why: str = "", cause: _Task | None = None) -> None:
        """The scheduler fails ``t``: emit Fail, then let its dependents count it."""
        prev = t.state
        if prev is WAITING or prev is READY:
            self._unassigned -= 1
        t.state = FAILED
        t.engine = None
        t.deadline = None
        x = _extra(t)
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

    def _fail_impossible(self, t: _Task, why: str, out: list[Command],
                         cause: _Task | None = None) -> None:
        """Fail ``t`` with ImpossibleDependency because ``why`` (``cause``: the dependency)."""
        self._fail(t, IMPOSSIBLE, f"task {t.id} cannot run: {why}", out,
                   why=f"{t.id} was impossible because {why.split('; ', 1)[0]}", cause=cause)

    def _fail_timeout(self, t: _Task, out: list[Command]) -> None:
        x: _Extra = t.x  # type: ignore[assignment]
        waited = self._now - x.submitted
        what = self._waiting_for(t)
        self._fail(t, TIMEOUT,
                   f"task {t.id} timed out: it waited {waited:g}s (timeout {x.timeout:g}s) "
                   f"for {what} without starting", out,
                   why=f"{t.id} timed out waiting for {what}")

    def _waiting_for(self, t: _Task) -> str:
        """What an unassigned task is waiting for, in words."""
        x: _Extra = t.x  # type: ignore[assignment]
        if t.state is WAITING:
            parts = []
            for kind, tally in (("after", x.after), ("follow", x.follow)):
                if tally is not None and tally.pending:
                    pending = [i for i in tally.spec.ids
                               if (d := self._tasks.get(i)) is not None
                               and d.state is not DONE and d.state is not FAILED]
                    parts.append(f"its {kind} dependencies ({_ids(pending)} unfinished)")
                elif kind == "follow" and tally is not None:
                    parts.append("an engine its follow dependencies ran on")
            return " and ".join(parts) or "its dependencies"
        if x.follow is not None or x.refused or x.targets is not None:
            return "an eligible engine with a free slot"
        if not self._engines:
            return "an engine (none is registered)"
        return f"a free engine (all {len(self._engines)} busy)"

    def _drop_follow_links(self, t: _Task) -> None:
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

    def _finished(self, t: _Task, out: list[Command]) -> None:
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

    def _push_deadline(self, t: _Task) -> None:
        self._dl_count += 1
        heapq.heappush(self._deadlines, (t.deadline, self._dl_count, t))  # type: ignore[arg-type]

    def _expire(self, now: float, out: list[Command]) -> None:
        """Fail every unassigned task whose deadline is due."""
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            deadline, _, t = heapq.heappop(dl)
            if t.deadline == deadline and (t.state is WAITING or t.state is READY):
                self._fail_timeout(t, out)

    # -------------------------------------------------------------- validation

    def validate(self) -> None:
        """Check every invariant; raise AssertionError naming the first broken one."""

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise AssertionError(what)

        cap = self._cap
        need(set(self._lru) == set(self._engines), "LRU order lists exactly the registered engines")
        nfree = 0
        assigned = 0
        for e in self._engines.values():
            need(e.alive, f"{e} registered but not alive")
            need(e.load == len(e.queue), f"{e}: load {e.load} != {len(e.queue)} outstanding")
            need(e.load <= cap, f"{e}: over hwm {self.hwm}")
            nfree += e.load < cap
            for t in e.queue:
                need(t.state is ASSIGNED and t.engine is e, f"{t} queued on {e} but not assigned there")
            assigned += e.load
        need(nfree == self._nfree, f"free engine count {self._nfree} != {nfree}")
        wrong = self._free.check(list(self._lru.values()))
        need(wrong is None, f"free-engine index: {wrong}")
        plain_ids = {id(t) for t in self._plain} | {id(t) for _, t in self._plain_late}
        heap_entries = {(e.id, id(t), g) for e in self._engines.values() for _, g, t in e.heap}
        unassigned = 0
        n_assigned = 0
        free = [e for e in self._engines.values() if e.load < cap]
        for t in self._tasks.values():
            s = t.state
            if s is WAITING or s is READY:
                unassigned += 1
                need(t.engine is None, f"{t} unassigned but has an engine")
                need(t.deadline is None or t.deadline > self._now,
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
                if x is None or _unrestricted(x):
                    need(not free, f"{t} ready and unconstrained while {free} have free slots")
                    need(id(t) in plain_ids, f"{t} ready but not in the global queue")
                else:
                    cands = self._candidates(t)
                    need(not any(e.load < cap for e in cands),
                         f"{t} ready while its candidate engines {cands} have free slots")
                    for e in cands:
                        need((e.id, id(t), t.gen) in heap_entries, f"{t} missing from {e}'s queue")
                    if x.follow is None:
                        need(t in self._ready_excl, f"{t} ready with exclusions but not tracked")
                    if not cands:
                        need(self._stuck(t) is None, f"{t} has no candidate engine and should have failed")

        need(unassigned == self._unassigned, f"unassigned count {self._unassigned} != {unassigned}")
        need(n_assigned == assigned, f"{n_assigned} assigned tasks but engines hold {assigned}")
        for t in self._ready_excl:
            need(t.state is READY, f"{t} tracked as ready with exclusions but is {t.state}")

    def _check_walltime(self, t: _Task, need: Callable[[bool, str], None]) -> None:
        """A running attempt with a walltime: it is its engine's first task, interrupted
        once past its walltime, and never past the grace period after that."""
        x: _Extra = t.x  # type: ignore[assignment]
        need(t.engine.queue[0] is t, f"{t} started but not the first task of its engine")  # type: ignore[union-attr]
        need(x.wt_token != 0, f"{t} started without a walltime timer")
        if x.interrupted is None:
            need(self._now < x.started + x.walltime, f"{t} past its walltime, not interrupted")  # type: ignore[operator]
        else:
            need(self._now < x.interrupted + self._walltimes.grace,
                 f"{t} past its walltime's grace period, its engine not restarted")

    def _check_deps_live(self, t: _Task, need: Callable[[bool, str], None]) -> None:
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


def _wt_live(t: _Task, token: int) -> bool:
    """Whether a walltime timer is still the running attempt's."""
    return t.state is ASSIGNED and t.x.wt_token == token  # type: ignore[union-attr]


def _by_key(e: _Engine) -> int:
    """LRU order: the engine assigned longest ago first."""
    return e.key


def _by_seq(t: _Task) -> int:
    return t.seq


def _unrestricted(x: _Extra) -> bool:
    """No follow, targets, refusal or failed-on engine: any engine may take the task."""
    return x.follow is None and x.targets is None and not x.refused and not x.failed_on


def _plain_ready(t: _Task) -> bool:
    """Ready and unrestricted: a valid entry of the global queue."""
    if t.state is not READY:
        return False
    x = t.x
    return x is None or _unrestricted(x)
