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

from typing import Any

import zmq


class Heartbeats:
    """Pings engines' heartbeat channels; tells which ones stopped answering."""

    def __init__(self, ctx: zmq.Context, interval: float = 1.0, timeout: float = 10.0) -> None:
        self.ctx = ctx
        self.interval = interval
        self.timeout = timeout
        self.socks: dict[int, zmq.Socket] = {}
        self.last_answer: dict[int, float] = {}
        self.engine_of: dict[zmq.Socket, int] = {}
        self._next_ping = 0.0
        self._last_tick: float | None = None

    def add(self, engine_id: int, url: str, now: float) -> zmq.Socket:
        """Start watching an engine; returns the socket to poll for answers."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(url)
        self.socks[engine_id] = sock
        self.engine_of[sock] = engine_id
        self.last_answer[engine_id] = now
        return sock

    def remove(self, engine_id: int) -> zmq.Socket | None:
        """Stop watching an engine; returns its socket (unregister it, it is closed)."""
        sock = self.socks.pop(engine_id, None)
        self.last_answer.pop(engine_id, None)
        if sock is not None:
            del self.engine_of[sock]
            sock.close(0)
        return sock

    def answered(self, sock: zmq.Socket, now: float) -> None:
        """Drain the echoes waiting on ``sock``."""
        while True:
            try:
                sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        self.last_answer[self.engine_of[sock]] = now

    def tick(self, now: float) -> list[tuple[int, str]]:
        """Send pings when due; return (engine_id, reason) for engines silent too long."""
        last, self._last_tick = self._last_tick, now
        away = 0.0 if last is None else now - last - self.interval
        if away > 0:  # we did not ping meanwhile: that silence is ours, not theirs
            for engine_id in self.last_answer:
                self.last_answer[engine_id] += away
        if now >= self._next_ping:
            self._next_ping = now + self.interval
            for sock in self.socks.values():
                try:
                    sock.send(b"ping", zmq.NOBLOCK)
                except zmq.Again:
                    pass
        return [
            (engine_id, f"it stopped answering heartbeats for {now - seen:.1f} s (hung or unreachable)")
            for engine_id, seen in self.last_answer.items()
            if now - seen > self.timeout
        ]

    def sockets(self) -> list[Any]:
        """Sockets to poll."""
        return list(self.socks.values())
