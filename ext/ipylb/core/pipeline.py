"""``hwm="auto"``: an adaptive pipeline per engine, and stealing back queued tasks.

With ``hwm=1`` an engine idles for one round trip (result to the controller, next task
back) between tasks; with a fixed ``hwm`` > 1 engines stay fed, but a short task can
wait behind a long one while another engine idles.  ``hwm="auto"`` keeps both good
properties (issue 14, item 2; API.md's promise that a short task never stays queued
behind a running one while another engine is idle):

Depth.  Every engine may hold ``depth`` outstanding tasks, with

    depth = 1 + ceil(rtt / task_time), between 1 and MAX_DEPTH,

the number of tasks that run while one round trip completes, plus the one running;
but 1 when ``rtt < NEGLIGIBLE * task_time``: the round trip then costs an engine under
1% of its time, a task queued behind a running one would save next to nothing, and it
would cost a steal (a request and its answer before the idle engine gets it) whenever
another engine frees up first.  Both are exponentially weighted moving averages
(weight ``ALPHA`` per sample):

* ``task_time``: seconds each task ran on its engine (``TaskDone.ran``, from the
  engine's own start and end stamps, so queueing and network time are not in it);
  a task its engine skipped (aborted before it started) ran nowhere and is no sample;
* ``rtt``: for a task sent to an engine with nothing outstanding (it starts as soon as
  it arrives), the controller's time from its Assign to its TaskDone minus what it ran:
  the round trip the pipeline has to hide.

Slow start: the depth is 1 until measured, so nothing waits on an engine behind
another task before the measurements say the round trip matters (at depth 1 every
task is a round-trip sample).  It is recomputed every ``EVERY`` samples and changes
only then (each change revisits every engine's free slot once, so it must stay rare);
a rise at most doubles it (1, 2, 4, 8, 16: a short burst of trivial tasks does not
fill every engine's queue at once), a fall applies at once.  Lowering it leaves tasks
already sent where they are; raising it fills the new slots at once.

Stealing.  When an engine is idle (nothing outstanding) while a task it may run waits
queued, not started, on a busy engine, the core emits :class:`~.events.Steal` for the
oldest such task on the engine with the most queued.  The engine answers
(:class:`~.events.StealAnswered`): ``cancelled`` means it had not started the task and
never will: only then is the task taken off that engine and given to the idle one (no
retry used; its dependencies and constraints are checked against the new engine as for
any placement).  Otherwise it had already started: its result comes as usual, and the
core does not ask for that task again.  Until the answer, the task stays where it was,
so a lost request or answer costs only the steal, never the task: if the busy engine
dies meanwhile, the task is re-queued as any task queued behind a dead engine's
running one.  One request per idle engine is out at a time.

Holding.  Queueing a task behind a running one pays only if that one ends soon.  An
engine whose running task has run for ``hold_time = HOLD * max(task_time, rtt)``
seconds, kept between ``MIN_HOLD`` and ``MAX_HOLD`` (a round trip of a few ms is under 1%
of a task that has run 0.2 s: queueing behind it saves next to nothing),
timed from when the controller saw it become the engine's running task, is *held*: it takes no task until that one ends, and the tasks queued behind it
are asked back (a Steal with no thief; "cancelled" puts the task back in the
controller's queue, no retry used, for whichever engine frees first; "too late": it
had started after all).  So, as with ``hwm=1``, what waits for a long task waits in the
controller (``queue_status()["unassigned"]``), and the pipeline holds only tasks due to
start within a few task times.  The shell learns when to look from
:meth:`~ipylb.core.scheduler.Scheduler.next_deadline` (a Tick then): one timer per busy
engine, re-armed lazily, so its cost does not grow with the tasks.

Aborts.  A task aborted while it waits, queued, on an engine is asked back the same
way (a Steal with no thief): "cancelled" fails it ABORTED at once (it never ran; its
slot is free without waiting for the running task); "too late" sends the engine a
:class:`~.events.Cancel`, which makes it skip the task if it has not in fact started
(an engine whose steal socket is not connected yet is answered "too late" for it).

Pure: no clock, no I/O; time comes with the events.  The state lives in
:class:`Pipe`; :class:`Pipelining` is the scheduler's mixin that applies it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import Any

from .events import ABORTED, Assign, Cancel, Command, Steal, StealAnswered
from .task import ASSIGNED, Engine, Task, by_key, unrestricted

__all__ = ["AUTO", "DEFAULT_HWM", "MAX_DEPTH", "Pipe", "Pipelining", "depth_for", "parse_hwm"]

AUTO = "auto"
# The hwm of a cluster started without one: Client(engines=N), %lb_start, `ipylb cluster
# start`, the controller, `ipylb bench` (issue 14 item 2: the adaptive pipeline became the
# default once its makespan and API.md's "never queued behind a running task while another
# engine is idle" held; hwm=1 stays available).  The core's Scheduler keeps hwm=1 as its
# own default: that is the shell's choice to make.
DEFAULT_HWM: int | str = AUTO
START_DEPTH = 1  # slow start: nothing pipelined before the round trip is measured
MAX_DEPTH = 16  # tasks outstanding per engine at most (trivial tasks)
ALPHA = 0.2  # EWMA weight of a new sample
HOLD = 4  # a running task is long once it has run this many task times (or round trips)
MIN_HOLD = 0.1  # ... and at least this many seconds
MAX_HOLD = 0.2  # ... and at most: behind a task that long, queueing saves about 1% at most
EVERY = 8  # samples between two recomputations of the depth
NEGLIGIBLE = 0.01  # a round trip under 1% of the task time is not worth a queued task


def parse_hwm(value: object) -> int | str:
    """An ``hwm`` setting as given (an int, or text from a command line): an int >= 0 (0:
    no limit) or ``"auto"``; ValueError that says so otherwise."""
    if value == AUTO:
        return AUTO
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"hwm must be an int >= 0 (0: no limit) or 'auto', not {value!r}")
    return value


def depth_for(rtt: float, task_time: float) -> int:
    """Outstanding tasks per engine that hide a round trip of ``rtt`` seconds when tasks
    run ``task_time`` seconds each: ``1 + ceil(rtt / task_time)``, in [1, MAX_DEPTH];
    1 when the round trip is under ``NEGLIGIBLE`` of the task time (nothing to gain)."""
    if rtt <= task_time * NEGLIGIBLE:
        return 1
    if task_time <= rtt / MAX_DEPTH:
        return MAX_DEPTH
    return min(MAX_DEPTH, 1 + math.ceil(rtt / task_time))


class Pipe:
    """The measurements and the steal bookkeeping of ``hwm="auto"``."""

    __slots__ = ("rtt", "task_time", "samples", "depth", "new_depth", "probes", "stealing",
                 "thieves", "late", "idle", "loaded", "dirty", "steals", "stolen", "since",
                 "timers", "timed", "holds")

    def __init__(self) -> None:
        self.rtt: float | None = None  # EWMA, seconds
        self.task_time: float | None = None  # EWMA, seconds
        self.samples = 0
        self.depth = START_DEPTH
        self.new_depth = 0  # a depth to apply at the end of the event (0: none)
        # engine -> (task it was sent while idle, when): the round-trip samples
        self.probes: dict[Engine, tuple[Task, float]] = {}
        # task -> (its engine, the idle engine it is for; None: asked back for an abort)
        self.stealing: dict[Task, tuple[Engine, Engine | None]] = {}
        self.thieves: set[Engine] = set()  # idle engines with a request out for them
        self.late: dict[Task, Engine] = {}  # too late to steal: started on that engine
        self.idle: set[Engine] = set()  # registered engines with nothing outstanding
        self.loaded: set[Engine] = set()  # engines that may hold tasks behind a running one
        self.dirty = False  # an engine became idle, or free to steal for again
        self.steals = 0  # requests sent
        self.stolen = 0  # ... answered "cancelled"
        self.since: dict[Engine, float] = {}  # when its running task became its running one
        self.timers: list[tuple[float, int, Engine]] = []  # (when, tie, engine): hold checks
        self.timed: set[Engine] = set()  # busy engines with a timer in ``timers``
        self.holds = 0  # engines held so far

    def hold_time(self) -> float:
        """Seconds a running task may run before its engine is held."""
        longest = max(self.task_time or 0.0, self.rtt or 0.0)
        return min(max(HOLD * longest, MIN_HOLD), MAX_HOLD)

    def became_idle(self, e: Engine) -> None:
        self.idle.add(e)
        self.dirty = True

    def sample(self, ran: float, rtt: float | None) -> None:
        """One task's run time and, if it was a probe, the round trip around it."""
        a = ALPHA
        tt = self.task_time
        self.task_time = ran if tt is None else tt + a * (ran - tt)
        if rtt is not None:
            r = self.rtt
            self.rtt = rtt if r is None else r + a * (rtt - r)
        self.samples += 1
        if self.samples % EVERY == 0 and self.rtt is not None:
            d = min(depth_for(self.rtt, self.task_time), 2 * self.depth)  # slow start
            if d != self.depth:
                self.new_depth = d

    def status(self) -> dict[str, Any]:
        """The pipeline's state for monitoring (seconds)."""
        return {"depth": self.depth, "rtt": self.rtt, "task_time": self.task_time,
                "steals": self.steals, "stolen": self.stolen, "holds": self.holds}


