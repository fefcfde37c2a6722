"""What a task can do to its engine's process that would end the engine or hit later tasks,
and how the engine answers it (README "What a task can break").

- It stops the engine's event loop (``asyncio.get_event_loop().stop()``, the kernel's
  ``io_loop.stop()``), or asks the kernel to exit (``exit()``, ``quit()``,
  ``get_ipython().exit_now = True``): the engine undoes it after the task, the task fails
  with an error that says what it did, and the engine serves on.  A stop that comes later
  (scheduled with ``call_soon``, or from a thread) starts the loop again (``EngineApp``).
- It calls ``os._exit(n)`` on the engine's main thread: the call raises :class:`ExitCalled`
  in the task instead; the task fails with an error that says so, and then the engine asks
  the controller to restart it (wire ``LEAVING``), as the task meant its process to end.
  (Forked children and other threads exit for real.)
- It forks (``os.fork()``) and the child returns from the task instead of calling
  ``os._exit``: that child would go on as a second copy of the engine, sharing its sockets
  and output pipes.  It exits instead when its task function ends (status 0, or as Python
  would for ``sys.exit(n)`` or an exception).
- It leaks file descriptors up to ``RLIMIT_NOFILE``: every later task that opens anything
  would fail with ``EMFILE``.  The engine checks after a task (:class:`FdWatch`: only once
  the tasks since the last check ran long enough to have opened what was left, so a no-op
  task pays a subtraction), once a second (its health thread), and at once after a task
  fails with ``EMFILE``; with at most :data:`FD_RESERVE` left the task fails saying so,
  and the engine asks to be restarted and runs no more tasks (they go to other engines).
- It closes the engine's own descriptors (``os.closerange(3, 4096)``): zmq aborts the
  process.  ``os.closerange`` in a task keeps the engine's (:func:`install_closerange_guard`);
  the task fails saying so and the engine is restarted.
- It changes the engine's resource limits (``resource.setrlimit``, ``resource.prlimit``):
  a lowered ``RLIMIT_CPU`` would kill the engine with SIGXCPU in a later task.  The limits
  are put back after the task (:func:`install_rlimit_guard`), like an alarm it left; a
  hard limit lowered below what the engine had cannot be, and the engine is restarted.

- It leaves a thread that holds the GIL in C code: the engine's Python stops while its
  heartbeat (a C thread) still answers, and the tasks sent to it would wait for good.  While
  the engine is idle, a C watchdog (:class:`IdleWatchdog`) is armed; if no task starts and
  no Python runs for :data:`FROZEN_S`, it writes every thread's traceback to a file the
  controller reads and ends the engine: its tasks never started, so they run elsewhere.

The hot path pays four attribute reads and a subtraction per task (:meth:`TaskChannel._attempt`).
"""

from __future__ import annotations

import errno
import faulthandler
import math
import os
import resource
import threading
import time
from typing import Any

# An engine with fewer file descriptors than this left (of its RLIMIT_NOFILE) is restarted.
FD_RESERVE = 64
# The least time (seconds) a task takes to open one file descriptor (a tight loop of dup()
# in C): tasks that ran less than (descriptors left - reserve) times this since the last
# check cannot have used them up, so the check after a task is skipped until then.
FD_OPEN_S = 1e-7

LOOP_STOPPED = (
    "the task stopped the engine's event loop (loop.stop() on the running asyncio loop, or "
    "the kernel's io_loop): that ends the engine. ipylb undid it and the engine serves on; a "
    "task runs inside that loop: do not stop or close it (run asyncio code with asyncio.run() "
    "in a thread of its own)"
)
EXIT_ASKED = (
    "the task asked the engine's kernel to exit (exit(), quit(), get_ipython().ask_exit() or "
    "exit_now = True): an engine does not exit for a task. ipylb ignored it and the engine "
    "serves on; return from the task instead"
)


# The fault of a forked child whose task function returned (set in the child only).
FORKED = "a child the task forked returned from the task"


def install_fork_guard(channel: Any) -> None:
    """Mark a child forked by a task (``os.register_at_fork``): when its task function ends,
    the child exits instead of serving as a second engine (:meth:`TaskChannel._undo_fault`)."""
    os.register_at_fork(after_in_child=lambda: setattr(channel, "fault", FORKED))


def child_status(e: BaseException | None) -> int:
    """The exit status of a forked child whose task function ended with ``e`` (None: it
    returned), as Python's own: ``sys.exit(n)``'s n, 1 for an exception."""
    if e is None:
        return 0
    if isinstance(e, SystemExit):
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 1


class ExitCalled(BaseException):
    """Raised in a task in place of ``os._exit``: the engine answers the task first, then
    has itself restarted.  A BaseException, so ``except Exception`` in the task lets it pass."""


def exit_called(status: Any) -> str:
    """The task's error after it called ``os._exit(status)``."""
    return (f"the task called os._exit({status!r}), which ends the engine's process: ipylb "
            "answered the task with this error and restarts the engine (a new engine id: "
            "what tasks stored on it is gone). Return or raise from the task instead; call "
            "os._exit only in a child process")


