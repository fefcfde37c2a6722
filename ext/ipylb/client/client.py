"""The Client: a connection to an ipylb cluster (or a private one it starts).

Two DEALER sockets to the controller: one to send (submissions and requests,
from whichever user thread, under a lock) and one to receive, owned by a
background thread that files results into their AsyncResults.  Sockets are not
thread-safe, so each has one owner.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import threading
import time
import traceback
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import compat, connection, limits, shm, wire
from ..error import ClientClosed, ControllerGone, NoCluster, SerializationError, VersionMismatch
from .asyncresult import AsyncHubResult, AsyncResult, Metadata, Outcome, _callbacks
from .local import LocalCluster

# How long a client waits for a controller to answer its hello.
CONNECT_TIMEOUT_S = 5.0
# Tasks per submission message (a map sends its items in batches).
SUBMIT_BATCH = 256
# How many recent task failures ``Client.failures`` keeps (the dashboard lists them).
FAILURES_KEPT = 1000
# How long Client(engines=N) waits for its engines to register: this, plus the second
# term for each engine (kernels boot one CPU-second or so each, a few at a time).
ENGINE_START_TIMEOUT_S = 60.0
ENGINE_START_PER_ENGINE_S = 2.0
# Controller liveness: after this much silence the receiving thread pings the controller
# (a request it answers at once, from its main loop); after CONTROLLER_TIMEOUT_S of silence
# the controller counts as gone (stopped, hung, or unreachable).  A controller on this machine
# is also watched through its process (pid), which tells within PID_CHECK_S.
PING_AFTER_S = 1.0
CONTROLLER_TIMEOUT_S = 10.0
PID_CHECK_S = 0.5
# What ipylb has instead of ipyparallel's direct interface (rc[:], rc.direct_view(), ...).
TASK_INTERFACE_ONLY = (
    "ipylb has ipyparallel's task interface only (no DirectView): run functions with "
    "view = rc.load_balanced_view(); view.apply(f, ...) / view.map(f, seq); to run a setup "
    "step on the engines, make what it defines importable there, or use @ipylb.require(...)"
)
_IPP_DIRECT = frozenset({
    "direct_view", "broadcast_view", "activate", "push", "pull", "execute", "run", "scatter",
    "gather", "become_dask", "become_distributed", "send_execute_request",
})


class Client:
    """Connect to a cluster (``Client()``, ``Client(file_or_url)``, ``Client(profile=)``)
    or start a private one on this machine (``Client(engines=N)``)."""

    def __init__(
        self,
        url_or_file: str | Path | None = None,
        profile: str | None = None,
        engines: int | None = None,
        scheme: str | None = None,
        hwm: int | None = None,
        timeout: float = CONNECT_TIMEOUT_S,
        heartbeat_timeout: float | None = None,
        restart: bool | tuple[int, float] | None = None,
        kernel: str | None = None,
    ) -> None:
        """``scheme`` (default leastload), ``hwm`` (default 1), ``heartbeat_timeout``
        (default 10 s) and ``restart`` configure the cluster ``engines=N`` starts; a running
        cluster has its own, set by ``ipylb cluster start``.  ``restart``: True (the default:
        an engine whose kernel dies is restarted through jupyter_client's KernelRestarter, a
        slot that dies more than 5 times in a row within 10 s of each death stays down),
        False (never), or ``(limit, seconds)`` for that policy's two numbers (its
        ``restart_limit`` and ``stable_start_time``).  ``kernel``: the kernelspec engines are
        started from, with any jupyter_client provisioner (default ``ipylb-engine``)."""
        self._local: LocalCluster | None = None
        if engines is not None and (url_or_file is not None or profile is not None):
            given = "a connection file or url" if url_or_file is not None else f"profile={profile!r}"
            raise ValueError(
                f"Client(engines={engines!r}) starts a private cluster, while {given} connects "
                "to a running one: pass one or the other (to add engines to a running cluster: "
                "`ipylb engine add -n K`)")
        if url_or_file is not None and profile is not None:
            raise ValueError(
                f"both a connection file or url ({str(url_or_file)!r}) and profile={profile!r} "
                "name a cluster: pass one of them")
        if engines is not None:
            hint = limits.check_engine_count(engines)
            if hint:
                warnings.warn(hint, RuntimeWarning, stacklevel=2)
            progress = limits.StartProgress(engines)  # its clock starts with the cluster's
            self._local = LocalCluster(engines, scheme or "leastload", 1 if hwm is None else hwm,
                                       10.0 if heartbeat_timeout is None else heartbeat_timeout,
                                       restart=True if restart is None else restart,
                                       kernel=kernel)
            info = self._local.info
        else:
            given = [n for n, v in (("scheme", scheme), ("hwm", hwm),
                                    ("heartbeat_timeout", heartbeat_timeout),
                                    ("restart", restart), ("kernel", kernel)) if v is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} configure(s) a cluster this client starts (engines=N); "
                    "a running cluster keeps its own: `ipylb cluster start --scheme S --hwm H`"
                )
            path = _find_connection_file(url_or_file, profile)
            info = connection.read(path)
            pid = info.get("pid")
            local = info["client_url"].startswith(_LOCAL_URLS)
            if local and isinstance(pid, int) and not connection.pid_alive(pid):
                raise NoCluster(
                    f"the cluster of {path} is not running (its controller, pid {pid}, is gone): "
                    "start one with `ipylb cluster start -n 4`, or use ipylb.Client(engines=4)"
                )
        self._info = info
        self._closed = False
        # The largest frame the controller reads (bytes; 0: not said, an older controller).
        self._max_frame: int = info.get("max_frame_bytes") or 0
        # Why the controller is gone (None while it serves): pending results have failed
        # with ControllerGone, and new submissions raise it.
        self._gone: str | None = None
        self._why_closed = ""
        self._warned_empty = False
        self.block = False  # the block flag new views start with (as in ipyparallel)
        try:
            self._connect(info, timeout)
            if engines is not None:
                self._await_engines(engines, ENGINE_START_TIMEOUT_S
                                    + ENGINE_START_PER_ENGINE_S * engines, progress)
        except BaseException:
            self.shutdown() if self._local else self.close()
            raise
        _live_clients.add(self)

    # -- connection --------------------------------------------------------------

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
        self._ids = itertools.count()
        self._pending: dict[str, tuple[AsyncResult, int]] = {}
        # Extra AsyncResults waiting for a msg_id (get_result of a task already pending).
        self._watchers: dict[str, list[tuple[AsyncResult, int]]] = {}
        self._outcomes: dict[str, Outcome] = {}
        self._replies: dict[int, Future] = {}
        self._engine_ids: list[int] = []
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
            while not self._closed:
                ready = poller.poll(200)
                if ready and ready[-1][0] is monitor:  # listed in registration order
                    broken = self._link_event(sock, signer, monitor, hello, broken)
                if ready and ready[0][0] is sock:
                    heard = time.monotonic()
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
                now = time.monotonic()
                if now - checked < PID_CHECK_S and self._gone is None:
                    continue  # (results flowing: the checks below twice a second at most)
                reason = self._gone
                if reason is None:
                    checked = now
                    reason = self._controller_exited()
                if reason is None and now - heard > CONTROLLER_TIMEOUT_S:
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
        if self._info["client_url"].startswith(_LOCAL_URLS) and isinstance(pid, int) \
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
        elif kind == wire.REPLY:
            fut = self._replies.pop(meta[0], None)
            if fut is not None:
                fut.set_result(meta[1:])
        elif kind == wire.EVENT:
            if meta[0] == "shutdown":  # the controller stops: the loop fails what is pending
                self._gone = f"it shut down ({meta[1]})"
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
                self._engine_ids = meta["engines"]
                self.scheme = meta["scheme"]
            self._welcome.set()

    def _on_event(self, event: tuple) -> None:
        with self._state:
            if event[0] == "engines":
                self._engine_ids = event[1]
                if event[1]:
                    self._warned_empty = False
            elif event[0] == "stranded":  # off this thread: warning hooks are user code
                self._warned_empty = True
                _callbacks.call(warnings.warn, f"every engine of the cluster is gone: {event[1]} "
                                f"task(s) wait for a new one ({ADD_ENGINES})", RuntimeWarning, 1)
            elif event[0] == "restarting":  # engines are coming back: no "no engines" warning
                self._warned_empty = True
            elif event[0] == "engine_down":  # jupyter_client's restarter gave up on a slot
                _callbacks.call(warnings.warn, f"an engine of the cluster stays down: {event[1]}",
                                RuntimeWarning, 1)
            elif event[0] == "engine_refused":  # the engine itself says why, and stops
                warnings.warn(f"the cluster refused an engine: {event[1]}", RuntimeWarning,
                              stacklevel=1)
            elif event[0] == "engine_failed":
                self._engine_failures.append(event[1])
            self._state.notify_all()

    # -- engines -----------------------------------------------------------------

    @property
    def ids(self) -> list[int]:
        """Sorted ids of the engines registered now.  Raises ClientClosed once closed."""
        self._check_open()
        return list(self._engine_ids)

    def __len__(self) -> int:
        """How many engines are registered now (as ipyparallel's ``len(rc)``)."""
        return len(self._engine_ids)

    def wait_for_engines(self, n: int, timeout: float | None = None,
                         block: bool = True) -> Future | None:
        """Wait until at least ``n`` engines are registered (``timeout`` seconds; None or
        -1: no limit).  Raises TimeoutError if they are not in time, RuntimeError if an
        engine this cluster started failed to start.  With ``block=False`` returns at
        once a ``concurrent.futures.Future`` that ends the same way (as ipyparallel)."""
        if timeout is not None and timeout < 0:
            timeout = None
        if not block:
            fut: Future = Future()

            def wait() -> None:
                try:
                    self.wait_for_engines(n, timeout)
                except BaseException as e:
                    fut.set_exception(e)
                else:
                    fut.set_result(None)

            threading.Thread(target=wait, daemon=True, name="ipylb-wait-for-engines").start()
            return fut
        self._await_engines(n, timeout)
        return None

    def _await_engines(self, n: int, timeout: float | None,
                       shown: limits.StartProgress | None = None) -> None:
        """Wait for ``n`` engines; with ``shown``, show ``12/64 engines up`` on stderr
        once the start takes more than a moment (:class:`ipylb.limits.StartProgress`)."""
        seen = len(self._engine_failures)  # only failures from now on count

        def enough() -> bool:
            return (len(self._engine_ids) >= n or len(self._engine_failures) > seen
                    or self._gone is not None)

        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            while True:
                if shown is not None:
                    shown.update(len(self._engine_ids))
                left = None if deadline is None else deadline - time.monotonic()
                step = left if shown is None else min(left or 0.5, 0.5)
                ok = self._state.wait_for(enough, step)
                if ok or (left is not None and left <= step):
                    break
        if shown is not None:
            shown.done(len(self._engine_ids))
        self._check_open()
        if len(self._engine_failures) > seen:
            raise RuntimeError("; ".join(self._engine_failures[seen:]))
        if not ok:
            raise TimeoutError(f"{len(self._engine_ids)} of {n} engines registered within {timeout} s")

    # -- submitting --------------------------------------------------------------

    def _new_msg_id(self) -> str:
        return f"{self.session}-{next(self._ids)}"

    def _submit(self, fbufs: list[Any], flags: dict[str, Any] | None, ar: Any,
                tasks: list[tuple[str, list[Any]]], base: int = 0, record: bool = True,
                tag: tuple[str | None, str] = (None, "")) -> None:
        """Send tasks that share one function, in as few messages as possible.

        ``fbufs`` are the function's frames (:func:`ipylb.serialize.dumps_function`); each
        task is ``(msg_id, arg_frames)``, filed as item ``base + i`` of ``ar`` (an
        AsyncResult, or anything with its ``_deliver(index, outcome)`` and ``wait``).  The
        function's frames have a MAC of their own, and a key (a MAC over their content): the
        controller sends a function to each engine once and then names it by that key.
        Each task's MAC covers its argument frames, so the controller can forward each
        task to a different engine untouched.  ``tag`` is ``(label, function name)``: the
        controller keeps it in the tasks' records (sent once per message, shared by its
        tasks).
        """
        self._check_open()
        if not self._engine_ids and not self._warned_empty:
            self._warned_empty = True
            warnings.warn(f"the cluster has no engines: tasks wait until one registers "
                          f"({ADD_ENGINES})", RuntimeWarning, stacklevel=3)
        mac, placer, limit = self._signer.bufs_mac, self._placer, self._max_frame
        fbufs, fmac, fkey = self._function_frames(fbufs)
        n = limit and wire.oversized(fbufs, limit)
        if n:
            raise SerializationError(_too_big("the function", n, limit))
        for start in range(0, len(tasks), SUBMIT_BATCH):
            batch = tasks[start:start + SUBMIT_BATCH]
            metas, bufs, sent = [], list(fbufs), []
            for i, (msg_id, args) in enumerate(batch, base + start):
                if placer is not None and len(args) > 1:
                    args = placer.place(args)
                n = limit and wire.oversized(args, limit)
                if n:  # the controller would refuse the message (and drop us): fail it here
                    why = _too_big(f"task {msg_id}'s arguments", n, limit)
                    self._outcomes[msg_id] = failed = Outcome.lost(msg_id, why, "SerializationError")
                    ar._deliver(i, failed)
                    continue
                metas.append((msg_id, len(args), mac(args)))
                bufs.extend(args)
                sent.append((msg_id, i))
            if not sent:
                continue
            # Under the lock, so that close() either sees these as pending or refuses them.
            with self._send_lock:
                self._check_open()
                for msg_id, i in sent:
                    self._pending[msg_id] = (ar, i)
                if record:
                    self.history.extend(msg_id for msg_id, _args in batch)
                    if start == 0 and isinstance(ar, AsyncResult):
                        self._submissions.add(ar)
                wire.send(self._send_sock, self._signer.pack(
                    wire.SUBMIT, (flags, (len(fbufs), fkey, fmac), metas, tag), bufs, b""))

    def _function_frames(self, fbufs: list[Any]) -> tuple[list[Any], bytes, bytes]:
        """The function's frames as sent (large ones placed in shared memory, afresh each
        time: the controller takes each segment it receives), their MAC, and ``fkey``: a
        MAC over their content, which names the function on the engines (the same function
        submitted again is not sent to them again).  ``fkey`` is worked out once for the
        same frames submitted again (imap's batches)."""
        last = self._last_function
        if last is not None and last[0] is fbufs:
            fkey = last[1]
        else:
            fkey = self._signer.bufs_mac(fbufs)
            self._last_function = (fbufs, fkey)
        placed = self._placer.place(fbufs) if self._placer is not None and len(fbufs) > 1 \
            else fbufs
        return placed, (fkey if placed is fbufs else self._signer.bufs_mac(placed)), fkey

    def _request(self, op: str, arg: Any = None, timeout: float | None = 30.0) -> Any:
        """Ask the controller something and wait for its answer."""
        self._check_open()
        fut: Future = Future()
        req_id = next(self._ids)
        self._replies[req_id] = fut
        with self._send_lock:
            self._check_open()
            wire.send(self._send_sock, self._signer.pack(wire.REQUEST, (req_id, op, arg)))
        try:
            ok, value = fut.result(timeout)
        except TimeoutError:
            self._replies.pop(req_id, None)
            raise TimeoutError(f"the controller did not answer {op!r} within {timeout} s") from None
        if not ok:
            ename, evalue = value
            raise _REQUEST_ERRORS.get(ename, RuntimeError)(evalue)
        return value

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed(f"this ipylb Client is closed ({self._why_closed}); "
                               "create a new one")
        if self._gone is not None:
            raise ControllerGone(f"{self._gone}; connect a new Client once a cluster runs "
                                 "(`ipylb cluster start`, or Client(engines=N))")

    def load_balanced_view(self, targets: int | list[int] | None = None) -> Any:
        """A new LoadBalancedView on this client's cluster (its ``block`` starts as the
        client's); ``targets``: the engines its tasks may run on (None: all).  Raises
        ClientClosed once closed."""
        from .view import LoadBalancedView

        self._check_open()
        view = LoadBalancedView(self, targets)
        view.block = self.block
        return view

    # -- waiting and results -----------------------------------------------------

    def wait(self, jobs: Any = None, timeout: float | None = None) -> bool:
        """Wait for ``jobs`` (default: every task this client still waits for): AsyncResults,
        msg_ids, or Futures (``concurrent.futures.Future`` and the like; one whose result is
        an AsyncResult is waited for until that is done too, as ipyparallel does).
        ``timeout`` in seconds (None or -1: no limit).  True if all are done in time.
        An unknown msg_id raises KeyError."""
        if timeout is not None and timeout < 0:
            timeout = None
        if jobs is None:
            with self._state:
                return self._state.wait_for(lambda: not self._pending, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        jobs = _as_list(jobs)
        while jobs:
            job = jobs.pop(0)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if isinstance(job, AsyncResult):
                if not job.wait(left):
                    return False
            elif hasattr(job, "add_done_callback") and hasattr(job, "result"):
                done = threading.Event()
                job.add_done_callback(lambda _f, done=done: done.set())
                if not done.wait(left):
                    return False
                if not job.cancelled() and job.exception() is None:
                    inner = job.result()
                    if isinstance(inner, AsyncResult) or (
                            hasattr(inner, "add_done_callback") and hasattr(inner, "result")):
                        jobs.append(inner)
            else:
                msg_id = _msg_ids(job, self.history)[0] if type(job) is int else str(job)
                if msg_id not in self._outcomes:
                    waiting = self._pending.get(msg_id) or next(iter(self._watchers.get(msg_id, ())), None)
                    if waiting is None:  # neither submitted here nor fetched with get_result
                        if msg_id in self._outcomes:  # (or its result has just come)
                            continue
                        raise KeyError(f"no such task: {msg_id!r} (never submitted here, nor "
                                       "fetched with get_result; or purged)")
                    if not waiting[0].wait(left):
                        return False
        return True

    def queue_status(self, targets: int | list[int] | None = None, verbose: bool = False,
                     timeout: float | None = 30.0) -> dict[Any, Any]:
        """``{engine_id: {"queue": n, "completed": n, "tasks": n, "restarts": n}, ...,
        "unassigned": n}``: per engine, tasks queued behind the running one, finished,
        running, and (ipylb) how many times the controller restarted the kernel of its slot
        before it (a restarted kernel is a new engine id); and tasks not yet on any engine.
        ``targets`` (an engine id or a list; None: all) limits it to those engines, and an
        int gives just that engine's dict (as in ipyparallel).
        ``verbose``: lists of msg_ids instead of counts (``completed``: those still on
        record).  IndexError for an engine id that is not registered."""
        wanted = None
        if targets is not None:
            wanted = _engine_list(targets, self.ids)
        status = self._request("queue_status", bool(verbose), timeout)
        if wanted is None:
            return status
        if isinstance(targets, int):
            return status[targets]
        return {k: v for k, v in status.items() if k in wanted or not isinstance(k, int)}

    @property
    def closed(self) -> bool:
        """Whether this client has been closed (or shut down)."""
        return self._closed

    @property
    def cluster_info(self) -> dict[str, Any]:
        """The cluster's connection details, without its key: urls, controller pid, scheme, hwm."""
        return {k: v for k, v in self._info.items() if k != "key"}

    def add_engines(self, n: int, kernel: str | None = None) -> None:
        """Ask the controller to start ``n`` more engines (they register shortly;
        ``wait_for_engines`` waits for them), from kernelspec ``kernel`` (default: the
        cluster's), whose provisioner decides where they run.  ``n`` follows the
        engine-count rule of :mod:`ipylb.limits` (ValueError above ``MAX_ENGINES``, a
        warning above a few per CPU)."""
        hint = limits.check_engine_count(n, "n")
        if hint:
            warnings.warn(hint, RuntimeWarning, stacklevel=2)
        self._request("add_engines", n if kernel is None else (n, kernel))

    def stop_cluster(self, timeout: float | None = 30.0) -> None:
        """Stop the cluster this client is connected to (controller and its engines)."""
        self._request("shutdown", None, timeout)

    def story(self, msg_id: str) -> list[tuple]:
        """The scheduler's log for one task: (task, from state, to state, detail, time) rows,
        e.g. why it waited, where it went, why it failed."""
        return self._request("story", msg_id)

    def submissions(self) -> list[AsyncResult]:
        """This client's submissions (an AsyncResult per apply or map, imap left out) that
        are still referenced somewhere, oldest first: what progress monitors show.  Each
        has ``label``, ``msg_ids``, ``progress()`` (finished tasks) and ``ready()``."""
        with self._send_lock:  # (adds happen under it: no change while this copies)
            subs = list(self._submissions)
        return sorted(subs, key=lambda ar: ar._submitted)

    def submission_of(self, msg_id: str) -> Any:
        """The AsyncResult a pending task of this client was submitted in (None if the task
        is not pending here: finished, another client's, or part of an imap)."""
        entry = self._pending.get(msg_id)
        return None if entry is None or not isinstance(entry[0], AsyncResult) else entry[0]

    def activity(self, seq: int = 0, second: int = 0,
                 timeout: float | None = 30.0) -> dict[str, Any]:
        """What the cluster has been doing, for monitors (the dashboard, ``ipylb top``), in
        one round trip.  ``seq``/``second``: the ``seq`` of the previous answer and the
        first second (epoch) of buckets wanted, so repeated calls get only what is new.

        Returns a dict: ``now`` (the controller's clock, seconds since the epoch), ``seq``,
        ``tasks`` (finished since ``seq``, oldest first, at most 2,000: ``(engine_id,
        started, completed, ok, label or function name)``, times in seconds since the
        epoch), ``skipped`` (True if more finished than were sent), ``buckets`` (per
        engine, ``[second, finished, failed, busy seconds]`` for each second of the last
        minute with a finished task), ``status`` (as :meth:`queue_status`), ``engines``
        (per live engine: ``host``, ``pid``, ``restarts``, ``cpu`` (%), ``rss`` (bytes),
        ``task``: ``(msg_id, label or function, started)`` or None; health is what the
        engine reported within the last second or two, None before its first report).
        Raises TimeoutError if the controller does not answer within ``timeout`` s."""
        return self._request("activity", (seq, second), timeout)

    def engine_info(self) -> dict[int, dict[str, Any]]:
        """Per engine: pid, hostname and the kernel connection file
        (``jupyter console --existing FILE`` attaches to it)."""
        return self._request("engine_info")

    def interrupt(self, engine_ids: list[int] | None = None) -> list[int]:
        """Interrupt engines (default: all) like Jupyter's Kernel > Interrupt: a running
        task raises KeyboardInterrupt and fails; the engine serves on."""
        return self._request("interrupt", engine_ids)

    def get_result(self, indices_or_msg_ids: Any, block: bool | None = None) -> AsyncHubResult:
        """An AsyncHubResult for tasks by msg_id (or AsyncResult), pending ones included,
        submitted by any client of this cluster.  Unknown ids raise KeyError."""
        single = isinstance(indices_or_msg_ids, str)
        msg_ids = _msg_ids(indices_or_msg_ids, self.history)
        ar = AsyncHubResult(self, msg_ids, single=single)
        ask = []
        for i, msg_id in enumerate(msg_ids):
            outcome = self._outcomes.get(msg_id)
            if outcome is not None:
                ar._deliver(i, outcome)
                continue
            self._watchers.setdefault(msg_id, []).append((ar, i))
            if msg_id not in self._pending:
                ask.append(msg_id)
            outcome = self._outcomes.get(msg_id)  # it may have arrived meanwhile
            if outcome is not None:
                ar._deliver(i, outcome)
        if ask:
            try:
                self._request("get_result", ask)
            except KeyError:  # take back only what this call registered
                for i, msg_id in enumerate(msg_ids):
                    mine = self._watchers.get(msg_id, [])
                    if (ar, i) in mine:
                        mine.remove((ar, i))
                    if not mine:
                        self._watchers.pop(msg_id, None)
                raise
        if block:
            ar.wait()
        return ar

    def resubmit(self, indices_or_msg_ids: Any) -> AsyncHubResult:
        """Run finished tasks again under new msg_ids; ``get()`` gives their results in
        the given order.  Unknown or pending ids raise."""
        old = _msg_ids(indices_or_msg_ids, self.history)
        new = [self._new_msg_id() for _ in old]
        self.history.extend(new)
        ar = AsyncHubResult(self, new)
        for i, msg_id in enumerate(new):
            self._pending[msg_id] = (ar, i)
        try:
            self._request("resubmit", list(zip(old, new)))
        except BaseException:
            for msg_id in new:
                self._pending.pop(msg_id, None)
            raise
        return ar

    def purge_results(self, jobs: Any = "all") -> None:
        """Forget finished tasks here and on the controller (``"all"``, or AsyncResults/msg_ids).

        Their results can no longer be fetched; waiting for them raises KeyError."""
        msg_ids = None if isinstance(jobs, str) and jobs == "all" else _msg_ids(jobs, self.history)
        forgotten = self._request("purge", msg_ids)
        for msg_id in forgotten:
            self._outcomes.pop(msg_id, None)

    def purge_hub_results(self, jobs: Any = "all") -> None:
        """Forget finished tasks on the controller only (``"all"``, or jobs): this client's
        cache (``rc.results``) keeps what it has (ipyparallel).  Pending ones raise
        ValueError, unknown ones KeyError."""
        self._request("purge", None if isinstance(jobs, str) and jobs == "all"
                      else _msg_ids(jobs, self.history))

    def purge_local_results(self, jobs: Any = "all") -> None:
        """Drop finished results from this client's cache (``rc.results``) only
        (``"all"``, or jobs); the controller still has them for ``get_result``.
        RuntimeError for a task still pending here (as ipyparallel)."""
        if isinstance(jobs, str) and jobs == "all":
            self._outcomes.clear()
            return
        msg_ids = _msg_ids(jobs, self.history)
        pending = [m for m in msg_ids if m in self._pending]
        if pending:
            raise RuntimeError(f"cannot purge task(s) still pending: {', '.join(pending[:5])}"
                               f"{' ...' if len(pending) > 5 else ''}; wait for them first")
        for msg_id in msg_ids:
            self._outcomes.pop(msg_id, None)

    @property
    def results(self) -> Results:
        """This client's cache of finished tasks: ``{msg_id: value, or the task's error
        as an exception object}`` (read-only; ipyparallel's ``rc.results``)."""
        return Results(self)

    def hub_history(self, timeout: float | None = 30.0) -> list[str]:
        """msg_ids of every task the controller has a record of (any client's, pending
        ones too), oldest submission first (ipyparallel)."""
        return self._request("hub_history", None, timeout)

    def db_query(self, query: dict[str, Any], keys: list[str] | None = None,
                 timeout: float | None = 30.0) -> list[dict[str, Any]]:
        """Records of tasks (any client's, pending ones too) that meet ``query``, in
        ipyparallel's form: ``{key: value}`` for equality or ``{key: {op: value}}`` with
        op one of ``$lt $gt $lte $gte $ne $in $nin``, all conditions together.  Keys:
        ``msg_id``, ``status`` ("ok", "error", "pending"), ``engine_id``, ``submitted``,
        ``started``, ``completed`` (datetimes, or seconds since the epoch), ``label`` (the
        view's ``label`` flag; None if none was given).  Returns dicts
        of ``keys`` (default all: those plus ``client``, ``stdout``, ``stderr``, ``error``
        as an exception object), oldest submission first.  ValueError/TypeError for a
        query ipylb cannot answer.  Answered from the controller's records, or by SQL
        on indexed columns with ``--db sqlite``."""
        rows = self._request("db_query", (_epoch_query(query), keys), timeout)
        for r in rows:
            for k in ("submitted", "started", "completed"):
                if r.get(k) is not None:
                    r[k] = datetime.fromtimestamp(r[k])
            if r.get("error") is not None:
                r["error"] = Outcome((r["msg_id"], r.get("engine_id"), r.get("status"), None, None,
                                      "", "", tuple(r["error"])), [], b"").error()
        return rows

    def abort(self, jobs: Any) -> None:
        """Tasks in ``jobs`` that have not started never run; they fail with TaskAborted."""
        self._request("abort", _msg_ids(jobs, self.history))

    def dashboard(self) -> Any:
        """A live ipywidgets panel of this cluster (queue depth, engines, throughput,
        failures), updated from a background thread; display it in a notebook."""
        from ..dashboard import Dashboard

        return Dashboard(self)

    # -- shutdown ----------------------------------------------------------------

    def close(self) -> None:
        """Disconnect; a cluster this client started keeps running only until shutdown().

        Results not yet received fail with ClientClosed (their tasks run on: another
        client can fetch them with ``get_result``)."""
        self._close("task {} had not finished when this client closed; it runs on in the "
                    "cluster: connect a new Client and use get_result({!r})", "closed by close()")

    def _close(self, why: str, how: str) -> None:
        """Close; results still expected fail with ``why`` (formatted with the msg_id twice);
        ``how`` says in later errors how the client came to be closed."""
        if self._closed:
            return
        self._closed = True
        self._why_closed = how
        receiver = getattr(self, "_receiver", None)
        if receiver is not None and receiver is not threading.current_thread():
            receiver.join(2)
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            with self._send_lock:
                self._send_sock.close(0)
            ctx.destroy(linger=0)  # closes what a stuck receiver still holds, never hangs
        if hasattr(self, "_pending"):
            self._abandon(why)
        _live_clients.discard(self)

    def _abandon(self, why: str, ename: str = "ClientClosed", reply: str | None = None) -> None:
        """Fail every result and reply still expected, so nothing waits for it forever.

        ``why`` is formatted with each msg_id (twice); ``ename`` names the results' error;
        ``reply`` is what requests waiting for an answer raise (``ename``), else RuntimeError."""
        replies, self._replies = self._replies, {}
        answer = ((ename, reply) if reply is not None else
                  ("RuntimeError", "this ipylb Client closed before the controller answered"))
        for fut in replies.values():
            fut.set_result((False, answer))
        pending, self._pending = self._pending, {}
        watchers, self._watchers = self._watchers, {}
        for msg_id, waiting in [*pending.items(),
                                *((m, w) for m, ws in watchers.items() for w in ws)]:
            waiting[0]._deliver(waiting[1], Outcome.lost(msg_id, why.format(msg_id, msg_id), ename))
        with self._state:
            self._state.notify_all()

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        """Stop the private cluster this client started (every process of it), then close.

        Results not yet received fail with ClientClosed.  A client of a running cluster
        (``Client()``, ``Client(profile=...)``) only disconnects: ``stop_cluster()`` stops
        that one.  ipyparallel's arguments (``hub=``, ``targets=``, ``restart=``) raise
        TypeError: ipylb has no direct interface to engines.
        """
        if args or kwargs:
            given = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            raise TypeError(
                f"rc.shutdown({given}): ipylb's shutdown() takes no arguments. It stops the "
                "private cluster of Client(engines=N); rc.stop_cluster() (or `ipylb cluster "
                "stop`) stops a running cluster, controller and engines; rc.close() only "
                "disconnects. ipylb has no direct interface to engines (ipyparallel's "
                "targets/restart/hub).")
        self._shutdown("task {} had not finished when its cluster was shut down (rc.shutdown())",
                       "its cluster was shut down by rc.shutdown()")

    def _shutdown(self, why: str, how: str) -> None:
        """shutdown(), with the reason results still expected fail with (see _close)."""
        local, self._local = self._local, None
        if local is None:
            global _said_shutdown_disconnects
            if not self._closed and not _said_shutdown_disconnects:
                _said_shutdown_disconnects = True
                warnings.warn("rc.shutdown() only disconnects this client: its cluster was not "
                              "started by it and keeps running. rc.stop_cluster() (or `ipylb "
                              "cluster stop`) stops it.", UserWarning, stacklevel=3)
            self.close()
            return
        self._close(why, how)
        local.stop()

    # -- ipyparallel's direct interface: not here, say what to use -----------------

    def __getitem__(self, key: Any) -> Any:
        raise TypeError(f"rc[{key!r}]: {TASK_INTERFACE_ONLY}")

    def __getattr__(self, name: str) -> Any:
        if name in _IPP_DIRECT:
            raise AttributeError(f"ipylb.Client has no {name!r}: {TASK_INTERFACE_ONLY}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown() if self._local is not None else self.close()

    def __del__(self) -> None:
        if getattr(self, "_local", None) is not None:
            self.shutdown()


_REQUEST_ERRORS = {"KeyError": KeyError, "ValueError": ValueError, "TypeError": TypeError,
                   "ControllerGone": ControllerGone}
_LOCAL_URLS = ("tcp://127.", "tcp://localhost", "ipc://")
# What adds engines to a cluster, for messages about a cluster without any.
ADD_ENGINES = "`ipylb engine add -n K` adds engines to a standalone cluster, rc.add_engines(K) too"
# rc.shutdown() of a client that did not start its cluster says so once per process.
_said_shutdown_disconnects = False
_live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for c in list(_live_clients):
        c.shutdown() if c._local is not None else c.close()


class Results(Mapping):
    """``rc.results``: msg_id -> value (or the error as an exception object) for the
    finished tasks in the client's cache; values are unpickled when read."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getitem__(self, msg_id: str) -> Any:
        outcome = self._client._outcomes[msg_id]
        return outcome.value(self._client) if outcome.ok else outcome.error()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._client._outcomes))

    def __len__(self) -> int:
        return len(self._client._outcomes)


def _epoch_query(query: Any) -> Any:
    """A db_query with datetimes as seconds since the epoch (what the controller keeps)."""
    if not isinstance(query, dict):
        return query  # the controller says what is wrong with it

    def conv(v: Any) -> Any:
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, (list, tuple, set, frozenset)):
            return [conv(x) for x in v]
        return v

    return {k: {op: conv(v) for op, v in t.items()} if isinstance(t, dict) else conv(t)
            for k, t in query.items()}


def _engine_list(targets: Any, registered: list[int]) -> list[int]:
    """Engine ids from ``targets`` (an int or an iterable of ints); IndexError names any
    that is not registered (as ipyparallel), TypeError anything that is not an id."""
    ids = [targets] if isinstance(targets, int) else list(targets)
    bad = [t for t in ids if type(t) is not int]
    if bad:
        raise TypeError(f"engine ids are ints, got {bad[0]!r}")
    missing = [t for t in ids if t not in registered]
    if missing:
        raise IndexError(f"no such engine(s): {', '.join(map(str, missing))}; the engines "
                         f"registered now are {registered} (rc.ids)")
    return ids


def _too_big(what: str, n: int, limit: int) -> str:
    return (f"{what} pickled to a frame of {n} bytes, over the cluster's limit of {limit} bytes "
            "(`ipylb cluster start --max-frame-mb`); on the controller's machine, arrays and "
            "bytes go through shared memory instead: pass large data as numpy arrays or bytes")


def _as_list(jobs: Any) -> list[Any]:
    if isinstance(jobs, (str, AsyncResult, Future)) or not isinstance(jobs, Iterable):
        return [jobs]
    return list(jobs)


def _msg_ids(jobs: Any, history: list[str] | None = None) -> list[str]:
    """msg_ids of AsyncResults and/or msg_id strings (and, given ``history``, ints:
    indices into it, as ipyparallel)."""
    out: list[str] = []
    for job in _as_list(jobs):
        if isinstance(job, AsyncResult):
            out.extend(job.msg_ids)
        elif isinstance(job, str):
            out.append(job)
        elif history is not None and type(job) is int:
            try:
                out.append(history[job])
            except IndexError:
                raise IndexError(f"job {job}: this client has submitted {len(history)} "
                                 "task(s) (rc.history)") from None
        else:
            raise TypeError(f"expected an AsyncResult or a msg_id string, got {type(job).__name__}")
    return out


def _find_connection_file(url_or_file: str | Path | None, profile: str | None) -> Path:
    if url_or_file is None:
        return connection.profile_file(profile or "default")
    text = str(url_or_file)
    if text.startswith("tcp://"):
        for path in sorted(connection.runtime_dir().glob("ipylb-*.json")):
            try:
                if connection.read(path)["client_url"] == text:
                    return path
            except NoCluster:
                continue
        raise NoCluster(
            f"no connection file in {connection.runtime_dir()} is for {text}: the key is needed "
            "too; pass the cluster's connection file (ipylb-<profile>.json) instead of its url"
        )
    return Path(text)