class Pipelining:
    """The ``hwm="auto"`` part of :class:`~ipylb.core.scheduler.Scheduler` (a mixin: the
    scheduler's ``__init__`` owns ``_pipe``, None unless ``hwm="auto"``)."""

    _pipe: Pipe | None

    def _pipe_done(self, t: Task, e: Engine, ran: float | None) -> None:
        """TaskDone of ``t`` on ``e`` (before it leaves the engine): measure, and drop any
        steal of it (the answer, crossing this result, will be stale)."""
        p: Pipe = self._pipe  # type: ignore[assignment]
        if p.stealing:
            self._pipe_unsteal(t)
        if p.late:
            p.late.pop(t, None)
        probe = p.probes.get(e)
        rtt = None
        if probe is not None and probe[0] is t:
            del p.probes[e]
            if ran is not None:
                rtt = max(self._now - probe[1] - ran, 0.0)
        if ran is not None and ran >= 0:
            p.sample(ran, rtt)

    def _pipe_next_head(self, e: Engine) -> None:
        """``e``'s running task left it (ended, refused) with more queued: the next one
        starts now; its engine's hold timer runs (it stopped if the engine was held)."""
        p: Pipe = self._pipe  # type: ignore[assignment]
        now = p.since[e] = self._now
        if e not in p.timed:
            p.timed.add(e)
            heapq.heappush(p.timers, (now + p.hold_time(), id(e), e))

    def _pipe_unsteal(self, t: Task) -> None:
        p: Pipe = self._pipe  # type: ignore[assignment]
        rec = p.stealing.pop(t, None)
        if rec is not None:
            p.thieves.discard(rec[1])
            p.dirty = True

    def _pipe_engine_gone(self, e: Engine) -> None:
        """Engine ``e`` left: its probe and the steals from it end (its tasks are re-queued
        by the caller); a steal for it still places the task once answered."""
        p: Pipe = self._pipe  # type: ignore[assignment]
        p.probes.pop(e, None)
        p.since.pop(e, None)
        p.timed.discard(e)  # (its timer is dropped when it comes due)
        p.idle.discard(e)
        p.loaded.discard(e)
        p.thieves.discard(e)  # its requests stand: the answer places the task elsewhere
        for t, (victim, thief) in list(p.stealing.items()):
            if victim is e:  # the task is re-queued with the engine's others
                del p.stealing[t]
                if thief is not e:
                    p.thieves.discard(thief)
                    p.dirty = True
        for t, where in list(p.late.items()):
            if where is e:
                del p.late[t]

    def _on_steal_answered(self, ev: StealAnswered, out: list[Command]) -> None:
        p = self._pipe
        t = self._tasks.get(ev.task_id)
        if p is None or t is None:
            return
        rec = p.stealing.get(t)
        if rec is None or rec[0].id != ev.engine_id or t.state is not ASSIGNED \
                or t.engine is not rec[0]:
            return  # stale: the task finished, or its engine died, before the answer
        victim, thief = rec
        del p.stealing[t]
        p.thieves.discard(thief)
        p.dirty = True
        x = t.x
        if not ev.cancelled:  # it had started: its result will come
            p.late[t] = victim
            self._story.append((t.id, ASSIGNED, ASSIGNED, f"steal: already started on engine "
                                f"{victim.id}", self._now))
            if x is not None and x.aborted and not x.cancelled:  # skipped if not in fact
                x.cancelled = True
                out.append(Cancel(t.id, victim.id))
            return
        p.stolen += 1
        self._unqueue(t, victim)
        self._freed.append(victim)
        if x is not None and x.aborted:
            t.engine = None
            self._fail(t, ABORTED, f"task {t.id} was aborted before it ran", out,
                       why=f"{t.id} was aborted")
            return
        self._requeue(t, f"stolen back from engine {victim.id}" if thief is not None else
                      f"recalled from held engine {victim.id}")
        if thief is not None and thief.alive and thief.load < self._cap and (x is None or unrestricted(x)
                                                       or self._eligible(t, thief)):
            self._assign(t, thief, out)
        elif x is not None and x.deadline is not None:
            self._push_deadline(t)

    def _pipe_abort(self, t: Task, e: Engine, out: list[Command]) -> bool:
        """Aborted task ``t`` waits queued on ``e`` behind its running one: ask for it back
        (a Steal with no thief; its answer fails it, or sends the Cancel).  False if ``e``
        is known to have started it: the caller sends the Cancel, as for a fixed hwm."""
        p: Pipe = self._pipe  # type: ignore[assignment]
        if p.late.get(t) is e or t.x.started is not None:  # type: ignore[union-attr]
            return False
        if t not in p.stealing:  # else the answer to the steal out for it decides
            p.stealing[t] = (e, None)
            p.steals += 1
            out.append(Steal(t.id, e.id))
        self._story.append((t.id, ASSIGNED, ASSIGNED, f"abort: asked engine {e.id} for it "
                            "back", self._now))
        return True

    def _pipe_settle(self, out: list[Command]) -> None:
        """End of an event: apply a new depth, note round-trip probes, and steal for the
        engines left idle."""
        p: Pipe = self._pipe  # type: ignore[assignment]
        if p.new_depth:
            self._set_depth(p.new_depth, out)
        now = self._now
        engines = self._engines
        idle = p.idle
        behind = False
        for c in out:
            if c.__class__ is Assign:
                e = engines.get(c.engine_id)
                if e is None:
                    continue
                if e in idle:  # busy again: its first task starts now
                    idle.discard(e)
                    p.since[e] = now
                    if e not in p.timed:  # check on its running task later
                        p.timed.add(e)
                        heapq.heappush(p.timers, (now + p.hold_time(), id(e), e))
                if e.load == 1:
                    p.probes[e] = (e.queue[0], now)
                else:
                    behind = True
                    p.loaded.add(e)
        if not idle or not (p.dirty or behind) or not p.loaded:
            return
        p.dirty = False
        # Engines only come to hold queued tasks by assignment (seen above): no scan.
        loaded = p.loaded = {e for e in p.loaded if e.load > 1}
        if not loaded:
            return
        thieves = p.thieves
        free = [e for e in idle if e not in thieves]
        if not free:
            return
        free.sort(key=by_key)  # LRU first
        # Each queued task that may be stolen goes to the first free thief that may run it,
        # the most loaded victims' oldest first: one pass over the queued tasks, however
        # many engines are idle (a thief per task, not every victim per thief).
        for victim in sorted(loaded, key=lambda e: (-e.load, e.key)):
            for t in self._stealables(victim):
                x = t.x
                if x is None or unrestricted(x):
                    thief = free.pop(0)
                else:
                    j = next((k for k, e in enumerate(free) if self._eligible(t, e)), -1)
                    if j < 0:
                        continue
                    thief = free.pop(j)
                p.stealing[t] = (victim, thief)
                thieves.add(thief)
                p.steals += 1
                self._story.append((t.id, ASSIGNED, ASSIGNED, f"steal: for engine "
                                    f"{thief.id}, asked engine {victim.id}", now))
                out.append(Steal(t.id, victim.id))
                if not free:
                    return

    def _expire_holds(self, now: float, out: list[Command]) -> None:
        """The due hold timers: an engine whose running task has run for the hold time is
        held and its queued tasks asked back; a busy one whose running task is younger gets
        its timer again; an idle or gone one loses it (the next assignment re-arms it)."""
        p: Pipe = self._pipe  # type: ignore[assignment]
        timers = p.timers
        hold = p.hold_time()
        while timers and timers[0][0] <= now:
            _, _, e = heapq.heappop(timers)
            if not e.alive or not e.load or e.held:
                p.timed.discard(e)
                continue
            due = p.since.get(e, now) + hold
            if due > now:
                heapq.heappush(timers, (due, id(e), e))
                continue
            p.timed.discard(e)
            e.held = True
            p.holds += 1
            self._free.update(e)
            head = e.queue[0]
            self._story.append((head.id, ASSIGNED, ASSIGNED, f"has run {now - p.since[e]:.3g} s "
                                f"on engine {e.id}: the engine takes nothing more until it ends",
                                now))
            for i in range(1, e.load):
                t = e.queue[i]
                if t in p.stealing or p.late.get(t) is e:
                    continue
                x = t.x
                if x is not None and (x.aborted or x.started is not None):
                    continue
                p.stealing[t] = (e, None)
                p.steals += 1
                self._story.append((t.id, ASSIGNED, ASSIGNED, f"recall: asked held engine "
                                    f"{e.id} for it back", now))
                out.append(Steal(t.id, e.id))

    def _stealables(self, victim: Engine) -> Iterator[Task]:
        """The tasks queued on ``victim`` behind its running one, oldest first, that are not
        being stolen, known started or aborted."""
        p: Pipe = self._pipe  # type: ignore[assignment]
        q = victim.queue
        for i in range(1, len(q)):
            t = q[i]
            if t in p.stealing or p.late.get(t) is victim:
                continue
            x = t.x
            if x is None or not (x.aborted or x.started is not None):
                yield t

    def _stealable(self, victim: Engine, thief: Engine) -> Task | None:
        """The oldest of :meth:`_stealables` that ``thief`` may run, or None: what an idle
        ``thief`` with no request out must never leave behind (API.md's promise; the
        property tests check it after every event)."""
        for t in self._stealables(victim):
            x = t.x
            if x is None or unrestricted(x) or self._eligible(t, thief):
                return t
        return None

    def _set_depth(self, depth: int, out: list[Command]) -> None:
        """The pipeline's depth changes: every engine's free slot is counted again, and
        engines with new free slots take ready tasks."""
        p: Pipe = self._pipe  # type: ignore[assignment]
        p.depth, p.new_depth = depth, 0
        self._cap = depth
        self._free.cap = depth
        nfree = 0
        for e in self._by_lru():
            nfree += e.load < depth
            self._free.update(e)
        self._nfree = nfree
        self._story.append((None, None, None, f"pipeline depth {depth}", self._now))
        for e in self._by_lru():
            if e.load < depth:
                self._fill(e, out)
