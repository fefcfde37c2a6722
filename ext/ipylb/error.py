"""Exceptions users see: errors raised by task code and errors the scheduler decides."""

from __future__ import annotations

from typing import Any

PURE_REFUSES = (
    "the 'pure' scheme runs tasks without dependencies, retries, timeouts or walltimes; "
    "start the cluster with another scheme (e.g. scheme='leastload') to use them"
)

# The exit status of an engine that could not report a task's outcome even as an error (a task
# broke what the engine itself uses, e.g. ``pickle.dumps = None``): it exits rather than leave
# the task unanswered, so the controller answers it (EngineError or a retry) and restarts it.
UNREPORTABLE_EXIT = 70  # os.EX_SOFTWARE


def safe_str(obj: Any, limit: int = 0) -> str:
    """``str(obj)``, or a fallback that says why not (``str`` raised, or returned no str):
    what reports an error must not fail itself.  ``limit`` > 0 cuts a longer text to that
    many characters, with a note of how many were cut."""
    try:
        text = str(obj)
        if type(text) is not str:
            text = str.__str__(text)
    except BaseException as e:  # a __str__ may raise anything, SystemExit included
        try:
            kind = type(e).__name__
        except BaseException:
            kind = "an exception"
        text = f"<str() failed: {kind}>"
    if 0 < limit < len(text):
        text = f"{text[:limit]}... [{len(text) - limit} more characters cut by ipylb]"
    return text


class IpylbError(Exception):
    """Base class of ipylb's own errors."""


class SerializationError(IpylbError, TypeError):
    """A function, argument or result could not be pickled or unpickled."""


class NoCluster(IpylbError, OSError):
    """No running cluster could be reached."""


class WireError(IpylbError, ValueError):
    """A message (or a payload it points to) that failed authentication or could not be read."""


class UnreadableMessage(WireError):
    """A message signed under the cluster key whose head does not decode: the sender has a
    bug, or the receiver's own unpickling is broken (an engine whose task patched pickle)."""


class RemoteError(IpylbError):
    """An exception raised by task code on an engine (or decided by the scheduler).

    ``ename``/``evalue`` name the original exception; ``traceback`` is the remote
    traceback as text; ``engine_info`` says where it happened (``engine_id``...).
    """

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: str = "",
        engine_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(ename, evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.engine_info = engine_info or {}

    def __str__(self) -> str:
        where = self.engine_info.get("engine_id")
        on = f" (on engine {where})" if where is not None else ""
        # A traceback prints the class name before str(): do not say it twice.
        if self.ename == type(self).__name__:
            return f"{self.evalue}{on}"
        return f"{self.ename}: {self.evalue}{on}"

    def render_traceback(self) -> list[str]:
        """IPython calls this to show the remote traceback instead of a local one."""
        where = self.engine_info.get("engine_id")
        head = f"{self.ename}: {self.evalue}"
        return [head if where is None else f"[engine {where}] {head}",
                *(self.traceback.splitlines() or [])]

    _render_traceback_ = render_traceback  # the name IPython's shell looks for

    def __reduce__(self) -> Any:
        return type(self), (self.ename, self.evalue, self.traceback, self.engine_info)


class CompositeError(RemoteError):
    """Several remote errors at once, e.g. from the failed items of a map.

    ``elist`` holds ``(ename, evalue, traceback, engine_info)`` for each.
    """

    def __init__(self, message: str, elist: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        first = elist[0] if elist else ("CompositeError", message, "", {})
        super().__init__(first[0], first[1], first[2], first[3])
        self.message = message
        self.elist = elist

    def __str__(self) -> str:
        lines = [self.message]
        for i, (ename, evalue, _tb, info) in enumerate(self.elist):
            where = info.get("engine_id")
            lines.append(f"  [{i}] {ename}: {evalue}" + ("" if where is None else f" (engine {where})"))
        return "\n".join(lines)

    def raise_exception(self, excid: int = 0) -> None:
        """Re-raise the ``excid``-th error as a RemoteError."""
        raise RemoteError(*self.elist[excid])

    def __reduce__(self) -> Any:
        return type(self), (self.message, self.elist)


class _SchedulerError(RemoteError):
    """Failures the scheduler decides; ``ename`` is the class name."""

    def __init__(self, evalue: str = "", traceback: str = "", engine_info: dict | None = None):
        super().__init__(type(self).__name__, evalue, traceback, engine_info)

    def __reduce__(self) -> Any:
        return type(self), (self.evalue, self.traceback, self.engine_info)


class ImpossibleDependency(_SchedulerError):
    """A task's dependencies can never be met."""


class InvalidDependency(ImpossibleDependency):
    """A task depends on msg_ids the cluster does not know."""


class DependencyTimeout(_SchedulerError):
    """A task waited longer than its ``timeout`` to be assigned."""


# ipyparallel's name for the same error (code written for ipyparallel catches TaskTimeout).
TaskTimeout = DependencyTimeout


class TaskAborted(_SchedulerError):
    """A task was aborted before it started."""


class EngineError(_SchedulerError):
    """The engine running a task died."""


class WalltimeExceeded(_SchedulerError):
    """A task ran longer than its ``walltime``: it was interrupted (KeyboardInterrupt), or
    its engine was restarted when it did not stop within the grace period.  The message
    says the limit, how long it ran, and which (API.md; ipylb's own)."""


class ClientClosed(_SchedulerError, RuntimeError):
    """The client was closed (or its cluster shut down) before the task's result arrived;
    also raised by a closed client's methods (a RuntimeError too)."""


class DeserializationError(_SchedulerError, SerializationError):
    """A task's function or arguments could not be unpickled on its engine (a module the
    engine cannot import, most often): the task did not run.  The message names what
    failed, why, and the two ways out.  A RemoteError (``ename``, ``engine_info``) and a
    SerializationError."""


class VersionMismatch(IpylbError, RuntimeError):
    """A client or engine runs other versions of Python, ipylb or cloudpickle than the
    cluster's controller; it was refused before anything was sent.  Pickled functions
    carry bytecode, which another Python version may run wrongly or crash on."""


class ControllerGone(_SchedulerError, NoCluster):
    """The cluster's controller stopped or died while this client waited on it.

    Pending results fail with it (its message says what survives: with ``--db sqlite`` the
    results of tasks that finished, fetchable with ``get_result`` once the cluster runs
    again), and new submissions and requests raise it at once.  Also a ``NoCluster``.
    ``shut_down`` is True when the controller said it was stopping (``ipylb cluster stop``,
    ``rc.shutdown()``), False when it vanished."""

    shut_down = False


class UnmetDependency(IpylbError):
    """Raised by task code: "not on this engine", so the scheduler tries another."""


SCHEDULER_ERRORS: dict[str, type[_SchedulerError]] = {
    c.__name__: c
    for c in (ImpossibleDependency, InvalidDependency, DependencyTimeout, TaskAborted, EngineError,
              WalltimeExceeded, ClientClosed, ControllerGone, DeserializationError)
}
