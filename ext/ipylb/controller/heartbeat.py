"""Heartbeats: is each engine's process still alive and answering?

Every engine kernel has Jupyter's standard heartbeat channel, an echo served by a
thread of its own (it answers while a long task runs, so a busy engine is not a
dead one).  The controller pings each engine there; one that stays silent for
``timeout`` seconds is dead (frozen, unreachable, or gone on another machine).

Silence counts only while the controller pings: if it was itself too busy to ping
on time (draining a burst of 200,000 submissions on a loaded machine took it 30 s),
the time it was away is not held against the engines, which could not answer pings
that were never sent.
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
        self._next_ping = 0.0
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

    def remove(self, engine_id: int) -> None:
        """Stop watching an engine (no-op for one not watched)."""
        peer = self.peers.pop(engine_id, None)
        self.last_answer.pop(engine_id, None)
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
