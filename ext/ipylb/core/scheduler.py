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

Tasks.  Each task has one record (:class:`Task`) with an explicit state::

    waiting --deps met--> ready --engine chosen--> assigned --TaskDone--> done
       |                    ^                         |
       |                    +--- retry / unmet / -----+
       |                         engine died
       +---------------------------------------------------------------> failed
                 (impossible, timeout, aborted, invalid, engine error)

``done`` means the engine's result (success or error) was delivered; ``failed``
means the scheduler itself failed the task.  Both are final.  Rarely needed data
(dependencies, exclusions, abort flags, failure explanations) hangs off the
record in a separate ``Extra`` object, so a plain task costs one small record.

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

Modules.  :class:`Scheduler` keeps the event handlers and the public queries; the
rest of its methods live in one mixin per concern, all sharing the state that
``Scheduler.__init__`` sets up: :mod:`.placement` (queues, engine choice),
:mod:`.dependencies` (counting outcomes, cascades, explanations), :mod:`.failures`
(retries, Fail), :mod:`.deadlines` (timeouts, walltimes) and :mod:`.validation`
(invariants); the records (task, engine) and states are in :mod:`.task`.  The
mixins are an internal split: ``Scheduler.handle`` stays the only way in.

Bookkeeping for debugging: every state transition is appended to a bounded log,
``story(task_id)`` replays one task's; ``validate=True`` checks the invariants
after every event (slow: for tests).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from . import schemes
from .deadlines import Deadlines, Walltimes, exceeded, wt_live
from .dependencies import Dependencies
from .deps import Tally
from .events import (
    ABORTED,
    ENGINE_ERROR,
    INVALID,
    WALLTIME,
    AbortRequested,
    Assign,
    Cancel,
    Command,
    Deliver,
    EngineAdded,
    EngineRemoved,
    Steal,
    StealAnswered,
    TaskDone,
    TaskForgotten,
    TaskStarted,
    TaskSubmitted,
    TaskUnmet,
    Tick,
)
from .failures import Failures
from .free import FreeEngines
from .pipeline import AUTO, START_DEPTH, Pipe, Pipelining, parse_hwm
from .placement import Placement
from .task import (
    ASSIGNED,
    BIG,
    DONE,
    FAILED,
    READY,
    WAITING,
    Engine,
    Extra,
    Task,
    by_seq,
    extra,
    show_ids,
)
from .validation import Validation

__all__ = ["Scheduler", "WAITING", "READY", "ASSIGNED", "DONE", "FAILED"]

# Commands that need an engine's address (engine_id): void once it is removed.  (An
# Interrupt goes through its kernel's manager, which outlives it until a restart.)
_TO_ENGINE = frozenset({Assign, Steal, Cancel})


