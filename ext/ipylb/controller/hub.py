"""The controller's I/O shell: sockets in, scheduler core, sockets out.

Two ROUTER sockets: one for clients (each client connects two DEALERs: ``<id>s``
to submit and ask, ``<id>r`` to receive), one for engines.  Every message is
checked (:mod:`ipylb.wire`), turned into an event for the pure scheduler core
(:mod:`ipylb.core`), and the core's commands are carried out here.  The
controller never unpickles task payloads: it forwards the producer's buffers and
their MAC untouched.  The answers to clients' requests (queue status, activity,
get_result, resubmit, db_query, purge, abort, ...) are in :mod:`.requests`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .. import compat, connection, shm, wire
from ..core import events as ev
from ..core.scheduler import Scheduler
from ..error import PURE_REFUSES
from .activity import Activity
from .heartbeat import Heartbeats
from .launcher import EngineLauncher
from .records import Function, Record, TaskStore
from .requests import Requests

log = logging.getLogger("ipylb.controller")

# What an engine keeps of the task functions it was sent (the controller decides, see
# Controller._send_function): at most this many, and this many bytes, least recent dropped.
FUNCTIONS_HELD = 32
FUNCTION_BYTES_HELD = 512 << 20

# Housekeeping (engine liveness, parent watch) runs at least this often.
HOUSEKEEPING_S = 0.25
# Watches of finished tasks (live output) are forgotten this often (seconds); till then
# they cost nothing but memory: a report for a task not assigned is dropped anyway.
LIVE_PRUNE_S = 5.0
# Shared-memory segments nobody owns (their producer died before sending them, or a client
# never claimed its link) are removed this long after they were written, checked this often.
ORPHAN_GRACE_S = 300.0
ORPHAN_SWEEP_S = 60.0
# Peers (clients, engines) not heard from for this long are forgotten: their replay state
# (wire.Signer.forget_idle: a floor keeps their old messages refused) and, for a client, its
# place among the listeners.  Live clients ping when idle, live engines answer for their
# tasks, so only the gone are forgotten.  Hosts' clocks must agree within this (see wire.py).
FORGET_AFTER_S = 300.0
# Results for one client that finish within one drain of the engines' socket leave as one
# RESULTS message (wire.batch), at most this many per message; a lone result is a RESULT.
RESULTS_BATCH = 256
# While draining a socket, what the messages handled so far made is sent this often (in
# messages handled), so a long drain (thousands of submissions) holds nothing back for long.
FLUSH_EVERY = 64
FORGET_SWEEP_S = 30.0
# The largest frame a peer may send (bytes): zmq reads a frame's size before its bytes and
# disconnects a peer that announces more, so nobody, authenticated or not, makes us buffer
# a bigger one.  Clients and engines check their frames against it before sending (it is in
# the connection file); large arrays between processes of this machine go through shared
# memory and are not frames at all.  ``ipylb cluster start --max-frame-mb`` changes it.
MAX_FRAME_BYTES = 256 << 20
# What a registration may carry, and the types of the fields (others are kept as they come);
# pid and heartbeat are required: an engine nobody can watch could hold its tasks forever.
_REGISTER_FIELDS = {"connection_file": str, "pid": int, "hostname": str, "tag": str,
                    "heartbeat": str, "heartbeat_key": (str, type(None)),
                    "shm_domain": (str, type(None))}
_REGISTER_REQUIRED = ("pid", "heartbeat")


class Controller(Requests):
    """Runs one cluster: scheduler core, task records, engine and client sockets."""

    def __init__(
        self,
        key: bytes,
        ip: str = "127.0.0.1",
        scheme: str = "leastload",
        hwm: int | str = 1,
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
            "messages": lambda _c, _a: dict(self.received),
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

    def _housekeeping(self, now: float) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("parent process %s is gone: shutting down", self.parent_pid)
            self.stop(f"the process that started it (pid {self.parent_pid}) is gone")
            return
        if self.live and now >= self._next_live_prune:
            self._prune_live()
            self._next_live_prune = now + LIVE_PRUNE_S
        if now >= self._next_forget:
            self._forget_idle_peers()
            self._next_forget = now + self._forget_sweep
        if self.shm_prefix and now >= self._next_orphan_sweep:
            shm.sweep_orphans(self.shm_prefix, ORPHAN_GRACE_S)
            self._next_orphan_sweep = now + ORPHAN_SWEEP_S
        # Before an engine's death fails (or re-runs) its task: a result it sent just before
        # may still wait in our socket, so take what is there first.
        if self.launcher is not None:
            dead = self.launcher.poll_dead()
            if dead:
                self._drain(self.engines, self._on_engine)
            for engine_id, reason, fate in dead:
                restarting = fate == "restarting it"
                if engine_id is not None:
                    self._engine_gone(engine_id, f"{reason}; restarting it" if restarting else reason,
                                      now)
                elif restarting:
                    log.warning("%s; restarting it", reason)
                else:
                    self._broadcast(("engine_failed", reason))
                if fate == "down":  # jupyter_client's restarter gave up on the slot
                    log.error("an engine stays down: %s", reason)
                    self._broadcast(("engine_down", reason))
                    self._check_stranded()
        silent = self.heartbeats.tick(now)
        if silent:
            self._drain(self.engines, self._on_engine)
        for engine_id, reason in silent:
            km = self.launcher.manager(engine_id) if self.launcher is not None else None
            if km is None or not self.launcher.autorestart:  # type: ignore[union-attr]
                self._engine_gone(engine_id, reason, now)
                if km is not None:  # ours but hung: make sure it is really gone
                    km.shutdown_kernel(now=True)
                continue
            failed = self.launcher.restart(engine_id)  # type: ignore[union-attr]  # hung: a new kernel
            self._engine_gone(engine_id, f"{reason}; {failed or 'restarting it'}", now)
            if failed:
                self._broadcast(("engine_down", f"engine {engine_id}: {failed}"))

    # -- engines -----------------------------------------------------------------

    def _on_engine(self, frames: list[Any]) -> None:
        ident = frames[0].bytes
        kind, sender, meta, bufs, bufs_mac = self.signer.unpack(frames[1:])
        self.received[kind] += 1
        if kind == wire.DONE:
            self._on_done(ident, meta, bufs, bufs_mac)
        elif kind == wire.DONES:  # results finished back to back, each under its own MAC
            for item in wire.unbatch(meta, bufs):
                try:
                    self._on_done(ident, *item)
                except wire.WireError as e:  # one bad entry: the others still count
                    log.warning("dropped a result from %r: %s", ident, e)
        elif kind == wire.STARTED:
            engine_id = self.engine_of.get(ident)
            if engine_id is None or not isinstance(meta, str):
                raise wire.WireError("a start report from an unregistered engine, or without a msg_id")
            self._execute(self.core.handle(ev.TaskStarted(meta, engine_id, time.monotonic())))
        elif kind == wire.REGISTER:
            self._on_register(ident, meta)
        elif kind == wire.PROBE:  # `ipylb engine join --url`: what a joining engine needs
            about = {"nonce": meta, "controller_id": self.ident.decode(),
                     "client_url": self.client_url, "engine_url": self.engine_url,
                     "curve_serverkey": self.curve_public.decode() if self.curve_public else None}
            wire.send(self.engines, [ident, *self.signer.pack(wire.ABOUT, about, to=sender)])
        elif kind == wire.STOLEN:  # an engine's answer to a STEAL, from its own steal socket
            if not sender.endswith(b"/steal") or type(meta) is not tuple or len(meta) != 2 \
                    or type(meta[0]) is not str or type(meta[1]) is not bool:
                raise wire.WireError("a malformed steal answer")
            engine_id = self.engine_of.get(sender.removesuffix(b"/steal"))
            if engine_id is None:  # from an engine declared dead since: its tasks moved on
                return
            self._execute(self.core.handle(ev.StealAnswered(meta[0], engine_id, meta[1],
                                                            time.monotonic())))
        elif kind == wire.HEALTH:  # signed by the engine's own health socket
            engine_id = self.engine_of.get(sender.removesuffix(b"/health"))
            if engine_id is not None and sender.endswith(b"/health") and type(meta) is tuple \
                    and len(meta) == 4:
                cpu, rss, task, since = meta
                self.activity.health[engine_id] = {"cpu": cpu, "rss": rss, "task": task,
                                                   "since": since}
                if task in self.live:  # (repeated each report: a lost request is no loss)
                    self._watch(sender, task)
        elif kind == wire.OUTPUT:
            self._on_output(sender, meta)
        elif kind == wire.LEAVING:  # after its last answer: a task left it unfit to serve
            engine_id = self.engine_of.get(ident)
            if engine_id is not None and type(meta) is tuple and len(meta) == 2 \
                    and isinstance(meta[0], str):
                self._restart_engine(engine_id, meta[0][:2000], idle=meta[1] is True)
        else:
            raise wire.WireError(f"unexpected message kind {kind!r} on the engine socket")

    # -- live output (issue 15) ----------------------------------------------------

    def _watch(self, health: bytes, msg_id: str) -> None:
        """Ask an engine (its health socket) for the live output of the task it runs."""
        try:
            wire.send(self.engines, [health, *self.signer.pack(wire.WATCH, msg_id, to=health)])
        except zmq.ZMQError:  # its health socket is gone: its engine's end is noticed elsewhere
            pass

    def _on_output(self, sender: bytes, meta: Any) -> None:
        """A watched task's new output: an EVENT ``("output", msg_id, (stdout, end),
        (stderr, end), started)`` to each client that asked for it (ends are character
        positions in the text of the task's streams, as its result will carry it; started:
        the attempt's start stamp, as its result will carry it), nothing once the task has
        finished.  Only the engine the task is assigned to speaks for it: a report from any
        other socket is dropped."""
        engine_id = self.engine_of.get(sender.removesuffix(b"/health"))
        if not (engine_id is not None and sender.endswith(b"/health")
                and type(meta) is tuple and len(meta) == 4 and type(meta[0]) is str
                and type(meta[3]) is float
                and all(type(m) is tuple and len(m) == 2 and type(m[0]) is str
                        and type(m[1]) is int for m in meta[1:3])):
            raise wire.WireError("a malformed live output report, or one from no engine")
        clients = self.live.get(meta[0])
        if not clients or self.core.engine_of(meta[0]) != engine_id:
            return  # nobody asked, the task has ended, or it is not this engine's
        for client in clients:  # type: ignore[union-attr]
            if client in self.listeners:
                self._send_client(client, wire.EVENT, ("output", *meta))

    def _prune_live(self) -> None:
        """Forget watches of tasks that have finished (or were purged)."""
        for msg_id in [m for m in self.live if (r := self.store.records.get(m)) is None
                       or r.result is not None]:
            del self.live[msg_id]

    def _forget_idle_peers(self) -> None:
        """Forget peers not heard from for ``forget_after`` s: replay state, listener place."""
        for sender in self.signer.forget_idle(self.forget_after):
            prefix = sender[:-1]  # a client's two sockets: <prefix>s and <prefix>r
            if prefix in self.refused and not (self.signer.knows(prefix + b"s")
                                               or self.signer.knows(prefix + b"r")):
                self.refused.discard(prefix)  # its messages are refused by the floor now
            if sender in self.listeners:
                self.listeners.discard(sender)
                self.remote.discard(sender)
                log.info("forgot client %r: not heard from for %.0f s", sender, self.forget_after)

    def _on_register(self, ident: bytes, meta: dict[str, Any]) -> None:
        # Checked before any state changes: no ghost engine, no engine half registered.
        if not isinstance(meta, dict):
            raise wire.WireError(f"a registration without engine info ({type(meta).__name__})")
        refusal = compat.mismatch(
            self.versions, meta.get("versions"), "the cluster's controller",
            f"an engine (pid {meta.get('pid')} on {meta.get('hostname')})")
        if refusal is not None:  # whoever started it (launcher, `ipylb engine join`) hears why
            log.warning("refused an engine: %s", refusal)
            wire.send(self.engines, [ident, *self.signer.pack(wire.REFUSED, refusal, to=ident)])
            self._broadcast(("engine_refused", refusal))
            if self.launcher is not None:  # a restart would be refused again
                self.launcher.no_restart(meta.get("tag", ""))
            return
        bad = [k for k, t in _REGISTER_FIELDS.items() if k in meta and not isinstance(meta[k], t)]
        bad += [k for k in _REGISTER_REQUIRED if not meta.get(k)]
        if bad:
            raise wire.WireError(f"a registration with missing or malformed field(s) "
                                 f"{', '.join(bad)}")
        if ident in self.engine_of:
            raise wire.WireError(f"engine {self.engine_of[ident]} registered a second time")
        engine_id = self._next_engine
        try:  # every engine is watched: one that stops answering is dead after heartbeat_timeout
            self.heartbeats.add(engine_id, meta["heartbeat"], time.monotonic(),
                                meta.get("heartbeat_key"))
        except zmq.ZMQError as e:
            raise wire.WireError(f"a registration with a heartbeat url zmq refuses: {e}") from None
        self._next_engine += 1
        self.engine_ident[engine_id] = ident
        self.held[engine_id] = OrderedDict()
        self.engine_of[ident] = engine_id
        self.engine_info[engine_id] = meta
        self._note_domain(ident, meta.get("shm_domain"))
        if self.launcher is not None:
            restarts = self.launcher.registered(meta.get("tag", ""), engine_id)
            if restarts is not None:
                meta["restarts"] = restarts  # of its slot before it: engine_info() shows it
        wire.send(self.engines, [ident, *self.signer.pack(wire.REGISTERED, engine_id, to=ident)])
        log.info("engine %d registered (pid %s)", engine_id, meta.get("pid"))
        # A delta, not the list: n registrations cost O(n) messages' worth, not O(n^2).
        self._broadcast(("engine_added", engine_id))
        self._execute(self.core.handle(ev.EngineAdded(engine_id, time.monotonic())))

    def _engine_gone(self, engine_id: int, reason: str, now: float, idle: bool = False) -> None:
        ident = self.engine_ident.pop(engine_id, None)
        if ident is None:
            return
        self.held.pop(engine_id, None)
        self._sent.pop(engine_id, None)
        self._tasks_out.pop(ident, None)  # never sent: the core puts them back in the queue
        del self.engine_of[ident]
        self.remote.discard(ident)
        info = self.engine_info.pop(engine_id, None)
        if info is not None and self.relays:
            self.relays.pop(info.get("tag"), None)
        self.activity.forget(engine_id)
        self.heartbeats.remove(engine_id)
        log.warning("engine %d is gone: %s", engine_id, reason)
        if not self.engine_ident and self.launcher is not None and self.launcher.pending:
            self._broadcast(("restarting", len(self.launcher.pending)))  # before "no engines"
        self._execute(self.core.handle(ev.EngineRemoved(engine_id, reason, now, idle)))
        # After its tasks' failures: a client that sees the engine gone sees them failed.
        self._broadcast(("engine_removed", engine_id))
        self._check_stranded()

    def _check_stranded(self) -> None:
        """No engine is left, and none is being restarted: tell clients, rather than let
        their tasks wait in silence."""
        if self.engine_ident or (self.launcher is not None and self.launcher.pending):
            return
        waiting = self.core.queue_status()["unassigned"]
        if waiting:
            self._broadcast(("stranded", waiting))

    def _on_done(self, ident: bytes, meta: tuple, bufs: list[Any], bufs_mac: bytes) -> None:
        engine_id = self.engine_of.get(ident)
        if engine_id is None:
            raise wire.WireError(f"a result from an unregistered engine {ident!r}")
        if type(meta) is not tuple or len(meta) < 7 or type(meta[0]) is not str:
            raise wire.WireError("a malformed result")
        msg_id, status = meta[0], meta[1]
        rec = self.store.get(msg_id)
        if rec is None:
            raise wire.WireError(f"a result for unknown task {msg_id!r}")
        now = time.monotonic()
        if status == "unmet":
            error = meta[6] if len(meta) > 6 else None
            reason = str(error[1]) if isinstance(error, tuple) and len(error) > 1 else ""
            self._execute(self.core.handle(ev.TaskUnmet(msg_id, engine_id, now, reason[:500])))
            return
        started, ended = meta[2], meta[3]
        ran = ended - started if type(started) is float and type(ended) is float else None
        self._attempt_ended(rec, engine_id, status == "ok", (engine_id, *meta[1:], rec.submitted),
                            bufs, bufs_mac, now, ran, status == "aborted")

    def _attempt_ended(self, rec: Record, engine_id: int, ok: bool, result: tuple,
                       bufs: list[Any], mac: bytes, now: float, ran: float | None = None,
                       skipped: bool = False) -> None:
        """An attempt of ``rec`` ended on an engine (``ran``: seconds it ran there, by the
        engine's clock, if known; ``skipped``: the engine did not run it, a CANCEL came
        first).  Its result becomes the task's only if
        the core says it is final (a Deliver): a failed attempt with retries left, and a
        stale or repeated report, leave the record as it was, pending until its last
        attempt ends (issue 9: a task waiting for its retry is not finished anywhere)."""
        self._arrived = (rec.msg_id, result, bufs, mac)
        try:
            self._execute(self.core.handle(ev.TaskDone(rec.msg_id, engine_id, ok, now, ran,
                                                       skipped)))
        finally:
            self._arrived = None

    # -- clients -----------------------------------------------------------------

    def _on_client(self, frames: list[Any]) -> None:
        ident = frames[0].bytes
        kind, _sender, meta, bufs, bufs_mac = self.signer.unpack(frames[1:])
        self.received[kind] += 1
        if kind == wire.SUBMIT:
            if self.refused and ident[:-1] in self.refused:
                raise wire.WireError("a submission from a client refused at its hello")
            self._on_submit(ident, meta, bufs, bufs_mac)
        elif kind == wire.REQUEST:
            if type(meta) is not tuple or len(meta) != 3 or type(meta[1]) is not str:
                raise wire.WireError("a malformed request")
            req_id, op, arg = meta
            reply_to = ident[:-1] + b"r"
            if ident == reply_to and ident not in self.listeners:
                # A receiving socket's ping: it listens again after it was forgotten, and
                # gets the whole engine list (it missed the added/removed events meanwhile).
                self.listeners.add(ident)
                self._send_client(ident, wire.EVENT, ("engines", self._engine_list()))
            try:
                value, ok = self._requests[op](reply_to, arg), True
            except Exception as e:  # a KeyError's str() is its repr: send the message itself
                text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                value, ok = (type(e).__name__, str(text)), False
            self._send_client(reply_to, wire.REPLY, (req_id, ok, value))
        elif kind == wire.HELLO:
            theirs = meta.get("versions") if isinstance(meta, dict) else None
            refusal = compat.mismatch(self.versions, theirs, "the cluster's controller",
                                      "this client")
            if refusal is not None:
                log.warning("refused a client: %s", refusal)
                self.refused.add(ident[:-1])
                self._send_client(ident, wire.WELCOME, {"refused": refusal,
                                                        "versions": self.versions})
                return
            self.listeners.add(ident)
            self._note_domain(ident, meta.get("shm_domain") if isinstance(meta, dict) else None)
            info = {"engines": self._engine_list(), "scheme": self.scheme, "hwm": self.hwm,
                    "versions": self.versions}
            self._send_client(ident, wire.WELCOME, info)
        elif kind == wire.BYE:  # a client closed: stop telling it about engines
            self.listeners.discard(ident)
            self.remote.discard(ident)
        else:
            raise wire.WireError(f"unexpected message kind {kind!r} on the client socket")

    def _on_submit(self, ident: bytes, meta: tuple, bufs: list[Any], _mac: bytes) -> None:
        """One or more tasks sharing a function (its frames first); each task carries
        the MAC of its argument frames."""
        if type(meta) is not tuple or len(meta) != 4 or type(meta[2]) is not list \
                or type(meta[1]) is not tuple or len(meta[1]) != 3:
            raise wire.WireError("a malformed submission")
        flags, (nf, fkey, fmac), tasks, tag = meta
        if type(nf) is not int or not 1 <= nf <= len(bufs) or type(fkey) is not bytes \
                or type(fmac) is not bytes:
            raise wire.WireError("malformed function frames in a submission")
        # (label, function name), shared by the submission's tasks
        label, func = tag if type(tag) is tuple and len(tag) == 2 else (None, None)
        client = ident[:-1] + b"r"
        try:
            _check_flags(flags)
            if not (label is None or type(label) is str) or type(func) is not str \
                    or len(func) > 200 or (label is not None and len(label) > 200):
                raise wire.WireError("a malformed label or function name in a submission")
        except wire.WireError as e:
            self._refuse(client, tasks, str(e))
            raise
        bufs = wire.detach(bufs)  # kept in records: pin no receive buffer
        fn, charge = self.functions.get(fkey), 0
        if fn is None:  # a function we hold already keeps its frames: these are dropped
            fn = self.functions[fkey] = Function(fkey, bufs[:nf], fmac)
            charge = fn.nbytes
        pos, end = nf, len(bufs)
        now = time.monotonic()
        for k, task in enumerate(tasks):
            # Each task checked before it is kept (those before a malformed one are valid;
            # it and those after it are refused).
            if type(task) is not tuple or len(task) != 3 or type(task[0]) is not str \
                    or type(task[1]) is not int or not 0 <= task[1] <= end - pos \
                    or type(task[2]) is not bytes:
                why = f"a malformed task in a submission ({task!r:.80})"
                self._refuse(client, tasks[k:], why)
                raise wire.WireError(why)
            msg_id, nargs, task_mac = task
            task_bufs = bufs[pos:pos + nargs]
            pos += nargs
            if msg_id in self.store.records:
                log.warning("dropped a task with a duplicate msg_id %r", msg_id)
                continue
            self._new_task(Record(msg_id, client, fn, task_bufs, task_mac, flags, label, func,
                                  charge), now)
            charge = 0

    def _refuse(self, client: bytes, tasks: Any, why: str) -> None:
        """Answer each task of a submission we cannot take with an error result (no record
        is kept), rather than leave its submitter waiting for it."""
        now = time.time()
        for task in tasks if isinstance(tasks, list) else ():
            msg_id = task[0] if isinstance(task, tuple) and task else None
            if isinstance(msg_id, str):
                error = ("WireError", f"the controller refused task {msg_id}: {why} (are the "
                         "client and the cluster running different versions of ipylb?)", "")
                self._send_client(client, wire.RESULT,
                                  (msg_id, None, "error", None, now, "", "", error, now))

    def _new_task(self, rec: Record, now: float) -> None:
        self.store.add(rec)
        flags = rec.flags
        if flags is not None and self.scheme == "pure":
            self._execute([ev.Fail(rec.msg_id, "ImpossibleDependency", PURE_REFUSES)])
            return
        if flags is None:
            event = ev.TaskSubmitted(rec.msg_id, now)
        else:
            event = ev.TaskSubmitted(rec.msg_id, now, **flags)
        self._execute(self.core.handle(event))

    def _note_domain(self, ident: bytes, domain: Any) -> None:
        if self.shm_domain is not None and domain != self.shm_domain:
            self.remote.add(ident)

    def _send_client(self, ident: bytes, kind: int, meta: Any, bufs: list[Any] = (), mac: bytes | None = None) -> None:
        if ident in self._outbox:  # results it is owed go first: messages keep their order
            self._flush_client(ident)
        wire.send(self.clients, [ident, *self.signer.pack(kind, meta, bufs, mac, ident)])

    def _flush_results(self) -> None:
        """Send every client the results waiting for it (one message each)."""
        for client in list(self._outbox):
            self._flush_client(client)

    def _flush_client(self, client: bytes) -> None:
        box = self._outbox.pop(client, None)
        if not box:
            return
        if len(box) == 1:
            self._send_client(client, wire.RESULT, *box[0])
        else:  # one signature for all; each result keeps its engine's MAC over its buffers
            metas, bufs = wire.batch(box)
            self._send_client(client, wire.RESULTS, metas, bufs, b"")

    def _broadcast(self, event: Any) -> None:
        for ident in self.listeners:
            self._send_client(ident, wire.EVENT, event)

    def _engine_list(self) -> list[int]:
        return sorted(self.engine_ident)

    # -- carrying out the core's decisions --------------------------------------

    def _execute(self, commands: list[Any]) -> None:
        unreachable: list[int] = []
        unsendable: list[tuple[ev.Assign, str]] = []
        unasked: list[ev.Steal] = []
        for c in commands:
            t = type(c)
            if t is ev.Assign:
                rec = self.store[c.task_id]
                ident = self.engine_ident[c.engine_id]
                bufs, mac = rec.bufs, rec.bufs_mac
                fkey = rec.fn.key
                held = self.held[c.engine_id]
                try:
                    if fkey in held:
                        held.move_to_end(fkey)
                    elif not self._send_function(c.engine_id, ident, rec.fn, held):
                        unreachable.append(c.engine_id)
                        continue
                    if ident in self.remote:
                        bufs, mac = self.signer.inline(bufs, mac)
                except wire.WireError as e:  # its segment vanished: as an engine would say
                    unsendable.append((c, str(e)))
                    continue
                # A task with a walltime asks its engine to report its start.
                walltime = rec.flags and rec.flags.get("walltime")
                if self._auto:  # numbered (see __init__); 1: report its start
                    n = self._sent[c.engine_id] = self._sent.get(c.engine_id, 0) + 1
                    self._numbers[c.task_id] = n
                    head = (c.task_id, fkey, 1 if walltime else 0, n)
                else:
                    head = (c.task_id, fkey, 1) if walltime else (c.task_id, fkey)
                queued = self._tasks_out.get(ident)
                if queued is None:
                    self._tasks_out[ident] = [(head, bufs, mac)]
                else:
                    queued.append((head, bufs, mac))
            elif t is ev.Deliver:  # only ever in answer to the TaskDone of _attempt_ended
                rec = self.store[c.task_id]
                msg_id, rec.result, rec.result_bufs, rec.result_mac = self._arrived  # type: ignore[misc]
                rec.result_bufs = wire.detach(rec.result_bufs)  # kept: pin no receive buffer
                assert msg_id == c.task_id, (msg_id, c.task_id)
                self._deliver(rec)
            elif t is ev.Fail:
                rec = self.store[c.task_id]
                arrived = self._arrived
                if arrived is not None and arrived[0] == c.task_id:
                    # The verdict on the attempt the engine just reported (its walltime ran
                    # out): keep its times, its output and where it was interrupted.
                    r = arrived[1]
                    tb = r[6][2] if isinstance(r[6], tuple) and len(r[6]) > 2 else ""
                    rec.result = (c.engine_id, "error", r[2], r[3], r[4], r[5],
                                  (c.error, c.message, tb), rec.submitted)
                else:
                    rec.result = (c.engine_id, "error", None, time.time(), "", "",
                                  (c.error, c.message, ""), rec.submitted)
                rec.result_bufs, rec.result_mac = [], b""
                self._deliver(rec)
            elif t is ev.Steal:
                ident = self.engine_ident[c.engine_id]
                if ident in self._tasks_out and not self._send_tasks(ident):  # (sent first)
                    unreachable.append(c.engine_id)
                # its steal socket may not be connected (yet)
                if not self._to_engine(ident + b"/steal", wire.STEAL,
                                       (c.task_id, self._numbers[c.task_id])):
                    unasked.append(c)
            elif t is ev.Cancel:
                ident = self.engine_ident[c.engine_id]
                if not self._to_engine(ident, wire.CANCEL, c.task_id):
                    unreachable.append(c.engine_id)
            elif t is ev.Interrupt:
                self._interrupt_task(c.engine_id, c.task_id)
            elif t is ev.RestartEngine:
                self._restart_engine(c.engine_id, c.reason)
        for engine_id in unreachable:
            self._engine_gone(engine_id, "its connection to the controller is gone",
                              time.monotonic())
        for c in unasked:  # as if it had started: the task stays where it is
            self._execute(self.core.handle(ev.StealAnswered(c.task_id, c.engine_id, False,
                                                            time.monotonic())))
        for c, why in unsendable:
            rec = self.store[c.task_id]
            result = (c.engine_id, "error", None, time.time(), "", "", ("WireError", why, ""),
                      rec.submitted)
            self._attempt_ended(rec, c.engine_id, False, result, [], b"", time.monotonic(),
                                skipped=True)  # it never reached the engine

    def _interrupt_task(self, engine_id: int, task_id: str) -> None:
        """A task's walltime expired: interrupt it on its engine, through the kernel's Jupyter
        control channel (``ipylb_interrupt_request``, served by the engine's control thread
        while the task runs: see ipylb.engine.kernel).  Only that task: the engine checks it
        is still the one running."""
        if not self._interrupt(engine_id, task_id):
            log.warning("task %s passed its walltime on engine %d, which neither this controller "
                        "nor a process relaying its interrupts (`ipylb engine join`) started: "
                        "it cannot be interrupted from here", task_id, engine_id)
            return
        log.info("task %s passed its walltime: interrupting it on engine %d", task_id, engine_id)

    def _interrupt(self, engine_id: int, task_id: str | None) -> bool:
        """Interrupt an engine (``task_id``: only that task, if it still runs) through the
        KernelManager that started it: ours (:meth:`EngineLauncher.interrupt`), or the one
        in the process that relays its interrupts (an EVENT ``("interrupt", engine_id, tag,
        task_id)`` to that process's client, which calls its own launcher's ``interrupt``).
        False if neither exists."""
        if self.launcher is not None and self.launcher.interrupt(engine_id, task_id):
            return True
        tag = self.engine_info.get(engine_id, {}).get("tag")
        relay = self.relays.get(tag) if tag else None
        if relay is None or relay not in self.listeners:
            return False
        self._send_client(relay, wire.EVENT, ("interrupt", engine_id, tag, task_id))
        return True

    def _restart_engine(self, engine_id: int, reason: str, idle: bool = False) -> None:
        """Forget an engine and restart its kernel through jupyter_client (the new kernel
        registers as a new engine): the core gave up on it (its task ignored a walltime
        interrupt), or it asked (LEAVING; ``idle``: it answered every task sent to it).
        An engine we did not start is told to stop instead."""
        ident = self.engine_ident.get(engine_id)
        km = self.launcher.manager(engine_id) if self.launcher is not None else None
        failed = self.launcher.restart(engine_id) if km is not None else None  # type: ignore[union-attr]
        self._engine_gone(engine_id, f"restarted: {reason}", time.monotonic(), idle)
        if failed:
            log.error("engine %d stays down: %s", engine_id, failed)
            self._broadcast(("engine_down", f"engine {engine_id}: {failed}"))
        if km is None and ident is not None:
            log.warning("engine %d was not started by this controller: told to stop, not restarted",
                        engine_id)
            self._to_engine(ident, wire.STOP, None)

    def _send_function(self, engine_id: int, ident: bytes, fn: Function,
                       held: OrderedDict[bytes, int]) -> bool:
        """Send a function's frames to an engine that does not hold it, with the keys of
        the functions it is to drop to stay within ``FUNCTIONS_HELD``/``FUNCTION_BYTES_HELD``
        (least recently used first).  The engine drops only what it is told to, so ``held``
        is exactly what it holds.  False if the engine is unreachable; WireError if a
        segment of the function vanished."""
        bufs, mac = fn.bufs, fn.mac
        if ident in self.remote:
            bufs, mac = self.signer.inline(bufs, mac)
        drop = []
        total = sum(held.values()) + fn.nbytes
        while held and (len(held) >= FUNCTIONS_HELD or total > FUNCTION_BYTES_HELD):
            key, nbytes = held.popitem(last=False)
            drop.append(key)
            total -= nbytes
        held[fn.key] = fn.nbytes
        return self._to_engine(ident, wire.FUNCTION, (fn.key, drop), bufs, mac)

    def _flush_out(self) -> None:
        """Send what this turn of the main loop made: each engine its tasks, each client
        its results (one message each); an engine found unreachable is gone (which may
        assign its tasks elsewhere: those are sent too)."""
        while self._tasks_out or self._outbox:
            for ident in list(self._tasks_out):
                if not self._send_tasks(ident) and ident in self.engine_of:
                    self._engine_gone(self.engine_of[ident],
                                      "its connection to the controller is gone", time.monotonic())
            self._flush_results()

    def _send_tasks(self, ident: bytes) -> bool:
        """Send an engine the tasks assigned to it and not sent yet: one TASK, or one TASKS
        message for several (wire.batch: signed once, each task under its client's MAC).
        False if the engine is unreachable."""
        tasks = self._tasks_out.pop(ident, None)
        if not tasks:
            return True
        if len(tasks) == 1:
            head, bufs, mac = tasks[0]
            frames = self.signer.pack(wire.TASK, head, bufs, mac, ident)
        else:
            metas, bufs = wire.batch(tasks)
            frames = self.signer.pack(wire.TASKS, metas, bufs, b"", ident)
        return self._send_engine(ident, frames)

    def _to_engine(self, ident: bytes, kind: int, meta: Any, bufs: Sequence[Any] = (),
                   mac: bytes | None = None) -> bool:
        """Send an engine one message; False if it has disconnected (it is then treated as
        dead).  Its tasks not sent yet go first, and this is signed after them: messages
        keep their order, and their sequence numbers grow (wire's replay rule)."""
        if ident in self._tasks_out and not self._send_tasks(ident):
            return False
        return self._send_engine(ident, self.signer.pack(kind, meta, bufs, mac, ident))

    def _send_engine(self, ident: bytes, frames: list[Any]) -> bool:
        try:
            wire.send(self.engines, [ident, *frames])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return False
        return True

    def _deliver(self, rec: Record) -> None:
        r = rec.result
        if self._auto:
            self._numbers.pop(rec.msg_id, None)
        self.activity.finished(r[0], r[2], r[3], r[1] == "ok", rec.label or rec.func)
        self._send_result(rec.client, rec)
        if rec.watchers:
            for client in rec.watchers:
                self._send_result(client, rec)
            rec.watchers = []
        evicted = self.store.finished(rec)
        if evicted:
            self._forget(evicted)

    def _send_result(self, client: bytes, rec: Record) -> None:
        r = rec.result  # 8 fields (7 in records stored by older versions), then the label
        meta = (rec.msg_id, *r, None, rec.label) if len(r) == 7 else (rec.msg_id, *r, rec.label)
        bufs, mac = rec.result_bufs, rec.result_mac
        if len(bufs) > 1:  # segments: inline for a remote client, else a link it claims
            try:
                if client in self.remote:
                    bufs, mac = self.signer.inline(bufs, mac)
                else:
                    bufs = [b.link() if type(b) is shm.Segment else b for b in bufs]
            except wire.WireError as e:
                lost = ("WireError", f"task {rec.msg_id} finished, but its result is lost: {e}", "")
                meta = (*meta[:2], "error", *meta[3:7], lost, *meta[8:])
                bufs = []
        # Sent at the end of this turn of the main loop, with the others finished in it.
        box = self._outbox.get(client)
        if box is None:
            box = self._outbox[client] = []
        box.append((meta, bufs, mac))
        if len(box) >= RESULTS_BATCH:
            self._flush_client(client)

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


def _check_flags(flags: Any) -> None:
    """Raise WireError unless ``flags`` are what a client sends.  Checked here because the
    core trusts its events' types: a wrong one would fail halfway through an event and
    leave the scheduler inconsistent (a signed but malformed submission, a peer bug)."""
    if flags is None:
        return
    if not isinstance(flags, dict) or not flags.keys() <= {"after", "follow", "timeout", "retries",
                                                           "targets", "walltime"}:
        raise wire.WireError("malformed task flags")
    targets = flags.get("targets")
    if targets is not None and not (isinstance(targets, frozenset) and targets
                                    and all(type(t) is int for t in targets)):
        raise wire.WireError("malformed targets in task flags")
    for name in ("after", "follow"):
        spec = flags.get(name)
        if spec is not None and not (
            isinstance(spec, ev.DepSpec) and isinstance(spec.ids, frozenset)
            and all(isinstance(i, str) for i in spec.ids)
            and all(type(b) is bool for b in (spec.all, spec.success, spec.failure))
        ):
            raise wire.WireError(f"malformed {name!r} dependency in task flags")
    timeout, retries = flags.get("timeout"), flags.get("retries", 0)
    if timeout is not None and (type(timeout) not in (int, float) or not timeout >= 0):
        raise wire.WireError("malformed timeout in task flags")
    walltime = flags.get("walltime")
    if walltime is not None and (type(walltime) not in (int, float) or not walltime >= 0):
        raise wire.WireError("malformed walltime in task flags")
    if type(retries) is not int or retries < 0:
        raise wire.WireError("malformed retries in task flags")


def stop_on_signals(controller: Controller) -> None:
    """SIGTERM/SIGINT end the main loop cleanly, so engines are stopped too."""

    def handler(signum: int, _frame: Any) -> None:
        controller.stop(f"it received {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
