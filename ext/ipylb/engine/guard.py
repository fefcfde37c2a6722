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
  would fail with ``EMFILE``.  The engine checks once a second (its health thread), and at
  once after a task fails with ``EMFILE``; with at most :data:`FD_RESERVE` left it answers
  its task, asks to be restarted and runs no more tasks (they go to other engines).

The hot path pays two attribute reads per task (:meth:`TaskChannel._attempt`).
"""

from __future__ import annotations

import errno
import os
import resource
import threading
from typing import Any

# An engine with fewer file descriptors than this left (of its RLIMIT_NOFILE) is restarted.
FD_RESERVE = 64

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
    return (f"the engine ran out of file descriptors (at least {used} of the {soft} its "
            "RLIMIT_NOFILE allows are open): a task keeps files, sockets or pipes open (open "
            "them in a `with` block, or close them); the engine is restarted to get them back")
