"""Placement and queues: which engine a ready task goes to, and where it waits meanwhile.

The rules (see the theory of operation in :mod:`ipylb.core.scheduler`): a ready task
goes straight to a free eligible engine chosen by the scheme; otherwise unconstrained
tasks wait in one global queue (a deque in submission order, plus a heap for the few
that become ready out of order) and constrained ones (follow, targets, refusals,
failed-on engines) in a heap per candidate engine.  A freed slot takes the oldest
eligible ready task; stale queue entries are dropped when they reach a head.
"""

from __future__ import annotations

import heapq

from .events import Assign, Command
from .task import (
    ASSIGNED,
    READY,
    WAITING,
    Engine,
    Extra,
    Task,
    by_key,
    by_seq,
    plain_ready,
    unrestricted,
)

__all__ = ["Placement"]


class Placement:
    """The placement part of :class:`~ipylb.core.scheduler.Scheduler` (a mixin: the
    scheduler's ``__init__`` owns the state it uses)."""

    def _pick_plain(self) -> Engine | None:
        """A free engine for an unconstrained task, by the scheme; None if there is none.
        O(log engines): see :mod:`.free`."""
        return self._free.pick(self._rng)

    def _by_lru(self) -> list[Engine]:
        """The registered engines, least recently assigned first (their LRU keys, see
        :mod:`.free`).  O(engines log engines): for constrained placements only."""
        return sorted(self._engines.values(), key=by_key)

    def _choose(self, cands: list[Engine]) -> Engine:
        if len(cands) == 1:
            return cands[0]
        return cands[self._scheme([e.load for e in cands], self._rng)]

    def _push_plain(self, t: Task) -> None:
        q = self._plain
        if not q or q[-1].seq < t.seq:
            q.append(t)
        else:
            heapq.heappush(self._plain_late, (t.seq, t))

    def _assign(self, t: Task, e: Engine, out: list[Command]) -> None:
        t.state = ASSIGNED
        t.engine = e
        e.queue.append(t)
        e.load += 1
        if e.load == self._cap:
            self._nfree -= 1
        e.key = self._stamp = self._stamp + 1
        self._free.update(e)
        self._unassigned -= 1
        if t.x is not None:
            self._ready_excl.discard(t)
        self._story.append((t.id, READY, ASSIGNED, e.id, self._now))
        out.append(Assign(t.id, e.id))

    def _ready(self, t: Task, out: list[Command]) -> None:
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
                if (x := t.x) is not None and x.deadline is not None and x.deadline <= self._now:
                    self._fail_timeout(t, out)
                else:
                    self._place(t, out)
            if not fresh:
                return
        queued: list[Task] = []
        while fresh:
            batch = sorted(set(fresh), key=by_seq)
            fresh.clear()
            for t in batch:
                if t.state is not READY:
                    continue
                if (x := t.x) is not None and x.deadline is not None and x.deadline <= self._now:
                    self._fail_timeout(t, out)
                elif self._enqueue(t, out):
                    queued.append(t)
        for e in freed:
            if e.alive:
                self._fill(e, out)
        freed.clear()
        if queued:
            queued.sort(key=by_seq)
            for t in queued:
                if t.state is READY:
                    self._place_free(t, out)

    def _enqueue(self, t: Task, out: list[Command]) -> bool:
        """Queue ready task ``t`` where engines will find it; False if it turned out impossible."""
        x = t.x
        if x is None or unrestricted(x):
            self._push_plain(t)
            return True
        return self._enqueue_on(t, self._candidates(t), out)

    def _enqueue_on(self, t: Task, cands: list[Engine], out: list[Command]) -> bool:
        """Queue constrained ready task ``t`` on its candidate engines ``cands``; with none,
        fail it if it is impossible (False), else it waits for an engine."""
        x: Extra = t.x  # type: ignore[assignment]  # constrained: it has one
        x.gen += 1
        if not cands:
            why = self._stuck(t)
            if why is not None:
                self._fail_impossible(t, why, out)
                return False
        else:
            entry = (t.seq, x.gen, t)
            for e in cands:
                heapq.heappush(e.heap, entry)
        if x.follow is None:
            self._ready_excl.add(t)
        return True

    def _place_free(self, t: Task, out: list[Command]) -> None:
        """Assign queued ready task ``t`` to a free eligible engine, if there is one.

        Its queue entries are left behind: stale once it is assigned.
        """
        x = t.x
        if x is None or unrestricted(x):
            if self._nfree and (e := self._pick_plain()) is not None:
                self._assign(t, e, out)
            return
        cap = self._cap
        free = [e for e in self._candidates(t) if e.load < cap and not e.held]
        if free:
            self._assign(t, self._choose(free), out)

    def _place(self, t: Task, out: list[Command]) -> None:
        """Give a ready task to a free eligible engine chosen by the scheme, or queue it."""
        x = t.x
        if x is None or unrestricted(x):
            if self._nfree and (e := self._pick_plain()) is not None:
                self._assign(t, e, out)
            else:
                self._push_plain(t)
            return
        cands = self._candidates(t)
        cap = self._cap
        free = [e for e in cands if e.load < cap and not e.held]
        if free:
            self._assign(t, self._choose(free), out)
        else:
            self._enqueue_on(t, cands, out)

    def _candidates(self, t: Task) -> list[Engine]:
        """Live engines that may take constrained task ``t`` now, in LRU order."""
        x: Extra = t.x  # type: ignore[assignment]
        ref = x.refused or ()
        tg = x.targets
        if x.follow is None:
            if tg is not None and len(tg) < len(self._engines):  # its targets only, not a scan
                eng = self._engines
                base = sorted((eng[i] for i in tg if i in eng), key=by_key)
                base = [e for e in base if e not in ref]
                tg = None
            else:
                base = [e for e in self._by_lru() if e not in ref]
        elif x.follow.spec.all:
            e = x.f_engine
            base = [e] if e is not None and e.alive and e not in ref else []
        else:
            fe = x.f_engines
            base = sorted((e for e in fe if e.alive and e not in ref), key=by_key)  # type: ignore[union-attr]
        if tg is not None:
            base = [e for e in base if e.id in tg]
        fo = x.failed_on
        if fo and len(base) > 1:
            preferred = [e for e in base if e not in fo]
            if preferred:
                return preferred
        return base

    def _eligible(self, t: Task, e: Engine) -> bool:
        """Whether engine ``e`` may take constrained task ``t`` now (cheap in the usual case)."""
        x: Extra = t.x  # type: ignore[assignment]
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

    def _fill(self, e: Engine, out: list[Command]) -> None:
        """Engine ``e`` has free slots: give it the oldest eligible ready tasks (none while it
        is held: hwm="auto", :mod:`.pipeline`)."""
        cap = self._cap
        while e.load < cap and not e.held:
            t = self._next_for(e)
            if t is None:
                return
            self._assign(t, e, out)

    def _next_for(self, e: Engine) -> Task | None:
        """Pop the ready task with the lowest submission number that ``e`` may run."""
        best: Task | None = None
        src = 0
        # A global-queue entry is stale unless its task is ready and still
        # unconstrained (it may have been assigned, refused and re-queued since).
        q = self._plain
        while q and not plain_ready(q[0]):
            q.popleft()
        if q:
            best, src = q[0], 1
        late = self._plain_late
        while late and not plain_ready(late[0][1]):
            heapq.heappop(late)
        if late and (best is None or late[0][0] < best.seq):
            best, src = late[0][1], 2
        h = e.heap
        while h:
            seq, gen, t = h[0]
            if t.x.gen == gen and t.state is READY and self._eligible(t, e):
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

    def _requeue(self, t: Task, detail: str) -> None:
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

    def _unqueue(self, t: Task, e: Engine) -> None:
        """Take assigned task ``t`` off engine ``e``'s outstanding FIFO."""
        q = e.queue
        if q[0] is t:
            q.popleft()
            if e.held:  # its long task is over: it takes tasks again
                e.held = False
            if q and self._pipe is not None:
                self._pipe_next_head(e)
        else:
            q.remove(t)
        if e.load == self._cap:
            self._nfree += 1
        e.load -= 1
        self._free.update(e)
        if not e.load and self._pipe is not None:  # hwm="auto": it may steal work
            self._pipe.became_idle(e)
