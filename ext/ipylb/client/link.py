"""The client's link to the controller: connecting (the hello and its versions check),
the receiving thread that files results, replies and engine events into their
AsyncResults, reconnection, and noticing that the controller is gone.

The sending socket belongs to whichever user thread holds the send lock; the receiving
socket to the receiving thread alone (zmq sockets are not thread-safe).  A part of
:class:`~ipylb.client.client.Client` (a mixin: no state of its own).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import traceback
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import compat, connection, shm, wire
from ..error import NoCluster, VersionMismatch
from .asyncresult import AsyncResult
from .callbacks import runner
from .outcome import Metadata, Outcome

__all__ = ["Link", "LOCAL_URLS", "ADD_ENGINES"]

# How many recent task failures ``Client.failures`` keeps (the dashboard lists them).
FAILURES_KEPT = 1000
# Controller liveness: after this much silence the receiving thread pings the controller
# (a request it answers at once, from its main loop); after CONTROLLER_TIMEOUT_S of silence
# the controller counts as gone (stopped, hung, or unreachable), provided a ping left at least
# CONTROLLER_TIMEOUT_S - PING_AFTER_S before and nothing came since: silence is counted from
# when this thread last read the socket dry, so a stall of this thread (or of this whole
# process: descheduled under load, stopped, a long drain of results) is never taken for the
# controller's.  A controller on this machine is also watched through its process (pid),
# which tells within PID_CHECK_S.
PING_AFTER_S = 1.0
CONTROLLER_TIMEOUT_S = 10.0
PID_CHECK_S = 0.5
# Connection urls of a controller on this machine (its pid can be watched).
LOCAL_URLS = ("tcp://127.", "tcp://localhost", "ipc://")
# What adds engines to a cluster, for messages about a cluster without any.
ADD_ENGINES = "`ipylb engine add -n K` adds engines to a standalone cluster, rc.add_engines(K) too"


SHUT_DOWN = "it shut down"  # how a controller that said it stops is described

class Link:
    """Connecting to the controller and receiving from it: a part of
    :class:`~ipylb.client.client.Client` (a mixin: ``Client`` owns the state)."""

    def _connect(self, info: dict[str, Any], timeout: float) -> None:
        key = info["key"].encode()
        self.session = uuid.uuid4().hex[:16]
        cid = f"client-{self.session}-".encode()
        controller = info["controller_id"].encode()
        self._signer = wire.Signer(key, cid + b"s", controller)
        # On the controller's machine, large arguments go through shared memory.
        prefix = shm.shared_prefix(info)
        self._placer = shm.Placer(prefix) if prefix else None
        self._ctx = zmq.Context()
        self._send_sock = self._ctx.socket(zmq.DEALER)
        self._send_sock.setsockopt(zmq.IDENTITY, cid + b"s")
        self._send_sock.setsockopt(zmq.LINGER, 1000)
        self._send_sock.setsockopt(zmq.SNDHWM, 0)
        connection.secure(self._send_sock, info)
        self._send_sock.connect(info["client_url"])
        self._send_lock = threading.Lock()
        # The submission held to leave with those right behind it (Client._send_submission):
        # [flags, function frame count, fkey, fmac, tag, task metas, frames]; the thread that
        # sends it, woken through _held_cond; when the last submission was made.
        self._held: list[Any] | None = None
        self._held_cond = threading.Condition(self._send_lock)
        self._sender: threading.Thread | None = None
        self._last_submit = 0.0
        self._last_kind: tuple[bytes, Any, Any] | None = None  # (fkey, tag, flags) of the last
        self._submit_messages = 0  # SUBMIT messages sent
        self._ids = itertools.count()
        self._pending: dict[str, tuple[AsyncResult, int]] = {}
        # Extra AsyncResults waiting for a msg_id (get_result of a task already pending).
        self._watchers: dict[str, list[tuple[AsyncResult, int]]] = {}
        # Live output views by pending msg_id, with the task's index in each (client/live.py).
        self._live: dict[str, list[tuple[Any, int]]] = {}
        self._outcomes: dict[str, Outcome] = {}
        self._replies: dict[int, Future] = {}
        # Called for the controller's interrupt requests of engines this process started
        # (Client.relay_interrupts: `ipylb engine join`), else None.
        self._interrupter: Callable[[int, str, str | None], Any] | None = None
        self._engine_ids: dict[int, None] = {}  # registered engine ids (an ordered set)
        self._engine_failures: list[str] = []
        self.failures: deque[Metadata] = deque(maxlen=FAILURES_KEPT)
        # msg_ids this client submitted, oldest first (ipyparallel's rc.history; an int job
        # is an index into it); imap's tasks are left out, so an endless imap stays flat.
        self.history: list[str] = []
        # Submissions (AsyncResults) someone still holds, for progress monitors: submissions().
        self._submissions: weakref.WeakSet[AsyncResult] = weakref.WeakSet()
        self._state = threading.Condition()
        self._welcome = threading.Event()
        self._refused: str | None = None  # why the controller (or we) refused the handshake
        # (frames, fkey) of the last function submitted
        self._last_function: tuple[list[Any], bytes] | None = None
        self._receiver = threading.Thread(
            target=self._receive,
            args=(wire.Signer(key, cid + b"r", controller, shm_prefix=prefix), info["client_url"]),
            daemon=True, name="ipylb-client-receiver",
        )
        self._receiver.start()
        if self._welcome.wait(timeout) and self._refused is not None:
            raise VersionMismatch(self._refused)
        if not self._welcome.is_set():
            raise NoCluster(
                f"no ipylb controller answered at {info['client_url']} within {timeout} s: "
                "the cluster is not running (stale connection file?). Start one with "
                "`ipylb cluster start -n 4`, or use ipylb.Client(engines=4)."
            )

    def _receive(self, signer: wire.Signer, url: str) -> None:
        """The receiving thread: file results, replies and engine events as they come."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, signer.sender)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        # Never block this thread on a send: with no connection (a handshake refused, as
        # CurveZMQ's is without the right server key) it would never return, and close()
        # would destroy the socket under it.
        sock.setsockopt(zmq.SNDTIMEO, 0)
        connection.secure(sock, self._info)
        sock.connect(url)
        monitor = None
        try:
            hello = {"shm_domain": shm.domain() if signer.shm_prefix else None,
                     "versions": compat.versions()}
            wire.send(sock, signer.pack(wire.HELLO, hello))
            # A broken connection (zmq reconnects by itself) loses what the controller sent
            # meanwhile: once it is back, say hello again and ask for what has not come.
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            poller = zmq.Poller()  # kept: cheaper per wake-up than sock.poll()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            broken = False
            recv, unpack, handle = wire.recv, signer.unpack, self._on_message
            # Pings also keep this socket known to the controller, which forgets a listener
            # silent for its forget_after (results flowing to us are not heard from us).
            keepalive = min(float(self._info.get("forget_after") or 300.0) / 4, 60.0)
            heard = pinged = checked = time.monotonic()
            asked = None  # when the first ping since `heard` left (None: none has)
            while not self._closed:
                ready = poller.poll(200)
                if ready and ready[-1][0] is monitor:  # listed in registration order
                    broken = self._link_event(sock, signer, monitor, hello, broken)
                if ready and ready[0][0] is sock:
                    while True:
                        try:
                            frames = recv(sock)
                        except zmq.Again:
                            break
                        try:
                            handle(*unpack(frames))
                        except wire.WireError:
                            continue
                        except Exception:  # a bug here must not stop results arriving
                            traceback.print_exc()
                    # Heard until the socket ran dry, not when the drain began: a drain
                    # (or a stall of ours within it) longer than the timeout is no silence.
                    heard, asked = time.monotonic(), None
                now = time.monotonic()
                if now - checked < PID_CHECK_S and self._gone is None:
                    continue  # (results flowing: the checks below twice a second at most)
                reason = self._gone
                if reason is None:
                    checked = now
                    reason = self._controller_exited()
                if reason is None and now - heard > CONTROLLER_TIMEOUT_S and asked is not None \
                        and now - asked > CONTROLLER_TIMEOUT_S - PING_AFTER_S \
                        and not sock.poll(0):  # (an answer came while this thread stalled)
                    reason = (f"it has not answered for {now - heard:.0f} s (stopped, hung, or "
                              "the network to it is down)")
                if reason is not None:
                    self._controller_gone(reason)
                    return
                if (now - heard > PING_AFTER_S and now - pinged > PING_AFTER_S) \
                        or now - pinged > keepalive:
                    with contextlib.suppress(zmq.Again):
                        wire.send(sock, signer.pack(wire.REQUEST, (-1, "ping", None)))
                    pinged = now
                    if asked is None and now - heard > PING_AFTER_S:
                        # When it left, not `now`: this thread may have stalled in between
                        # (a ping sent after a 13 s stall had been counted 13 s old).
                        asked = time.monotonic()
            with contextlib.suppress(zmq.Again):
                wire.send(sock, signer.pack(wire.BYE, None))
        finally:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(0)
            sock.close(linger=200)

    def _link_event(self, sock: zmq.Socket, signer: wire.Signer, monitor: zmq.Socket,
                    hello: dict[str, Any], broken: bool) -> bool:
        """The receiving socket's connection broke or came back; returns whether it is
        broken now.  Once back, ask for what the controller sent meanwhile (it was lost)."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return broken
            if event == zmq.EVENT_DISCONNECTED:
                broken = True
            elif broken:
                try:
                    wire.send(sock, signer.pack(wire.HELLO, hello))
                    missing = [*self._pending, *self._watchers]
                    wire.send(sock, signer.pack(wire.REQUEST, (-1, "redeliver", missing)))
                except zmq.Again:  # gone again already: the next reconnection asks
                    continue
                broken = False

    def _controller_exited(self) -> str | None:
        """Why the controller's process is gone, if it ran on this machine and is."""
        if self._local is not None:
            return self._local.exit_reason()
        pid = self._info.get("pid")
        if self._info["client_url"].startswith(LOCAL_URLS) and isinstance(pid, int) \
                and not connection.pid_alive(pid):
            return f"its process (pid {pid}) has ended"
        return None

    def _controller_gone(self, reason: str) -> None:
        """Fail every pending result and request with ControllerGone (saying what survives);
        from now on submissions raise it at once."""
        if self._local is not None:
            survives = ("this client's private cluster is gone with it: create a new "
                        "Client(engines=N) and submit again")
        elif self._info.get("db") == "sqlite":
            survives = ("the cluster keeps finished tasks in SQLite: once it runs again "
                        "(`ipylb cluster start --db sqlite`, same profile), get_result({!r}) "
                        "gives this one's result if it had finished; else submit it again")
        else:
            survives = ("the cluster kept results in memory, so they are gone (`ipylb cluster "
                        "start --db sqlite` keeps them across restarts): submit it again")
        why = f"the ipylb controller is gone: {reason}"
        with self._send_lock:  # a submission under way is pending (failed below) or refused
            self._gone = why
        self._abandon(f"task {{}} had not finished: {why}; {survives}", "ControllerGone", why)
        if self._local is not None:
            self._local.stop()  # reap it; remove its connection file and shared memory

    def _on_message(self, kind: int, _sender: bytes, meta: Any, bufs: list[Any], mac: bytes) -> None:
        if kind == wire.RESULT:
            self._on_result(meta, bufs, mac)
        elif kind == wire.RESULTS:  # several, finished within one turn of the controller
            for item in wire.unbatch(meta, bufs):
                self._on_result(*item)
        elif kind == wire.REPLY:
            fut = self._replies.pop(meta[0], None)
            if fut is not None:
                fut.set_result(meta[1:])
        elif kind == wire.EVENT:
            if meta[0] == "shutdown":  # the controller stops: the loop fails what is pending
                self._said_shut_down = True  # (kept once _controller_gone rewrites _gone)
                self._gone = f"{SHUT_DOWN} ({meta[1]})"
            elif meta[0] == "output":  # a running task's live output (client/live.py)
                _, msg_id, (out, out_end), (err, err_end), started = meta
                for live, i in self._live.get(msg_id, ()):
                    live.add(i, out, err, (out_end, err_end), started)
            else:
                self._on_event(meta)
        elif kind == wire.WELCOME:
            # Refused by the controller, or by us (a controller that did not check).
            self._refused = meta.get("refused") or compat.mismatch(
                compat.versions(), meta.get("versions"), "this client", "the cluster's controller")
            if self._refused is not None:
                self._welcome.set()
                return
            with self._state:
                self._engine_ids = dict.fromkeys(meta["engines"])
                self.scheme = meta["scheme"]
            self._welcome.set()

    def _on_result(self, meta: Any, bufs: list[Any], mac: bytes) -> None:
        """File one task's result into the AsyncResults waiting for it."""
        if len(bufs) > 1:  # a link the controller made for us: map it, remove it
            for b in bufs:
                if type(b) is shm.Segment:
                    b.claim()
        outcome = Outcome.received(meta, bufs, mac)
        msg_id = outcome.meta[0]
        again = msg_id in self._outcomes  # sent twice (asked again after a reconnection)
        self._outcomes[msg_id] = outcome
        pending = self._pending
        waiting = pending.pop(msg_id, None)
        if waiting is not None:
            waiting[0]._deliver(waiting[1], outcome)
            if not pending:
                with self._state:
                    self._state.notify_all()
        if self._watchers:
            for ar, i in self._watchers.pop(msg_id, ()):
                ar._deliver(i, outcome)
        if not outcome.ok and not again:  # after delivery: nothing here may keep a result
            self.failures.append(outcome.metadata(None))  # from its waiter

    def _on_event(self, event: tuple) -> None:
        with self._state:
            if event[0] == "engine_added":  # deltas; the whole list came with the welcome
                self._engine_ids[event[1]] = None
                self._warned_empty = False
            elif event[0] == "engine_removed":
                self._engine_ids.pop(event[1], None)
            elif event[0] == "engines":  # the whole list again (after we were forgotten)
                self._engine_ids = dict.fromkeys(event[1])
                if event[1]:
                    self._warned_empty = False
            elif event[0] == "stranded":  # off this thread: warning hooks are user code
                self._warned_empty = True
                runner.call(warnings.warn, f"every engine of the cluster is gone: {event[1]} "
                                f"task(s) wait for a new one ({ADD_ENGINES})", RuntimeWarning, 1)
            elif event[0] == "restarting":  # engines are coming back: no "no engines" warning
                self._warned_empty = True
            elif event[0] == "engine_down":  # jupyter_client's restarter gave up on a slot
                runner.call(warnings.warn, f"an engine of the cluster stays down: {event[1]}",
                                RuntimeWarning, 1)
            elif event[0] == "engine_refused":  # the engine itself says why, and stops
                runner.call(warnings.warn, f"the cluster refused an engine: {event[1]}",
                                RuntimeWarning, 1)
            elif event[0] == "engine_failed":
                self._engine_failures.append(event[1])
            elif event[0] == "interrupt":  # (engine_id, tag, task_id): relay_interrupts
                if self._interrupter is not None:
                    runner.call(self._interrupter, *event[1:])
            self._state.notify_all()
