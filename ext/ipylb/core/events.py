"""Events the scheduler core accepts and commands it returns.

The core is sans-I/O: the controller shell turns socket traffic and timers into
these events, feeds them to :meth:`ipylb.core.scheduler.Scheduler.handle`, and
carries out the commands that come back.  Every event carries the time it
happened (seconds on a monotonic clock chosen by the shell); the core never
reads a clock itself.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class DepSpec:
    """A graph dependency as the core sees it: msg_ids plus the three switches.

    ``all``: met when all (True) or any (False) of ``ids`` are done.
    ``success`` / ``failure``: which outcomes of a dependency count as done.
    """

    ids: frozenset[str]
    all: bool = True
    success: bool = True
    failure: bool = False


# Names of the scheduler-decided errors (classes in ipylb.error).
IMPOSSIBLE = "ImpossibleDependency"
INVALID = "InvalidDependency"
TIMEOUT = "DependencyTimeout"
ABORTED = "TaskAborted"
ENGINE_ERROR = "EngineError"
WALLTIME = "WalltimeExceeded"

# ---------------------------------------------------------------------------
# Events (stimuli)


@dataclass(frozen=True, slots=True)
class EngineAdded:
    """An engine registered and can take tasks."""

    engine_id: int
    time: float


@dataclass(frozen=True, slots=True)
class EngineRemoved:
    """An engine died or left; ``reason`` is a human sentence (exit code, signal...).
    ``idle``: it left between tasks (it answered every task it started, and started none of
    the rest), so no task of its queue was running: all are queued again."""

    engine_id: int
    reason: str
    time: float
    idle: bool = False


@dataclass(frozen=True, slots=True)
class TaskSubmitted:
    """A client submitted a task.

    ``after``: when it may run; ``follow``: where (engines that ran those tasks).
    ``timeout``: seconds it may wait to be assigned (None or 0: forever).
    ``retries``: further attempts after a failure or an engine death.
    ``walltime``: seconds each attempt may run, counted from its TaskStarted (None or 0: no
    limit); see :mod:`ipylb.core.deadlines`.
    ``targets``: the engine ids it may run on (None: any); it is impossible once none
    of them is registered (engine ids are never reused), as in ipyparallel.
    """

    task_id: str
    time: float
    after: DepSpec | None = None
    follow: DepSpec | None = None
    timeout: float | None = None
    retries: int = 0
    walltime: float | None = None
    targets: frozenset[int] | None = None


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """An engine reported that it started running a task (only tasks with a walltime
    report this).  ``time`` is when the controller heard it, on its own clock."""

    task_id: str
    engine_id: int
    time: float


@dataclass(frozen=True, slots=True)
class TaskDone:
    """An engine finished a task: ``success`` False means the task raised.

    ``ran``: seconds the task ran on its engine, by the engine's own clock (None: not
    known); ``hwm="auto"`` measures with it (:mod:`ipylb.core.pipeline`).
    ``skipped``: the engine did not run the task at all: a :class:`Cancel` reached it
    before it started (its answer is the aborted error), or the shell could not send it
    (``success`` False either way).  Such a task ran nowhere: it is not counted as
    completed on that engine, nor measured, nor can it be followed."""

    task_id: str
    engine_id: int
    success: bool
    time: float
    ran: float | None = None
    skipped: bool = False


@dataclass(frozen=True, slots=True)
class TaskUnmet:
    """An engine refused a task: a functional dependency was unmet there (``reason``:
    what the engine said)."""

    task_id: str
    engine_id: int
    time: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AbortRequested:
    """A client asked that a task not run."""

    task_id: str
    time: float


@dataclass(frozen=True, slots=True)
class StealAnswered:
    """An engine's answer to a :class:`Steal` of ``task_id``: ``cancelled`` True means it had
    not started the task and never will (the core then places it elsewhere); False means it
    had already started it (its result comes as usual)."""

    task_id: str
    engine_id: int
    cancelled: bool
    time: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: deadlines up to ``time`` expire."""

    time: float


@dataclass(frozen=True, slots=True)
class TaskForgotten:
    """The record of a finished task was purged; it is unknown from now on."""

    task_id: str
    time: float


Event = (
    EngineAdded
    | EngineRemoved
    | TaskSubmitted
    | TaskStarted
    | TaskDone
    | TaskUnmet
    | AbortRequested
    | StealAnswered
    | Tick
    | TaskForgotten
)

# ---------------------------------------------------------------------------
# Commands (decisions)


@dataclass(frozen=True, slots=True)
class Assign:
    """Send task ``task_id`` to engine ``engine_id`` now."""

    task_id: str
    engine_id: int


@dataclass(frozen=True, slots=True)
class Deliver:
    """The engine's result for ``task_id`` is final: pass it to its client."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Fail:
    """The scheduler fails ``task_id`` itself with error class ``error`` (see names above).

    ``message`` says which task and why (root cause, rule, chain for cascades).
    ``engine_id`` is the engine involved, if any.
    """

    task_id: str
    error: str
    message: str
    engine_id: int | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    """Tell ``engine_id`` to skip ``task_id``, queued there but not started.

    The engine answers with an aborted result, which comes back as TaskDone(success=False,
    skipped=True) and is delivered; if the task had started, its own result comes.
    """

    task_id: str
    engine_id: int


@dataclass(frozen=True, slots=True)
class Steal:
    """Ask ``engine_id`` to give back ``task_id``, queued there but maybe not started, for an
    idle engine (``hwm="auto"``, :mod:`ipylb.core.pipeline`).  The engine answers with
    StealAnswered; until then the task stays assigned to ``engine_id``."""

    task_id: str
    engine_id: int


@dataclass(frozen=True, slots=True)
class Interrupt:
    """Interrupt ``task_id``, running on ``engine_id``, the Jupyter way (KeyboardInterrupt in
    the task): its walltime expired.  Only that task: if the engine has moved on to another,
    nothing happens there."""

    task_id: str
    engine_id: int


@dataclass(frozen=True, slots=True)
class RestartEngine:
    """Restart the kernel of ``engine_id`` (its running task ignored an Interrupt for the grace
    period).  The core has already forgotten the engine: its tasks were failed, retried or
    re-queued; the restarted kernel registers as a new engine."""

    engine_id: int
    reason: str


Command = Assign | Deliver | Fail | Cancel | Steal | Interrupt | RestartEngine