class Scheduler(Placement, Dependencies, Failures, Deadlines, Pipelining, Validation):
    """The pure scheduler: feed it events with :meth:`handle`, carry out its commands.

    ``scheme``: routing scheme name (see :mod:`ipylb.core.schemes`; not ``pure``).
    ``hwm``: at most this many outstanding tasks per engine, 0 for no limit, or ``"auto"``:
    as many as hide the round trip, measured, with queued tasks stolen back for idle
    engines (:mod:`.pipeline`; its Steal commands need StealAnswered events back).
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
        self._pipe: Pipe | None = None
        if hwm == AUTO:
            self._pipe = Pipe()
            self._cap = START_DEPTH
        else:
            self._cap = parse_hwm(hwm) or BIG  # type: ignore[assignment]
        self.hwm = hwm
        # Engines with a free slot, indexed for the scheme's pick in O(log engines).
        self._free = FreeEngines(scheme, self._cap, adaptive=self._pipe is not None)
        self._stamp = 0  # LRU keys of assignments: 1, 2, ...
        self._unused_stamp = -BIG  # LRU keys of engines never assigned: below those
        self._rng = random.Random(seed)
        self._validate = validate
        self._tasks: dict[str, Task] = {}
        self._seq = 0
        self._now = 0.0
        self._engines: dict[int, Engine] = {}
        self._nfree = 0  # engines with a free slot
        self._unassigned = 0  # tasks waiting or ready
        self._plain: deque[Task] = deque()  # ready, unconstrained, in submission order
        self._plain_late: list[tuple[int, Task]] = []  # ... those that came out of order
        self._ready_excl: set[Task] = set()  # ready, with exclusions but no follow
        self._targeted: dict[int, set[Task]] = {}  # engine id -> unfinished tasks targeting it
        self._deadlines: list[tuple[float, int, Task]] = []
        self._walltimes = Walltimes(walltime_grace)
        self._dl_count = 0
        self._fresh: list[Task] = []  # made ready by this event, to place in _settle
        self._freed: list[Engine] = []  # got a free slot in this event, to fill in _settle
        self._dropped: list[int] = []  # engines removed in this event (see _void_commands)
        self._work: list[Task] = []  # finished tasks whose dependents still need telling
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
            StealAnswered: self._on_steal_answered,
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
        p = self._pipe
        if p is not None and p.timers and p.timers[0][0] <= now:
            self._expire_holds(now, out)
        handler(event, out)
        if self._fresh or self._freed:
            self._settle(out)
        if p is not None:
            self._pipe_settle(out)
        if self._dropped:
            self._void_commands(out)
        if self._validate:
            self.validate()
        return out

    def _void_commands(self, out: list[Command]) -> None:
        """Engines were removed in this event: drop what ``out`` sends them.  The expiries
        run before the event (hold timers, deadlines, walltimes) may have addressed an
        engine the event then removed (a Steal, an Assign, a Cancel); its tasks are placed
        again by the removal, and the shell no longer knows its address.
        Once removed, an engine is addressed by nothing else (its ids are never reused)."""
        gone = set(self._dropped)
        self._dropped.clear()
        out[:] = [c for c in out if c.__class__ not in _TO_ENGINE or c.engine_id not in gone]

    def next_deadline(self) -> float | None:
        """The earliest time a waiting task times out, a running one reaches its walltime or
        grace period, or (hwm="auto") an engine's hold timer is due (send a Tick then), or
        None."""
        dl = self._deadlines
        first = None
        while dl:
            deadline, _, t = dl[0]
            if t.x.deadline == deadline and (t.state is WAITING or t.state is READY):
                first = deadline
                break
            heapq.heappop(dl)
        wt = self._walltimes.next(wt_live)
        if wt is not None and (first is None or wt < first):
            first = wt
        p = self._pipe
        if p is not None and p.timers and (first is None or p.timers[0][0] < first):
            return p.timers[0][0]  # (a Tick then clears every timer due)
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

    def engine_of(self, task_id: str) -> int | None:
        """The engine a task is assigned to (queued there or running), or None: not
        assigned (yet, or any more), or an unknown id."""
        t = self._tasks.get(task_id)
        return None if t is None or t.state is not ASSIGNED or t.engine is None else t.engine.id

    def pipeline_status(self) -> dict[str, Any] | None:
        """``hwm="auto"``: depth, the measured rtt and task time (seconds, None until
        measured), steal requests sent and answered "cancelled"; None for a fixed hwm."""
        return None if self._pipe is None else self._pipe.status()

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
            t = tasks[tid] = Task(tid, seq, ev.retries)
            if self._nfree and (e := self._pick_plain()) is not None:
                t.state = ASSIGNED
                t.engine = e
                e.queue.append(t)
                e.load += 1
                if e.load == self._cap:
                    self._nfree -= 1
                e.key = self._stamp = self._stamp + 1
                self._free.update(e)
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
        t = tasks[tid] = Task(tid, seq, ev.retries)
        self._unassigned += 1
        self._submit_slow(t, ev, out)

    def _submit_slow(self, t: Task, ev: TaskSubmitted, out: list[Command]) -> None:
        """Submission with dependencies and/or a timeout."""
        x = t.x = Extra()
        if ev.walltime:
            x.walltime = ev.walltime
        after = ev.after if ev.after is not None and ev.after.ids else None
        follow = ev.follow if ev.follow is not None and ev.follow.ids else None
        tasks = self._tasks
        wanted = (after.ids if after else frozenset()) | (follow.ids if follow else frozenset())
        unknown = [d for d in wanted if d not in tasks or d == t.id]
        if unknown:
            self._story.append((t.id, None, WAITING, "submitted", self._now))
            self._fail(t, INVALID,
                       f"task {t.id} depends on unknown task(s): {show_ids(unknown)} "
                       "(never submitted, or forgotten)", out,
                       why=f"{t.id} depended on unknown task(s) {show_ids(unknown)}")
            return
        if ev.timeout:
            x.timeout = ev.timeout
            x.submitted = ev.time
            x.deadline = ev.time + ev.timeout
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
                ds = d.dependents
                if ds is None:  # most tasks have one dependent: a 1-tuple, 48 bytes
                    d.dependents = (t,)
                elif ds.__class__ is tuple:
                    d.dependents = [ds[0], t]
                else:
                    ds.append(t)  # type: ignore[union-attr]
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
        e: Engine = t.engine  # type: ignore[assignment]
        if e.id != ev.engine_id:
            return
        skipped = ev.skipped  # cancelled before it started: it ran nowhere
        if self._pipe is not None:
            self._pipe_done(t, e, None if skipped else ev.ran)
        self._unqueue(t, e)
        if not skipped:
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
            if skipped:
                t.engine = None
            self._story.append((t.id, ASSIGNED, DONE, "skipped: it never ran there"
                                if skipped else "error", self._now))
            out.append(Deliver(t.id))
        if x is not None:
            x.deadline = None
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
        e: Engine = t.engine  # type: ignore[assignment]
        self._unqueue(t, e)
        x = extra(t)
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
        if t.x is not None and t.x.deadline is not None:
            self._push_deadline(t)

    def _on_engine_added(self, ev: EngineAdded, out: list[Command]) -> None:
        eid = ev.engine_id
        if eid in self._engines:
            raise ValueError(f"engine {eid} is already registered")
        e = Engine(eid)
        self._engines[eid] = e
        # Never used counts as least recently used: after the other unused engines
        # (in registration order), before every engine that has had a task: its LRU key is
        # below every assignment stamp (O(1): no list of engines to reorder).
        e.key = self._unused_stamp = self._unused_stamp + 1
        self._free.registered(e)
        self._nfree += 1
        if self._pipe is not None:
            self._pipe.became_idle(e)
        self._story.append((None, None, None, f"engine {eid} added", self._now))
        if self._ready_excl:
            # Tasks held back by exclusions (or targets) may run here; soft exclusions elsewhere
            # narrow lazily (the entries fail their eligibility check).
            for t in sorted(self._ready_excl, key=by_seq):
                if self._eligible(t, e):
                    heapq.heappush(e.heap, (t.seq, t.x.gen, t))
        self._freed.append(e)

    def _on_engine_removed(self, ev: EngineRemoved, out: list[Command]) -> None:
        e = self._engines.pop(ev.engine_id, None)
        if e is None:
            return
        self._drop_engine(e, ev.reason, out, running=not ev.idle)

    def _drop_engine(self, e: Engine, reason: str, out: list[Command], running: bool) -> None:
        """Forget engine ``e`` (gone, or being restarted): its running task (the first of its
        queue, if ``running``) fails or is retried, the tasks queued behind it are queued
        again (no retry used), and tasks tied to it are re-examined."""
        if e.load < self._cap:
            self._nfree -= 1
        e.alive = False
        self._dropped.append(e.id)
        if self._pipe is not None:
            self._pipe_engine_gone(e)
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
                if t.x is not None and t.x.deadline is not None:
                    self._push_deadline(t)
        # Tasks whose follow deps ran on the dead engine, and ready tasks with
        # exclusions (whose candidates may have shrunk, or widened back to the
        # engines they failed on), are re-examined.
        followers, e.followers = sorted(e.followers, key=by_seq), set()
        for t in followers:
            if t.state is WAITING:
                why = self._when_dead(t)
                if why is not None:
                    self._fail_impossible(t, why, out)
            elif t.state is READY:
                self._fresh.append(t)
        for t in sorted(self._targeted.pop(e.id, ()), key=by_seq):
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
            x = extra(t)
            e: Engine = t.engine  # type: ignore[assignment]
            if x.aborted:
                return
            x.aborted = True
            if e.queue[0] is t:
                self._story.append((t.id, ASSIGNED, ASSIGNED, "abort: already running", self._now))
            elif self._pipe is not None and self._pipe_abort(t, e, out):
                pass  # hwm="auto": asked back, acknowledged (:mod:`.pipeline`)
            else:
                x.cancelled = True
                self._story.append((t.id, ASSIGNED, ASSIGNED, f"abort: cancel on engine {e.id}", self._now))
                out.append(Cancel(t.id, e.id))
        else:
            self._story.append((t.id, state, state, "abort: already finished", self._now))

    def _on_tick(self, ev: Tick, out: list[Command]) -> None:
        pass  # due deadlines already expired in handle()

    def _on_forget(self, ev: TaskForgotten, out: list[Command]) -> None:
        t = self._tasks.get(ev.task_id)
        if t is not None and (t.state is DONE or t.state is FAILED):
            del self._tasks[ev.task_id]
            self._story.append((t.id, t.state, None, "forgotten", self._now))
