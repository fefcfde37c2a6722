"""The scheduler's records: one per task (:class:`Task`, its rare parts in :class:`Extra`)
and one per engine (:class:`Engine`), the task states, and the small helpers the
scheduler's parts share (orderings, message fragments).

Records are plain slotted objects owned by :class:`ipylb.core.scheduler.Scheduler`;
nothing here changes state by itself.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .deps import Tally

__all__ = ["WAITING", "READY", "ASSIGNED", "DONE", "FAILED", "Engine", "Extra", "Rare", "Task"]

WAITING = "waiting"
READY = "ready"
ASSIGNED = "assigned"
DONE = "done"
FAILED = "failed"

BIG = 1 << 62  # "no limit" for hwm=0, an int so comparisons stay int/int
CHAIN = 6  # cascade explanations quote at most this many levels, then the root
SHOW = 5  # messages list at most this many ids


class Engine:
    """One registered engine: its FIFO of outstanding tasks and its private queue."""

    __slots__ = ("id", "alive", "load", "completed", "queue", "heap", "followers",
                 "key", "pos", "held")

    def __init__(self, engine_id: int) -> None:
        self.id = engine_id
        self.alive = True
        self.load = 0  # outstanding tasks == len(queue)
        self.completed = 0  # TaskDone results received from it
        self.queue: deque[Task] = deque()  # assigned tasks; [0] is running
        self.heap: list[tuple[int, int, Task]] = []  # (seq, gen, task) restricted to here
        self.followers: set[Task] = set()  # unfinished tasks whose follow deps ran here
        self.key = 0  # LRU key: lower = assigned longer ago (see .free)
        self.pos = -1  # owned by the FreeEngines index
        # hwm="auto": its running task has run long, it takes no task until that one ends
        self.held = False

    def __repr__(self) -> str:
        return f"<engine {self.id} load={self.load}{'' if self.alive else ' dead'}>"


class Rare:
    """The parts of :class:`Extra` that only refusals, failures, timeouts, walltimes and
    aborts need; created on the first write of a non-default value (see :class:`Extra`)."""

    __slots__ = (
        "refused",  # engines that refused it (hard)
        "unmet",  # what the last engine to refuse it said
        "failed_on",  # engines it failed or died on (soft)
        "timeout",
        "submitted",  # when it was submitted (kept only with a timeout)
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
        self.refused: set[Engine] | None = None
        self.unmet = ""
        self.failed_on: set[Engine] | None = None
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


_RARE_DEFAULTS = Rare()


def _rare_field(name: str) -> property:
    """An :class:`Extra` attribute kept in its :class:`Rare` part: reads give the default
    while there is none; writing the default creates none."""
    default = getattr(_RARE_DEFAULTS, name)
    slot = getattr(Rare, name)  # the slot descriptor: faster than getattr by name

    def get(x: Extra) -> Any:
        r = x.rare
        return default if r is None else slot.__get__(r)

    def put(x: Extra, value: Any) -> None:
        r = x.rare
        if r is None:
            if value is default or (value == default and type(value) is type(default)):
                return
            r = x.rare = Rare()
        slot.__set__(r, value)

    return property(get, put, doc=f"``{name}`` of the task's :class:`Rare` part")


class Extra:
    """The rarely needed part of a task record: dependencies and placement constraints in
    its own slots, the rarer failure / refusal / timeout / walltime / abort fields in a
    :class:`Rare` made on first use (read and written as attributes of the Extra).  A
    dependent task, half of a DAG's tasks, so keeps 80 bytes here instead of 184: at a
    million queued tasks, fewer pages to fault in and fewer cache lines per event
    (issue 14 item 5)."""

    __slots__ = (
        "after",  # Tally | None
        "follow",  # Tally | None (good = counted and ran on an engine)
        "f_engine",  # follow all=True: the engine every counted dep ran on
        "f_engines",  # follow all=False: engines where counted deps ran
        "targets",  # frozenset of engine ids it may run on, or None (any)
        "rare",  # Rare | None
        "deadline",  # when it times out unless started (None: no timeout)
        "gen",  # bumped on each constrained queueing; engine heap entries of older gens are stale
    )

    def __init__(self) -> None:
        self.after: Tally | None = None
        self.follow: Tally | None = None
        self.f_engine: Engine | None = None
        self.f_engines: set[Engine] | None = None
        self.targets: frozenset[int] | None = None
        self.rare: Rare | None = None
        self.deadline: float | None = None
        self.gen = 0


for _name in Rare.__slots__:
    setattr(Extra, _name, _rare_field(_name))
del _name


class Task:
    """One task: its state and where it is, plus rare details in ``x``."""

    # 8 slots: 96 bytes with the GC header (a 9th would make it 112: pymalloc's 16-byte classes)
    __slots__ = ("id", "seq", "state", "engine", "retries", "ok", "dependents", "x")

    def __init__(self, task_id: str, seq: int, retries: int) -> None:
        self.id = task_id
        self.seq = seq  # submission order: lower runs first
        self.state = WAITING
        self.engine: Engine | None = None  # assigned to / ran on (None if failed by us)
        self.retries = retries if retries > 0 else 0  # attempts left after a failure
        self.ok = False  # when done: the engine reported success
        self.dependents: tuple[Task] | list[Task] | None = None  # (t,) while one, then a list
        self.x: Extra | None = None  # also holds its deadline, if it has a timeout

    def __repr__(self) -> str:
        return f"<task {self.id} {self.state}>"


def eids(engine_ids: Any) -> str:
    """Engine ids for messages: ``0, 2``."""
    return ", ".join(map(str, sorted(engine_ids)))


def show_ids(items: Any) -> str:
    """A short, stable rendering of some task ids for messages."""
    ids = sorted(items)
    if len(ids) > SHOW:
        return ", ".join(ids[:SHOW]) + f", ... ({len(ids)} in all)"
    return ", ".join(ids)


def said(x: Extra) -> str:
    """What the last engine to refuse a task said, for its failure message."""
    return f" (the last refusal: {x.unmet})" if x.unmet else ""


def extra(t: Task) -> Extra:
    x = t.x
    if x is None:
        x = t.x = Extra()
    return x


def by_key(e: Engine) -> int:
    """LRU order: the engine assigned longest ago first."""
    return e.key


def by_seq(t: Task) -> int:
    return t.seq


def unrestricted(x: Extra) -> bool:
    """No follow, targets, refusal or failed-on engine: any engine may take the task."""
    if x.follow is not None or x.targets is not None:
        return False
    r = x.rare
    return r is None or (not r.refused and not r.failed_on)


def plain_ready(t: Task) -> bool:
    """Ready and unrestricted: a valid entry of the global queue."""
    if t.state is not READY:
        return False
    x = t.x
    return x is None or unrestricted(x)
