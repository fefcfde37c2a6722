"""The engine's task channel: receive a task, run it on the main thread, send the result.

One DEALER socket to the controller, read from the kernel's main-thread asyncio
loop (``add_reader`` on the socket's FD).  Tasks run like cells, on the main
thread, one at a time, in the order they arrive (the scheduler relies on that
order to know which of an engine's tasks is running).  While a task runs, SIGINT
raises KeyboardInterrupt in it, so ``interrupt_kernel`` stops it, ``time.sleep``
included.  Each task's output is what it wrote to fds 1 and 2 (:mod:`.capture`).  Whatever
a task does, it gets an answer: a failure while reporting it (an exception whose ``str``
fails, a result that does not pickle, ...) becomes the task's error.

Walltime interrupts are for one task only (:meth:`TaskChannel.interrupt`): a task with a
walltime reports its start (STARTED), and the controller's interrupt for it names it; if
that task has ended by the time the signal is handled, the signal is ignored, so it never
stops the task after it.

With ``hwm="auto"`` tasks come numbered, and the controller may ask for a queued one back
(:mod:`.steal`): a task given back is skipped unrun when its turn comes.

Parts in modules of their own: the health thread and live output (:mod:`.health`, mixed
into :class:`TaskChannel`), the globals a task's function runs with (:mod:`.namespace`),
and what a task's value or error becomes on the wire (:mod:`.report`).
"""

from __future__ import annotations

import _signal
import atexit
import faulthandler
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from time import time as _now
from typing import Any

import zmq

from .. import compat, connection, shm, wire
from ..error import UNREPORTABLE_EXIT, UnmetDependency, UnreadableMessage, safe_str
from . import guard, unpickle
from .capture import Capture
from .health import HealthReports
from .namespace import bind_interactive
from .report import EVALUE_LIMIT, describe, pickle_result, safe_name
from .steal import StealDesk

# Results finished back to back leave together (TaskChannel._hold): at most this many in
# one message, and a result with more output or error text than this (characters) goes at
# once.  A result waits only for a next task already here whose function last ran under
# SHORT_TASK_S seconds.
DONE_BATCH = 64
DONE_BATCH_BYTES = 64 << 10
SHORT_TASK_S = 0.001

# The engine pings the controller this often, and leaves after this long without an answer.
CONTROLLER_PING_S = 2.0
CONTROLLER_SILENCE_S = 20.0


_SIGINT_SET = (signal.SIGINT.value,)
# Bound now: what the engine's last resort uses, whatever a task patches later.
_monotonic, _exit, _sleep = time.monotonic, os._exit, time.sleep
_cancel_watchdog = faulthandler.cancel_dump_traceback_later
# An engine that asked to be restarted (LEAVING) because it cannot serve on waits this long
# (seconds) for it, then exits (the controller did not start it, or is gone).
LEAVING_WAIT_S = 30.0


def _set_sigint(handler: Any) -> Any:
    """signal.signal(SIGINT, ...) without the enum wrapping: it runs twice per task."""
    return _signal.signal(signal.SIGINT.value, handler)


# Of a task's output too large to send, the last this many characters of each stream are kept.
OUTPUT_KEPT_ON_OVERSIZE = 64 << 10


