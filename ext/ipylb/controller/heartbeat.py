"""Heartbeats: is each engine's process still alive and answering?

Every engine kernel has Jupyter's standard heartbeat channel, an echo served by a
thread of its own (it answers while a long task runs, so a busy engine is not a
dead one).  The controller pings each engine there; one that stays silent for
``timeout`` seconds is dead (frozen, unreachable, or gone on another machine).

Silence counts only while the controller pings: if it was itself too busy to ping
on time (draining a burst of 200,000 submissions on a loaded machine took it 30 s),
the time it was away is not held against the engines, which could not answer pings
that were never sent.

The heartbeat answers without Python (a C thread): an engine whose Python no longer runs
(a thread a task left holds the GIL in C code) still answers.  Its health reports, sent
every second by a Python thread, stop: :meth:`Heartbeats.frozen` names engines alive by
heartbeat whose reports stopped.
"""

from __future__ import annotations

import zmq


class Heartbeats:
    """Pings engines' heartbeat channels; tells which ones stopped answering.

    One ROUTER socket reaches every engine (two with CurveZMQ kernels, below): each connection gets a routing id naming its
    engine (ZMQ_CONNECT_ROUTING_ID), so a ping goes to one engine and its echo says whose
    it is.  The controller polls this one socket however many engines there are (one
    socket per engine made every poll, so every task round trip, O(engines): 0.7 ms ->
    3 ms at 1,000 engines).
    """

    def __init__(self, ctx: zmq.Context, interval: float = 1.0, timeout: float = 10.0) -> None:
        self.interval = interval
        self.timeout = timeout
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Kernels whose Jupyter channels run CurveZMQ (keys in their connection file, as
        # jupyter_client provisions them: ``ipylb cluster start --curve``) are pinged from a
        # second ROUTER, a CurveZMQ client under a keypair of its own (a socket's security
        # mechanism is all or nothing; the server key is set per connection).
        self.curve_sock: zmq.Socket | None = None
        if zmq.has("curve"):
            self.curve_sock = ctx.socket(zmq.ROUTER)
            self.curve_sock.setsockopt(zmq.LINGER, 0)
            self.curve_sock.curve_publickey, self.curve_sock.curve_secretkey = zmq.curve_keypair()
        self.socks = [s for s in (self.sock, self.curve_sock) if s is not None]
        # engine id -> (routing id, url, the socket that pings it)
        self.peers: dict[int, tuple[bytes, str, zmq.Socket]] = {}
        self.engine_of: dict[bytes, int] = {}  # routing id -> engine id
        self.last_answer: dict[int, float] = {}
        # engine id -> [its last health report (when), the task it named, warned already],
        # from its first report on
        self.reports: dict[int, list] = {}
        self._next_ping = 0.0
        self._next_frozen = 0.0
        self._last_tick: float | None = None

    def add(self, engine_id: int, url: str, now: float, key: str | None = None) -> None:
        """Start watching an engine; ``key``: its kernel's CurveZMQ public key (Z85), if its
        channels are encrypted (zmq.ZMQError: a url or key zmq refuses, or no CurveZMQ in
        this libzmq)."""
        rid = b"hb-%d" % engine_id
        sock = self.sock
        if key is not None:
            sock = self.curve_sock
            if sock is None:
                raise zmq.ZMQError(zmq.EINVAL, "an encrypted heartbeat, and no CurveZMQ here")
            sock.curve_serverkey = key.encode("ascii")  # for the connection made next
        sock.setsockopt(zmq.CONNECT_ROUTING_ID, rid)
        sock.connect(url)
        self.peers[engine_id] = (rid, url, sock)
        self.engine_of[rid] = engine_id
        self.last_answer[engine_id] = now

    def reported(self, engine_id: int, now: float, task: str | None) -> None:
        """A health report from an engine (its Python runs), naming the task it runs (or its
        registration).  Only engines that report are watched (not ``ipylb.bench.swarm``'s)."""
        if engine_id in self.peers:
            self.reports[engine_id] = [now, task, False]

    def frozen(self, now: float, limit: float) -> list[tuple[int, str | None, float]]:
        """Engines whose heartbeat answers but whose health reports stopped over ``limit``
        seconds ago (checked once per ping interval; [] between): (engine id, the task its
        last report named or None, seconds since it)."""
        if now < self._next_frozen:
            return []
        self._next_frozen = now + self.interval
        alive = now - 3 * self.interval
        return [(e, r[1], now - r[0]) for e, r in self.reports.items()
                if now - r[0] > limit and self.last_answer.get(e, 0.0) >= alive]

    def still_frozen(self, engine_id: int, now: float, limit: float) -> bool:
        """Whether ``engine_id``'s reports are still over ``limit`` s old."""
        report = self.reports.get(engine_id)
        return report is not None and now - report[0] > limit

    def warn_once(self, engine_id: int) -> bool:
        """True the first time it is asked since the engine's last report."""
        report = self.reports.get(engine_id)
        if report is None or report[2]:
            return False
        report[2] = True
        return True

    def remove(self, engine_id: int) -> None:
        """Stop watching an engine (no-op for one not watched)."""
        peer = self.peers.pop(engine_id, None)
        self.last_answer.pop(engine_id, None)
        self.reports.pop(engine_id, None)
        if peer is not None:
            del self.engine_of[peer[0]]
            try:
                peer[2].disconnect(peer[1])
            except zmq.ZMQError:  # already gone (its endpoint was dropped)
                pass

    def answered(self, now: float) -> None:
        """Drain the echoes waiting on the sockets: each marks its engine alive at ``now``."""
        engine_of, last = self.engine_of, self.last_answer
        for sock in self.socks:
            recv = sock.recv_multipart
            while True:
                try:
                    rid = recv(zmq.NOBLOCK)[0]
                except zmq.Again:
                    break
                engine_id = engine_of.get(rid)
                if engine_id is not None:  # (an echo from an engine removed meanwhile: dropped)
                    last[engine_id] = now

    def tick(self, now: float) -> list[tuple[int, str]]:
        """Send pings when due; return (engine_id, reason) for engines silent too long."""
        last, self._last_tick = self._last_tick, now
        away = 0.0 if last is None else now - last - self.interval
        if away > 0:  # we did not ping meanwhile: that silence is ours, not theirs
            for engine_id in self.last_answer:
                self.last_answer[engine_id] += away
            for report in self.reports.values():
                report[0] += away
        if now >= self._next_ping:
            self._next_ping = now + self.interval
            for rid, _url, sock in self.peers.values():
                try:  # (a ROUTER drops what it cannot route now: the next ping will do)
                    sock.send_multipart((rid, b"ping"), zmq.NOBLOCK)
                except zmq.Again:
                    pass
        return [
            (engine_id, f"it stopped answering heartbeats for {now - seen:.1f} s (hung or unreachable)")
            for engine_id, seen in self.last_answer.items()
            if now - seen > self.timeout
        ]

    def close(self) -> None:
        """Close the sockets (the controller is stopping)."""
        for sock in self.socks:
            sock.close(0)
