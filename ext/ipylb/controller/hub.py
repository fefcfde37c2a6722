"""The controller's I/O shell: sockets in, scheduler core, sockets out.

Two ROUTER sockets: one for clients, one for engines.  Every message is checked
(:mod:`ipylb.wire`), turned into an event for the pure scheduler core
(:mod:`ipylb.core`), and the core's commands are carried out.  The controller never
unpickles task payloads: it forwards the producer's buffers and their MAC untouched.

This module holds the state and the main loop; each concern is a part of its own, mixed
into :class:`Controller` (its methods are the controller's own, looked up once per
type: the hot path pays nothing for the split):

- :mod:`.clients`: what clients send (hello, submissions, requests);
- :mod:`.engines`: what engines send (registration, results, reports) and their end;
- :mod:`.dispatch`: the core's commands carried out, what leaves batched per peer;
- :mod:`.requests`: the answers to clients' requests (queue status, get_result, ...);
- :mod:`.live`: live output of running tasks;
- :mod:`.housekeeping`: periodic chores (engine liveness, parent watch, forgetting).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from .. import compat, connection, shm, wire
from ..core import events as ev
from ..core.pipeline import DEFAULT_HWM
from ..core.scheduler import Scheduler
from .activity import Activity
from .clients import ClientTraffic
from .dispatch import Dispatch
from .engines import EngineTraffic, _remove
from .heartbeat import Heartbeats
from .housekeeping import FORGET_SWEEP_S, HOUSEKEEPING_S, Housekeeping
from .launcher import EngineLauncher
from .live import LiveOutput
from .records import Function, TaskStore
from .requests import Requests

log = logging.getLogger("ipylb.controller")

# Peers (clients, engines) not heard from for this long are forgotten: their replay state
# (wire.Signer.forget_idle: a floor keeps their old messages refused) and, for a client, its
# place among the listeners.  Live clients ping when idle, live engines answer for their
# tasks, so only the gone are forgotten.  Hosts' clocks must agree within this (see wire.py).
FORGET_AFTER_S = 300.0
# While draining a socket, what the messages handled so far made is sent this often (in
# messages handled), so a long drain (thousands of submissions) holds nothing back for long.
FLUSH_EVERY = 64
# The largest frame a peer may send (bytes): zmq reads a frame's size before its bytes and
# disconnects a peer that announces more, so nobody, authenticated or not, makes us buffer
# a bigger one.  Clients and engines check their frames against it before sending (it is in
# the connection file); large arrays between processes of this machine go through shared
# memory and are not frames at all.  ``ipylb cluster start --max-frame-mb`` changes it.
MAX_FRAME_BYTES = 256 << 20


class Controller(ClientTraffic, EngineTraffic, Dispatch, LiveOutput, Housekeeping, Requests):
    """Runs one cluster: scheduler core, task records, engine and client sockets."""

    def __init__(
        self,
        key: bytes,
        ip: str = "127.0.0.1",
        scheme: str = "leastload",
        hwm: int | str = DEFAULT_HWM,
        launcher: EngineLauncher | None = None,
        parent_pid: int | None = None,
        heartbeat_timeout: float = 10.0,
        store: TaskStore | None = None,
        location: str | None = None,
        curve: bool = False,
        walltime_grace: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        forget_after: float = FORGET_AFTER_S,
        ports: tuple[int, int] = (0, 0),
    ) -> None:
        """``ip``: the address to listen on (``0.0.0.0``: every interface); ``location``:
        the host name or address written into urls for other hosts (default: this host's
        routable address when ``ip`` is a wildcard); ``curve``: encrypt the two sockets
        with CurveZMQ under a key pair made for this run (HMAC signing stays); ``ports``:
        the client and engine ports (0: any free one)."""
        self.ctx = zmq.Context.instance()
        # A fresh name each run: messages recorded in an earlier run are not for us.
        nonce = os.urandom(8).hex()
        self.ident = f"controller-{nonce}".encode()
        # Large buffers between processes that share our /dev/shm travel as segments we own.
        self.shm_domain = shm.domain()
        self.shm_prefix = shm.controller_prefix(nonce) if self.shm_domain else None
        if self.shm_prefix:
            shm.sweep_stale()
        self.signer = wire.Signer(key, self.ident, shm_prefix=self.shm_prefix, owns_segments=True,
                                  open_kinds=frozenset({wire.PROBE}))
        # Peers that cannot map our segments (another machine): they get the bytes inline.
        self.remote: set[bytes] = set()
        self._next_orphan_sweep = 0.0
        # "pure" is plain least-load with nothing per task but the routing: no dependencies,
        # retries or timeouts (refused at submission); with hwm=0, no limit on each engine's
        # pipeline either (the fastest path).
        self.core = Scheduler(scheme="leastload" if scheme == "pure" else scheme, hwm=hwm,
                              walltime_grace=walltime_grace)
        self.scheme, self.hwm = scheme, hwm
        # hwm="auto": tasks sent to each engine are numbered (1, 2, ...) so that its answer
        # to a steal is exact (see ipylb.engine.steal); the number of each task at its engine.
        self._auto = hwm == "auto"
        self._sent: dict[int, int] = {}
        self._numbers: dict[str, int] = {}
        self.store = store if store is not None else TaskStore()
        self.store.inline = self.signer.inline
        self.launcher = launcher
        self.parent_pid = parent_pid
        # CurveZMQ: peers know our public key from the connection file; theirs are not
        # checked (no ZAP handler): who may talk is decided by the HMAC key, as without curve.
        self.curve_public, self._curve_secret = zmq.curve_keypair() if curve else (None, None)
        self.max_frame_bytes = max_frame_bytes
        self.forget_after = forget_after
        self._forget_sweep = min(FORGET_SWEEP_S, forget_after / 4)
        self._next_forget = time.monotonic() + self._forget_sweep
        self.clients = self._router(ip, ports[0])
        self.engines = self._router(ip, ports[1])
        self.engines.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.client_url = connection.connect_url(
            self.clients.getsockopt_string(zmq.LAST_ENDPOINT), location)
        self.engine_url = connection.connect_url(
            self.engines.getsockopt_string(zmq.LAST_ENDPOINT), location)
        self.poller = zmq.Poller()
        self.heartbeats = Heartbeats(self.ctx, timeout=heartbeat_timeout)
        self.engine_ident: dict[int, bytes] = {}
        self.engine_of: dict[bytes, int] = {}
        self.engine_info: dict[int, dict[str, Any]] = {}
        self.activity = Activity()  # for the dashboard and `ipylb top`
        # Engines another process started (`ipylb engine join`) and interrupts for us: their
        # tag -> that process's client (its receiving socket), which is sent the requests.
        self.relays: dict[str, bytes] = {}
        self.listeners: set[bytes] = set()  # client receive sockets that said hello
        # Results not sent yet, per client, and tasks not sent yet, per engine ident: sent
        # after each drain of a socket, and before the main loop waits (see _flush_out).
        self._outbox: dict[bytes, list[tuple[Any, list[Any], bytes]]] = {}
        self._tasks_out: dict[bytes, list[tuple[Any, list[Any], bytes]]] = {}
        # Messages received from clients and engines, by kind (wire.SUBMIT, DONE, DONES...).
        self.received: Counter[int] = Counter()
        # Task functions by key, as long as a record holds them; and per engine, the keys of
        # the functions it holds (with their sizes), least recently used first.
        self.functions: weakref.WeakValueDictionary[bytes, Function] = \
            weakref.WeakValueDictionary()
        self.held: dict[int, OrderedDict[bytes, int]] = {}
        # The version handshake (ipylb.compat): ours, and the clients refused (by the prefix
        # their two sockets share), whose submissions are dropped unread.
        self.versions = compat.versions()
        self.refused: set[bytes] = set()
        self._next_engine = 0
        self._running = True  # until asked to stop, which may happen before run()
        # The attempt whose TaskDone the core is handling: (msg_id, result, bufs, mac).
        self._arrived: tuple[str, tuple, list[Any], bytes] | None = None
        self.stop_reason = "it was stopped"  # what clients are told when it stops
        self._requests: dict[str, Callable[[bytes, Any], Any]] = {
            "queue_status": self._req_queue_status,
            "abort": self._req_abort,
            "shutdown": self._req_shutdown,
            "story": lambda _c, task_id: self.core.story(task_id),
            "engine_info": lambda _c, _a: dict(self.engine_info),
            "interrupt": self._req_interrupt,
            "interrupt_tasks": self._req_interrupt_tasks,
            "relay_interrupts": self._req_relay_interrupts,
            "add_engines": self._req_add_engines,
            "get_result": self._req_get_result,
            "resubmit": self._req_resubmit,
            "purge": self._req_purge,
            "db_query": self._req_db_query,
            "hub_history": lambda _c, _a: [r["msg_id"] for r in self.store.query([], ["msg_id"])],
            "redeliver": self._req_redeliver,
            "ping": lambda _c, _a: None,  # a client's liveness check
            "validate": lambda _c, _a: self.validate(),
            "activity": self._req_activity,
            "stream": self._req_stream,
            "stats": self._req_stats,
        }
        # Live output: the clients that want it, by pending msg_id (see _req_stream).
        self.live: dict[str, set[bytes]] = {}
        self._next_live_prune = 0.0

    def _router(self, ip: str, port: int = 0) -> zmq.Socket:
        # tcp even on one machine: measured here, an 8 MB message crosses a unix socket
        # 2.5x slower than tcp loopback.
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        if self._curve_secret is not None:
            s.curve_server = True
            s.curve_secretkey = self._curve_secret
        if ":" in ip:  # an IPv6 address (or ::)
            s.setsockopt(zmq.IPV6, 1)
            ip = f"[{ip.strip('[]')}]"
        s.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        s.bind(f"tcp://{ip}:{port}")
        return s

    # -- main loop ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until asked to shut down (or the parent process is gone)."""
        poller = self.poller
        poller.register(self.clients, zmq.POLLIN)
        poller.register(self.engines, zmq.POLLIN)
        for sock in self.heartbeats.socks:  # one socket for every engine (or two: curve)
            poller.register(sock, zmq.POLLIN)
        next_housekeeping = 0.0
        while self._running:
            now = time.monotonic()
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + HOUSEKEEPING_S
            wake = next_housekeeping
            deadline = self.core.next_deadline()
            if deadline is not None:
                if deadline <= now:
                    self._execute(self.core.handle(ev.Tick(now)))
                    continue
                wake = min(wake, deadline)
            if self._tasks_out or self._outbox:  # what housekeeping or a deadline made
                self._flush_out()
            ready = dict(poller.poll(max(0.0, wake - now) * 1000))
            if self.engines in ready:
                self._drain(self.engines, self._on_engine)
            if self.clients in ready:
                self._drain(self.clients, self._on_client)
            if len(ready) > (self.engines in ready) + (self.clients in ready):  # a heartbeat one
                self.heartbeats.answered(now)
        self.close()

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[Any]], None]) -> None:
        """Handle the messages waiting on ``sock`` (at most 1000, then the other socket has
        a turn); what they make (tasks for engines, results for clients) leaves batched,
        one message per peer, every ``FLUSH_EVERY`` messages and at the end."""
        recv = wire.recv
        for n in range(1, 1001):
            try:
                frames = recv(sock)
            except zmq.Again:
                break
            try:
                handler(frames)
            except wire.WireError as e:
                log.warning("dropped a message from %r: %s", bytes(frames[0]), e)
            except Exception:
                log.exception("error handling a message from %r", bytes(frames[0]))
            if not n % FLUSH_EVERY and (self._tasks_out or self._outbox):
                self._flush_out()
        if self._tasks_out or self._outbox:
            self._flush_out()

    # -- shutdown ----------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """End the main loop; ``reason`` is what clients are told (they fail what they
        still wait for with ControllerGone instead of waiting in vain)."""
        self.stop_reason = reason
        self._running = False

    def close(self) -> None:
        """Tell clients we stop, stop every engine this controller launched, close the sockets."""
        self._flush_out()
        self._broadcast(("shutdown", self.stop_reason))
        if self.launcher is not None:
            self.launcher.stop_all()
        for info in self.engine_info.values():  # engines stopped now: their idle watchdogs'
            if info.get("watchdog"):  # files (guard.IdleWatchdog), else left in the runtime dir
                _remove(info["watchdog"])
        for ident in list(self.engine_ident.values()):
            try:
                wire.send(self.engines, [ident, *self.signer.pack(wire.STOP, None, to=ident)])
            except zmq.ZMQError:
                pass
        self.clients.close(linger=1000)  # the shutdown events, at most a second more
        self.engines.close(0)
        self.heartbeats.close()
        if self.store.db is not None:
            self.store.db.close()
        shm.sweep(self.shm_prefix)  # records' segments, and any a producer wrote but never sent


def stop_on_signals(controller: Controller) -> None:
    """SIGTERM/SIGINT end the main loop cleanly, so engines are stopped too."""

    def handler(signum: int, _frame: Any) -> None:
        controller.stop(f"it received {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