class TaskChannel(HealthReports):
    """Serves tasks for one engine kernel."""

    def __init__(self, kernel: Any, cluster: dict[str, Any], connection_file: str) -> None:
        self.kernel = kernel
        self.user_ns: dict[str, Any] = kernel.shell.user_ns
        ident = f"engine-{uuid.uuid4().hex[:12]}".encode()
        # On the controller's machine, large arguments and results come and go through shared memory.
        prefix = shm.shared_prefix(cluster)
        self.placer = shm.Placer(prefix) if prefix else None
        self.signer = wire.Signer(cluster["key"].encode(), ident, cluster["controller_id"].encode(),
                                  shm_prefix=prefix)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, ident)
        self.sock.setsockopt(zmq.LINGER, 0)
        # zmq pings the controller: a host that vanished (no tcp reset) counts as a disconnect.
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, int(CONTROLLER_PING_S * 1000))
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(CONTROLLER_SILENCE_S * 1000))
        connection.secure(self.sock, cluster)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(cluster["engine_url"])
        self.engine_url = cluster["engine_url"]
        # The largest frame the controller reads (0: no limit given).
        self.max_frame: int = cluster.get("max_frame_bytes") or 0
        self.connection_file = connection_file
        self.engine_id: int | None = None
        self.inbox: deque[tuple[int, Any, list[Any], bytes]] = deque()
        # hwm="auto": answers the controller's requests for queued tasks back (.steal).
        self.desk = StealDesk(cluster, ident, cluster["engine_url"])
        self.cancelled: set[str] = set()
        # The task running now, and the one a walltime interrupt is for (see interrupt()).
        self.running: str | None = None
        self.running_since = 0.0  # when it started (seconds since the epoch)
        self.interrupt_for: str | None = None
        self._cluster = cluster
        self._lock = threading.Lock()
        self._sigint = self._on_sigint
        # Task functions by key: [frames, what they unpickled to (None: not yet)].  The
        # controller sends each once and says when to drop one (it keeps the same list).
        self.functions: dict[bytes, list[Any]] = {}
        self.functions_received = 0  # how many were sent (a function is sent once per engine)
        # Seconds the last run of each function took, and results not sent yet (see _hold).
        self.last_run_s: dict[bytes, float] = {}
        self.held_done: list[tuple[tuple, list[Any]]] = []
        # The key of the last function run and the function as bound for running.
        self._fn_key: bytes = b""
        self._fn: Any = None
        self.capture = Capture()
        # What a task did to the engine (guard): a fault is the running task's error; an
        # engine leaving for a reason answers its task, then asks to be restarted.
        self.fault: str | None = None
        self.leaving_for: str | None = None
        self.left = False
        self._leaving_idle = True
        self.stopping = False  # the engine's loop is stopped on purpose (EngineApp)
        self._loop: Any = None
        # Descriptors left (checked after tasks), the resource limits a task changed (put
        # back after it), and the engine's own descriptors (os.closerange keeps them).
        self.fds = guard.FdWatch()
        self.limits = guard.LimitsGuard()
        self.engine_fds: frozenset[int] = frozenset()
        # Armed while no task runs: ends an engine whose Python a thread froze (guard).
        self.watchdog = guard.IdleWatchdog(os.path.dirname(connection_file) or
                                           tempfile.gettempdir(), ident.decode())
        self.watchdog_armed = False
        atexit.register(self.watchdog.close)

    def start(self, loop: Any) -> None:
        """Register with the controller and start serving from ``loop``."""
        meta = {
            "connection_file": self.connection_file,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            # Remote provisioners pass on only KERNEL_ID: the launcher makes it the tag too.
            "tag": os.environ.get("IPYLB_ENGINE_TAG") or os.environ.get("KERNEL_ID", ""),
            "heartbeat": self._heartbeat_url(),
            # The kernel's CurveZMQ public key (its Jupyter channels are encrypted: the
            # controller pings the heartbeat under it), or None.
            "heartbeat_key": _decoded(getattr(self.kernel.parent, "curve_publickey", None)),
            "shm_domain": shm.domain() if self.placer is not None else None,
            # Its segments' names: what it wrote and never sent is swept when it is gone.
            "shm_producer": self.placer.prefix if self.placer is not None else None,
            "versions": compat.versions(),
            "watchdog": self.watchdog.path,
        }
        wire.send(self.sock, self.signer.pack(wire.REGISTER, meta))
        self._loop = loop
        guard.install_exit_guard(self)
        guard.install_fork_guard(self)
        guard.install_closerange_guard(self)
        guard.install_rlimit_guard(self, self.limits)
        # asyncio's loops read time.monotonic on every turn: a task's time.monotonic = None
        # would end them (the kernel's control and IOPub threads run loops of their own).
        guard.bind_loop_clocks(loop, self.kernel)
        loop.add_reader(self.sock.FD, self._on_readable)
        loop.add_reader(self.monitor.FD, self._on_monitor)
        loop.call_soon(self._on_monitor)  # the FD is edge-triggered: arm it by reading EVENTS
        loop.call_soon(self._on_readable)
        threading.Thread(target=self._report_health, daemon=True, name="ipylb-health").start()

    def _on_monitor(self) -> None:
        """The connection to the controller dropped: it stopped or died, or its host is
        gone (no reconnection can bring back its tasks).  A registered engine leaves, so
        an ``ipylb engine join`` on another host ends with its controller."""
        while self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.monitor.recv_multipart()
            if self.engine_id is not None:
                self.capture.log(f"ipylb engine {self.engine_id}: the connection to the "
                                 f"controller at {self.engine_url} is gone; exiting")
                # Our files go with us: a killed controller (our launcher) closes its sockets
                # before the kernel reparents us, so the exit-time orphan check can still see it
                # as our parent; a living launcher's KernelManager tolerates files already gone.
                if self.connection_file:
                    connection.remove_kernel_files(self.connection_file)
                self._stop_loop()

    def _stop_loop(self) -> None:
        """Stop the engine's loop on purpose: the engine leaves."""
        self.stopping = True
        self.kernel.io_loop.add_callback(self.kernel.io_loop.stop)

    # -- a task left the engine unfit to serve (guard) ------------------------------------

    def leave_after(self, reason: str, idle: bool = True) -> None:
        """Answer the task running now, then ask the controller to restart this engine for
        ``reason`` (a task broke it); tasks that come meanwhile are refused (UnmetDependency:
        the controller places them elsewhere).  ``idle``: every task sent to this engine so
        far was answered (False: one was lost, the first of its queue fails with EngineError)."""
        if self.leaving_for is None:
            self.leaving_for = reason
            self._leaving_idle = idle
            self._run = self._refuse  # type: ignore[method-assign]
            self._loop.call_soon(self._send_leaving)  # after the running task's answer

    def _send_leaving(self) -> None:
        if not self.left:
            if self.held_done:  # the answers of tasks that ran go before it
                self._send_done(self.held_done)
            self.left = True
            self.capture.log(f"ipylb engine {self.engine_id}: {self.leaving_for}; asking the "
                             "controller to restart it")
            wire.send(self.sock, self.signer.pack(wire.LEAVING,
                                                  (self.leaving_for, self._leaving_idle)))

    def _refuse(self, meta: tuple, _bufs: list[Any], _bufs_mac: bytes) -> tuple[tuple, list[Any]]:
        self._send_leaving()  # first: the controller takes the task back, not as refused
        now = _now()
        error = ("UnmetDependency", f"engine {self.engine_id} is being restarted: "
                 f"{self.leaving_for}", "")
        return (meta[0], "unmet", now, now, "", "", error), []

    def _own_more_fds(self) -> None:
        self.engine_fds |= guard.own_fds()

    def _check_fds(self) -> None:
        """Between tasks: leave if the engine has run out of file descriptors."""
        why = guard.fds_exhausted()
        if why:
            self.leave_after(why)

    def _after_fault(self) -> None:
        """After a task that broke the engine (:meth:`_undo_fault`: raises the task's error)
        or changed its resource limits (put back; if a hard one cannot be, the engine is
        restarted and the task fails saying so)."""
        if self.limits.changed:
            why = self.limits.restore()
            if why:
                self.leave_after(why)
                self.fault = self.fault or why
        if self.fault is not None or self._loop._stopping:
            raise RuntimeError(self._undo_fault())

    def _undo_fault(self) -> str:
        """After a task that stopped the engine's loop, asked the kernel to exit or called
        ``os._exit``: undo what can be undone; the task's error."""
        fault, self.fault = self.fault, None
        if fault is guard.FORKED:  # we are that child: leave, flushing what it printed
            for s in (sys.stdout, sys.stderr, *self.capture.streams):
                try:
                    s.flush()
                except BaseException:  # noqa: B036 - nothing may keep the child here
                    pass
            _exit(guard.child_status(sys.exc_info()[1]))
        if self._loop._stopping:
            self._loop._stopping = False  # asyncio's flag, read after this callback returns
            fault = fault or guard.LOOP_STOPPED
        if fault == guard.EXIT_ASKED:
            self.kernel.shell.exit_now = False
        return fault or guard.LOOP_STOPPED

    def _heartbeat_url(self) -> str:
        """Where the kernel's standard heartbeat channel answers (the controller pings it)."""
        app = self.kernel.parent
        port = getattr(app, "hb_port", 0)
        if not port:
            return ""
        if app.transport == "ipc":
            return f"ipc://{app.ip}-{port}"
        return connection.connect_url(f"tcp://{app.ip}:{port}")

    # -- receiving ---------------------------------------------------------------

    def _drain(self) -> None:
        """Move every message waiting on the socket into the inbox (cancels act at once)."""
        while True:
            try:
                frames = wire.recv(self.sock)
            except zmq.Again:
                return
            try:
                kind, _sender, meta, bufs, bufs_mac = self.signer.unpack(frames)
            except wire.WireError as e:
                self.capture.log(f"ipylb engine: dropped a message: {e}")
                if isinstance(e, UnreadableMessage):  # signed by the controller: we cannot read
                    # A task broke what the engine reads with (pickle.loads = None): the task
                    # in that message would never be answered, nor any later one.  It never
                    # ran: it runs elsewhere (idle), as every task sent here after it.
                    self.leave_after(f"it could not read a message from the controller ({e}): "
                                     "a task broke what the engine reads with")
                continue
            if kind == wire.CANCEL:
                self.cancelled.add(meta)
            elif kind == wire.TASK or kind == wire.FUNCTION:  # in the order they came
                self.inbox.append((kind, meta, bufs, bufs_mac))
            elif kind == wire.TASKS:  # several at once: each under its own MAC
                try:
                    items = wire.unbatch(meta, bufs)
                except wire.WireError as e:
                    self.capture.log(f"ipylb engine: dropped a message: {e}")
                    continue
                self.inbox.extend((wire.TASK, *item) for item in items)
            elif kind == wire.REGISTERED:
                self.engine_id = meta
                if self._cluster.get("hwm") == "auto":  # else at its first numbered task
                    self.desk.start()
                # What the engine has open by now is its own (os.closerange in a task keeps
                # it); again a little later, once zmq has made what it makes as it connects.
                self.engine_fds = guard.own_fds()
                self._loop.call_later(1.0, self._own_more_fds)
                self.user_ns.setdefault("ipylb_engine_id", meta)
            elif kind == wire.STOP:
                self._stop_loop()
            elif kind == wire.REFUSED:  # the version handshake failed: say why, and stop
                self.capture.log(f"ipylb engine: the controller refused this engine: {meta}")
                self._stop_loop()

    def _on_readable(self) -> None:
        # The FD is edge-triggered: keep going until the socket has nothing left,
        # checking again after every send (a send can swallow the edge).
        held = self.held_done
        try:
            while True:
                self._drain()
                if not self.inbox:
                    if held:
                        self._send_done(held)
                    if not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        return
                    continue
                kind, meta, bufs, bufs_mac = self.inbox.popleft()
                if kind == wire.FUNCTION:
                    self._keep_function(meta, bufs, bufs_mac)
                    continue
                if len(meta) > 3 and not self.desk.take(meta[3], meta[0]):
                    self.cancelled.discard(meta[0])  # given back: it runs on another engine
                    continue
                if held and not self._hold(meta):
                    self._send_done(held)
                try:
                    done = self._run(meta, bufs, bufs_mac)
                except KeyboardInterrupt:
                    raise
                except BaseException as e:  # noqa: B036 - even the fallback report failed
                    self._unreportable(e)
                held.append(done)
                if len(held) >= DONE_BATCH or self._size(done) > DONE_BATCH_BYTES:
                    self._send_done(held)
        except KeyboardInterrupt:  # an interrupt that landed between tasks: nothing to stop
            self.kernel.io_loop.add_callback(self._on_readable)
        except Exception as e:  # receiving failed (a task broke what it uses: __import__ = None)
            # Escaping would leave the socket's edge consumed: no task answered again, while
            # the heartbeat says all is well.  What ran is reported first, then the engine
            # leaves: the task it could not take never ran, so it runs elsewhere.
            if held:
                self._send_done(held)
            self._unreportable(e, idle=True)
        finally:
            if held:  # (an interrupt between tasks: what is done is still reported)
                self._send_done(held)

    def _hold(self, meta: tuple) -> bool:
        """Whether results finished so far may wait for the task ``meta`` to end, to leave
        with its result in one message: only if it is short (its function's last run took
        under ``SHORT_TASK_S``) and has no walltime (its STARTED report must follow the
        results before it)."""
        return not (len(meta) > 2 and meta[2]) and self.last_run_s.get(meta[1], 1.0) < SHORT_TASK_S

    @staticmethod
    def _size(done: tuple[tuple, list[Any]]) -> int:
        """A result's output and error text, in characters (what its report's head carries)."""
        meta = done[0]
        error = meta[6]
        return len(meta[4]) + len(meta[5]) + (len(error[1]) + len(error[2]) if error else 0)

    def _send_done(self, held: list[tuple[tuple, list[Any]]]) -> None:
        """Send the results in ``held`` and empty it: one DONE, or one DONES message for
        several (wire.batch: signed once, each result under its own MAC)."""
        signer = self.signer
        try:
            if len(held) == 1:
                meta, result = held[0]
                frames = signer.pack(wire.DONE, meta, result)
            else:
                metas, bufs = wire.batch([(meta, result, signer.bufs_mac(result))
                                          for meta, result in held])
                frames = signer.pack(wire.DONES, metas, bufs, b"")
        except BaseException as e:  # noqa: B036 - a task broke what reporting uses (pickle)
            self._unreportable(e)
        held.clear()
        try:
            wire.send(self.sock, frames)
        except zmq.ZMQError:
            raise
        except BaseException as e:  # noqa: B036 - a task broke the socket (zmq.Socket.send = None)
            self._unreportable(e)

    def _unreportable(self, e: BaseException, idle: bool = False) -> None:
        """A task's outcome could not be sent even as an error (``idle`` False), or the next
        task could not be received (``idle``: it never ran): a task broke what the engine
        uses (``pickle.dumps = None``, a patched socket, ``builtins.__import__ = None``).
        Serving on would leave this task and every later one unanswered while the heartbeat
        says all is well, so the engine leaves (:meth:`leave_now`)."""
        try:
            what = "receive the next task" if idle else "report a task's outcome"
            why = (f"it could not {what} ({safe_name(e)}: {safe_str(e, 1000)}): a task broke "
                   "what the engine uses to (a module function or class it replaced, "
                   "such as builtins.__import__, pickle.dumps or zmq.Socket.send)")
        except BaseException:  # noqa: B036 - even formatting it fails: exit, as below
            _exit(UNREPORTABLE_EXIT)
        self.leave_now(why, idle)

    def leave_now(self, reason: str, idle: bool) -> None:
        """This engine cannot serve on (a task broke what it receives, reports or loops
        with): ask the controller to restart it (LEAVING, with ``idle``: no task sent here
        is left half run, so all of them run elsewhere, no retry used), then wait for that
        on this thread, taking nothing more.  If the LEAVING cannot be sent, or no restart
        comes within LEAVING_WAIT_S (an engine the controller did not start is told to stop,
        which this engine can no longer read), exit with UNREPORTABLE_EXIT: the controller
        then fails the first task sent here and not answered with EngineError, saying so."""
        try:
            self.capture.log(f"ipylb engine {self.engine_id}: {reason}; asking the controller "
                             "to restart it")
            if not self.left:
                self.leaving_for, self.left = reason, True
                wire.send(self.sock, self.signer.pack(wire.LEAVING, (reason, idle)))
        except BaseException:  # noqa: B036 - nothing may keep it here
            _exit(UNREPORTABLE_EXIT)
        deadline = _monotonic() + LEAVING_WAIT_S
        while _monotonic() < deadline:
            try:
                _sleep(0.1)
            except BaseException:  # noqa: B036 - an interrupt: wait on
                pass
        _exit(UNREPORTABLE_EXIT)

    # -- running -----------------------------------------------------------------

    def _keep_function(self, meta: tuple, bufs: list[Any], bufs_mac: bytes) -> None:
        """A task function sent once for the tasks that name it: check its frames now (a
        segment is mapped now, while it surely exists), unpickle it when first run."""
        key, drop = meta
        self.functions_received += 1
        for old in drop:
            self.functions.pop(old, None)
            self.last_run_s.pop(old, None)
        try:
            self.signer.check_bufs(bufs, bufs_mac)
        except wire.WireError as e:
            self.functions[key] = [None, e]
            return
        self.functions[key] = [bufs, None]

    def _function(self, key: bytes, msg_id: str) -> Any:
        if key != self._fn_key:
            held = self.functions.get(key)
            if held is None:
                raise RuntimeError(f"task {msg_id} names a function this engine was not sent "
                                   "(or was told to drop): an ipylb bug, please report it")
            if held[1] is None:
                held[1] = unpickle.function(held[0], msg_id)
            elif isinstance(held[1], wire.WireError):
                raise held[1]
            self._fn = bind_interactive(held[1], self.user_ns)
            self._fn_key = key
        return self._fn

    # -- interrupts ---------------------------------------------------------------

    def interrupt(self, msg_id: str) -> bool:
        """Interrupt task ``msg_id`` if it is the one running (KeyboardInterrupt in it);
        False if it is not.  Called from another thread (the kernel's control thread).

        The check and the signal happen under the lock a walltime task takes as it ends,
        and that end clears the target: so a target is never left behind to swallow a
        later interrupt, and a signal that lands after the task ended finds another task
        (or none) running and is ignored by :meth:`_on_sigint`."""
        with self._lock:
            if self.running != msg_id:
                return False
            self.interrupt_for = msg_id
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
        return True

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        """SIGINT while a task runs: KeyboardInterrupt, unless it is a walltime interrupt
        meant for a task that has already ended (then the task running now goes on)."""
        target, self.interrupt_for = self.interrupt_for, None
        running = self.running
        if running is None or (target is not None and target != running):
            return
        raise KeyboardInterrupt

    def _run(self, meta: tuple, bufs: list[Any], bufs_mac: bytes) -> tuple[tuple, list[Any]]:
        """Run one task; return its report: the meta and result frames of its DONE message,
        checked to fit the controller's frame limit (never raises)."""
        msg_id, fkey, walltime = meta[0], meta[1], len(meta) > 2 and bool(meta[2])
        started = _now()
        try:
            return self._attempt(msg_id, fkey, started, bufs, bufs_mac, walltime)
        except BaseException as e:  # reporting failed: the task still gets an answer
            why = (f"the engine could not report the outcome of task {msg_id}: {safe_name(e)}: "
                   f"{safe_str(e, EVALUE_LIMIT)}")
            # What the engine reports with is broken (a task patched os, or closed what it
            # needs): it would fail every later task the same way, so it is restarted.
            self.leave_after(why[:1000])
            error = (safe_name(e), f"{why}; the engine is restarted", "")
            return (msg_id, "error", started, _now(), "", "", error), []

    def _attempt(self, msg_id: str, fkey: bytes, started: float, bufs: list[Any],
                 bufs_mac: bytes, walltime: bool) -> tuple[tuple, list[Any]]:
        if msg_id in self.cancelled:
            self.cancelled.discard(msg_id)
            error = ("TaskAborted", f"task {msg_id} was aborted before it started", "")
            return self._done(msg_id, "aborted", started, ("", ""), error, [])
        result: list[Any] = []
        error = None
        saved = self.capture.begin()
        try:
            self.signer.check_bufs(bufs, bufs_mac)
            if walltime:  # its clock starts when the controller hears this
                wire.send(self.sock, self.signer.pack(wire.STARTED, msg_id))
            self.running_since = started
            self.running = msg_id  # before the watchdog check (guard.IdleWatchdog.arm)
            if self.watchdog_armed:  # the idle watchdog (guard.IdleWatchdog): not idle now
                self.watchdog_armed = False
                _cancel_watchdog()
            previous = _signal.getsignal(_SIGINT_SET[0])
            try:
                # Installed inside the try: a SIGINT pending as it is installed raises here,
                # and the finally puts the handler back.  Installed before the try, such a
                # SIGINT raised out of this frame and left the handler raising between
                # tasks: a later interrupt then broke reporting (the engine was restarted,
                # blaming a task) or dropped a result (never answered).
                _set_sigint(self._sigint)
                # Unpickling the function and arguments is part of the task, like making its
                # result: a slow or hanging __setstate__ meets the walltime and rc.interrupt().
                f = self._function(fkey, msg_id)
                args, kwargs = unpickle.arguments(bufs, msg_id)
                value = f(*args, **kwargs)
                # Making the result is part of the task: its walltime and rc.interrupt() reach
                # a slow __reduce__, and what that prints is the task's output.
                result = pickle_result(msg_id, value, f, args)
            finally:
                # First, before any call (where a pending signal's handler runs): a SIGINT
                # landing from here on finds no task running and is ignored, so nothing
                # raises out of this finally before the handler is put back.
                self.running = None
                if walltime:  # an interrupt() racing this end has signalled, or never will
                    with self._lock:
                        self.interrupt_for = None
                # A task that blocked SIGINT (pthread_sigmask) would leave every later task
                # deaf to interrupts, walltime ones included.  Unblocking delivers one that
                # is pending to our handler (running is None now: ignored) before it goes.
                _signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGINT_SET)
                # An alarm a task set (signal.alarm, setitimer) and did not cancel would
                # fire in a later task: kill its engine (SIGALRM's default) or raise there;
                # so would its CPU timers (SIGVTALRM, SIGPROF: their default ends the
                # process).  ~0.5 us each.
                _signal.setitimer(_signal.ITIMER_REAL, 0.0)
                _signal.setitimer(_signal.ITIMER_VIRTUAL, 0.0)
                _signal.setitimer(_signal.ITIMER_PROF, 0.0)
                # So would faulthandler.dump_traceback_later(t, exit=True): end the engine.
                _cancel_watchdog()
                _set_sigint(previous)
                # It broke the engine, or changed its resource limits (put back): guard.
                if self.fault is not None or self._loop._stopping or self.limits.changed:
                    self._after_fault()
            output = self.capture.end(saved)
            saved = None
            self.last_run_s[fkey] = spent = _now() - started
            fds = self.fds
            fds.budget -= spent
            if fds.budget < 0.0:  # it ran long enough to have opened what was left: look
                why = fds.check()
                if why:
                    self.leave_after(why)
                    raise RuntimeError(f"the task returned, but {why}")
            if self.placer is not None and len(result) > 1:
                result = self.placer.place(result)
            status = "ok"
        except UnmetDependency as e:
            status, result = "unmet", []
            error = ("UnmetDependency", safe_str(e, EVALUE_LIMIT), "")
        except BaseException as e:  # noqa: B036 - SystemExit/KeyboardInterrupt are task errors too
            status, result = "error", []
            error = describe(e)
            fds = self.fds
            fds.budget -= _now() - started
            if (fds.budget < 0.0 or guard.out_of_fds(e)) and self.leaving_for is None:
                why = fds.check()
                if why:
                    self.leave_after(why)
                    error = (error[0], f"{error[1]} [ipylb: {why}]", error[2])
        if saved is not None:
            output = self.capture.end(saved)
        return self._done(msg_id, status, started, output, error, result)

    def _done(
        self, msg_id: str, status: str, started: float, output: tuple[str, str],
        error: tuple[str, str, str] | None, result: list[Any],
    ) -> tuple[tuple, list[Any]]:
        meta = (msg_id, status, started, _now(), output[0], output[1], error)
        n = self.max_frame and self._oversized(meta, result)
        if n:  # the controller would refuse it (and drop our connection): fail the task instead
            error = ("SerializationError",
                     f"the result of task {msg_id} (its value or its output) is a frame of {n} "
                     f"bytes, over the cluster's limit of {self.max_frame} bytes (ipylb cluster "
                     "start --max-frame-mb): return or print less, or write it to a file", "")
            keep = OUTPUT_KEPT_ON_OVERSIZE
            meta = (msg_id, "error", started, meta[3], meta[4][-keep:], meta[5][-keep:], error)
            result = []
        return meta, result

    def _oversized(self, meta: tuple, result: list[Any]) -> int:
        """The size of the first frame of this report over the controller's limit (0: none).
        Its head is packed to be measured only when its text could be that large (a
        character is at most 4 bytes)."""
        n = wire.oversized(result, self.max_frame)
        if n or 4 * self._size((meta, result)) + 4096 <= self.max_frame:
            return n
        return wire.oversized(self.signer.pack(wire.DONE, meta)[1:2], self.max_frame)


def _decoded(key: bytes | None) -> str | None:
    return key.decode("ascii") if isinstance(key, bytes) else None