def install_exit_guard(channel: Any) -> None:
    """Replace ``os._exit`` in this process: on the main thread of this process while a task
    runs, it records the call in ``channel.fault`` and raises :class:`ExitCalled`; anywhere
    else (a forked child, another thread, between tasks) it exits as always."""
    real = os._exit
    pid = os.getpid()
    main = threading.main_thread().ident

    def _exit(status: int) -> None:
        if channel.running is not None and threading.get_ident() == main and os.getpid() == pid:
            channel.fault = exit_called(status)
            channel.leave_after(channel.fault)
            raise ExitCalled(channel.fault)
        real(status)

    _exit.__doc__, _exit.__name__, _exit.__qualname__ = real.__doc__, "_exit", "_exit"
    os._exit = _exit  # type: ignore[assignment]


def out_of_fds(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from or while handling (a library that
    wraps OSError), is EMFILE: the engine then checks its descriptors at once."""
    for _ in range(8):
        if isinstance(e, OSError) and e.errno == errno.EMFILE:
            return True
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            return False
        e = nxt
    return False


def _fds_message(used: int, soft: int) -> str:
    return (f"the engine ran out of file descriptors (at least {used} of the {soft} its "
            "RLIMIT_NOFILE allows are open): a task keeps files, sockets or pipes open (open "
            "them in a `with` block, or close them); the engine is restarted to get them back")


def fds_exhausted() -> str | None:
    """None if this process can open files, else why it is to be restarted.  Two system
    calls: the lowest free descriptor tells how many are open below it."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EMFILE:
            return None
        used = soft
    else:
        os.close(fd)
        if fd < soft - min(FD_RESERVE, soft // 8):
            return None
        used = fd
    return _fds_message(used, soft)


ENGINE_FDS_CLOSED = (
    "the task closed file descriptors of the engine's own (its sockets to the controller, "
    "its output pipes): zmq aborts a process whose sockets are closed under it. The engine is "
    "restarted; close only the descriptors the task opened")


class FdWatch:
    """Checks, after tasks, that the engine has file descriptors left, at a cost a task
    that opens none does not notice: :attr:`budget` is the task time (seconds) that may
    pass before the next check, the time the tasks would need to open the descriptors
    left (:data:`FD_OPEN_S` each).  A check is one ``dup`` and one ``close``; its limit is
    the ``RLIMIT_NOFILE`` the engine started with (tasks' changes are undone: see
    :func:`install_rlimit_guard`)."""

    def __init__(self) -> None:
        self.soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # duplicated to probe
        self.budget = 0.0  # the first task checks

    def check(self) -> str | None:
        """None if descriptors are left (and a new budget is set), else why the engine is
        to be restarted."""
        soft = self.soft
        if soft == resource.RLIM_INFINITY:
            self.budget = math.inf
            return None
        try:
            fd = _dup(self.fd)
        except OSError as e:
            return _fds_message(soft, soft) if e.errno == errno.EMFILE else ENGINE_FDS_CLOSED
        _close(fd)
        left = soft - min(FD_RESERVE, soft // 8) - fd
        if left <= 0:
            return _fds_message(fd, soft)
        self.budget = left * FD_OPEN_S
        return None


_dup, _close, _closerange = os.dup, os.close, os.closerange


def own_fds() -> frozenset[int]:
    """The file descriptors open in this process now (empty where /proc is missing)."""
    try:
        return frozenset(int(n) for n in os.listdir("/proc/self/fd"))
    except OSError:
        return frozenset()


def closed_engine_fds(lo: int, hi: int, kept: int) -> str:
    """The task's error after ``os.closerange(lo, hi)`` reached the engine's descriptors."""
    return (f"the task called os.closerange({lo}, {hi}), which closes the engine's own file "
            f"descriptors too (its sockets to the controller and its output pipes: {kept} of "
            "them in that range) and kills it (zmq aborts): ipylb closed the others and kept "
            "those, answered the task with this error and restarts the engine. Close only the "
            "descriptors the task opened (or call closerange in a child process)")


def install_closerange_guard(channel: Any) -> None:
    """Replace ``os.closerange``: on the main thread of this process while a task runs, it
    keeps the engine's own descriptors (``channel.engine_fds``, taken as it registered) and,
    if the range held any, fails the task (``channel.fault``) and has the engine restarted.
    Anywhere else (a forked child, between tasks) it closes the range as always."""
    pid = os.getpid()
    main = threading.main_thread().ident

    def closerange(fd_low: int, fd_high: int, /) -> None:
        keep = channel.engine_fds
        if channel.running is None or threading.get_ident() != main or os.getpid() != pid \
                or not keep:
            return _closerange(fd_low, fd_high)
        kept = sorted(fd for fd in keep if fd_low <= fd < fd_high)
        start = fd_low
        for fd in kept:
            _closerange(start, fd)
            start = fd + 1
        _closerange(start, fd_high)
        if kept:
            channel.fault = closed_engine_fds(fd_low, fd_high, len(kept))
            channel.leave_after(channel.fault)
        return None

    closerange.__doc__ = _closerange.__doc__
    os.closerange = closerange  # type: ignore[assignment]


def rlimit_changed(what: str) -> str:
    """Why the engine is restarted after a task lowered a hard limit of its (``what``)."""
    return (f"the task lowered the engine's hard {what}, which only a restart undoes (a "
            "process may lower its hard limits but not raise them): the engine is restarted. "
            "Set limits in a child process (subprocess, preexec_fn), or lower only the soft "
            "limit: the engine puts soft limits back after each task")


class LimitsGuard:
    """The engine's resource limits as it started, put back after a task changed them."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[int, int]] = {}  # changed by the running task: as before
        self.changed = False

    def note(self, which: int) -> None:
        """A task is about to change limit ``which``: remember what it was."""
        if which not in self.saved:
            self.saved[which] = _getrlimit(which)
        self.changed = True

    def restore(self) -> str | None:
        """Put the limits the task changed back; None, or why the engine must restart."""
        saved, self.saved, self.changed = self.saved, {}, False
        failed = []
        for which, limits in saved.items():
            try:
                if _getrlimit(which) != limits:
                    _setrlimit(which, limits)
            except (OSError, ValueError):
                failed.append(_RLIMIT_NAMES.get(which, f"resource limit {which}"))
        return rlimit_changed(" and ".join(failed)) if failed else None


_getrlimit, _setrlimit, _prlimit = resource.getrlimit, resource.setrlimit, \
    getattr(resource, "prlimit", None)
_RLIMIT_NAMES: dict[int, str] = {}
for _name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_")):
    _RLIMIT_NAMES.setdefault(getattr(resource, _name), _name)  # NOFILE, not its alias OFILE


def install_rlimit_guard(channel: Any, limits: LimitsGuard) -> None:
    """Replace ``resource.setrlimit`` and ``resource.prlimit`` (of this process): while a
    task runs on the main thread of this process, ``limits`` remembers what a limit was
    before the task changed it, and the engine puts it back after the task."""
    pid = os.getpid()
    main = threading.main_thread().ident

    def mine(target: int = 0) -> bool:
        return channel.running is not None and threading.get_ident() == main \
            and os.getpid() == pid and target in (0, pid)

    def setrlimit(resource_: int, limits_: Any, /) -> None:
        if mine():
            limits.note(resource_)
        return _setrlimit(resource_, limits_)

    setrlimit.__doc__ = _setrlimit.__doc__
    resource.setrlimit = setrlimit  # type: ignore[assignment]
    if _prlimit is None:
        return

    def prlimit(pid_: int, resource_: int, *limits_: Any) -> Any:
        if limits_ and mine(pid_):
            limits.note(resource_)
        return _prlimit(pid_, resource_, *limits_)

    prlimit.__doc__ = _prlimit.__doc__
    resource.prlimit = prlimit  # type: ignore[assignment]


_monotonic = time.monotonic


def bind_loop_clocks(loop: Any, kernel: Any) -> None:
    """Give the engine's asyncio loops (``loop``, and those of the kernel's threads: control,
    IOPub) the ``time.monotonic`` of now as their clock: ``BaseEventLoop.time`` looks it up
    in the ``time`` module on every turn, so a task's ``time.monotonic = None`` ended the
    engine between tasks."""
    holders = (*threading.enumerate(), getattr(kernel, "iopub_thread", None))
    for one in (loop, *(getattr(getattr(h, "io_loop", None), "asyncio_loop", None)
                        for h in holders)):
        if one is not None:
            one.time = _monotonic


# An idle engine whose Python has not run for this long (seconds) is frozen (IdleWatchdog).
FROZEN_S = float(os.environ.get("IPYLB_FROZEN_S", "20"))


class IdleWatchdog:
    """faulthandler's watchdog (a C thread: it runs without the GIL), armed by the health
    thread each second while no task runs, cancelled by the main thread as a task starts.
    If it fires, no task started and no Python ran (not even the health thread's re-arming)
    for FROZEN_S: a thread holds the GIL in C code.  It writes every thread's traceback to
    :attr:`path` (mode 0600, named in the engine's registration: the controller reads it
    to tell this end from others) and exits the process."""

    def __init__(self, directory: str, ident: str) -> None:
        self.path = os.path.join(directory, f"ipylb-{ident}-frozen.txt")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.file = os.fdopen(fd, "w")

    def arm(self, channel: Any) -> None:
        """(Re-)arm it if no task runs (the health thread, each second), and say so in
        ``channel.watchdog_armed``: a task that starts cancels it if that is set (the
        channel sets ``running`` first, this checks it last, so one of the two cancels)."""
        if channel.running is None:
            faulthandler.dump_traceback_later(FROZEN_S, exit=True, file=self.file)
            channel.watchdog_armed = True
            if channel.running is not None:  # one started meanwhile (and may not have seen it)
                faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        """Remove the file (the engine ends on purpose)."""
        try:
            os.remove(self.path)
        except OSError:
            pass
