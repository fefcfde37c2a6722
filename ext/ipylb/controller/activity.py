"""What the controller keeps for the dashboard and ``ipylb top``: recent finished tasks,
per-engine per-second counts, and the health each engine reports.

Bounded whatever the rate: the last :data:`RECENT_TASKS` finished tasks are kept one by
one (a bar each in the task stream), and every finished task is also counted in its
engine's one-second bucket for the last :data:`WINDOW_S` seconds, so a lane still shows
how busy an engine was when thousands of tasks a second push single tasks out of the
deque (the stream then draws those seconds as shaded blocks).  The cost on the result
path is one tuple and a deque append, plus a bucket update: no copies, no logging.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Any

# Finished tasks kept one by one (about 100 bytes each).
RECENT_TASKS = 4000
# Seconds of per-engine buckets kept (the task stream's span).
WINDOW_S = 60
# What ``activity`` answers at most per request (the rest comes at the next one).
ANSWER_TASKS = 2000


class Activity:
    """Recent finished tasks, per-engine buckets and engine health reports."""

    def __init__(self) -> None:
        # (seq, engine_id, started, completed, ok, key): key is the label, else the function
        self.recent: deque[tuple[int, int | None, float | None, float, bool, str]] = \
            deque(maxlen=RECENT_TASKS)
        self.seq = 0
        # engine_id -> [second, finished, failed, busy seconds] per second, newest last
        self.buckets: dict[int, deque[list[Any]]] = {}
        # the same summed over all engines, and each engine's busy seconds over its buckets
        # (kept as tasks finish: a monitor of 1,000 engines ranks and sums without a pass
        # over every bucket)
        self.totals: deque[list[Any]] = deque(maxlen=WINDOW_S + 1)
        self.work: dict[int, float] = {}
        # engine_id -> its last report: {"cpu": %, "rss": bytes, "task": msg_id or None,
        # "since": start time of that task (seconds since the epoch)}
        self.health: dict[int, dict[str, Any]] = {}

    def finished(self, engine_id: int | None, started: float | None, completed: float | None,
                 ok: bool, key: str) -> None:
        """A task's final outcome (times: seconds since the epoch, the engine's clock)."""
        if completed is None:
            return
        self.seq += 1
        self.recent.append((self.seq, engine_id, started, completed, ok, key))
        if engine_id is None:
            return
        b = self.buckets.get(engine_id)
        if b is None:
            b = self.buckets[engine_id] = deque(maxlen=WINDOW_S + 1)
        sec = int(completed)
        busy = completed - started if started is not None else 0.0
        self.work[engine_id] = self.work.get(engine_id, 0.0) + busy
        if b and b[-1][0] == sec:
            last = b[-1]
            last[1] += 1
            last[2] += not ok
            last[3] += busy
        else:
            if len(b) == WINDOW_S + 1:  # the oldest second leaves the window
                self.work[engine_id] -= b[0][3]
            b.append([sec, 1, int(not ok), busy])
        t = self.totals
        if not t or t[-1][0] < sec:
            t.append([sec, 1, int(not ok), busy])
            return
        i = len(t)  # this second, or one before it (results do not arrive in time order)
        while i and t[i - 1][0] > sec:
            i -= 1
        if i and t[i - 1][0] == sec:
            last = t[i - 1]
            last[1] += 1
            last[2] += not ok
            last[3] += busy
        elif i or len(t) < t.maxlen:  # a second none had yet: in its place (oldest out)
            if len(t) == t.maxlen:
                t.popleft()
                i -= 1
            t.insert(i, [sec, 1, int(not ok), busy])

    def forget(self, engine_id: int) -> None:
        """An engine is gone: its health report goes (its buckets stay for the window)."""
        self.health.pop(engine_id, None)

    def prune(self, now: float) -> None:
        """Drop the seconds older than the window, from every engine's buckets and from the
        totals alike (so the totals stay the sum of the buckets: both kept up to WINDOW_S + 1
        seconds *with finishes*, an idle spell would leave older ones in one and not the
        other), and the engines left with none (gone ones: engine ids are never reused, so
        this bounds the dict)."""
        cut = now - WINDOW_S
        for e in [e for e, b in self.buckets.items() if not b or b[0][0] < cut]:
            b = self.buckets[e]
            while b and b[0][0] < cut:
                self.work[e] -= b.popleft()[3]
            if not b:
                del self.buckets[e]
                self.work.pop(e, None)
        t = self.totals
        while t and t[0][0] < cut:
            t.popleft()

    def since(self, seq: int) -> tuple[int, list[tuple], bool]:
        """Tasks finished after ``seq`` (at most :data:`ANSWER_TASKS`, the newest), the
        newest seq, and whether some were skipped (the caller then relies on buckets)."""
        recent = self.recent
        new = self.seq - seq
        if new <= 0:
            return self.seq, [], False
        n = min(new, len(recent), ANSWER_TASKS)
        tasks = [t[1:] for t in islice(reversed(recent), n)][::-1]
        return self.seq, tasks, n < new
