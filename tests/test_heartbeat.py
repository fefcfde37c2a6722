"""Heartbeats judge engines on the time the controller was pinging (real sockets)."""

from __future__ import annotations

import zmq
from ipylb.controller.heartbeat import Heartbeats


def test_silence_while_the_controller_itself_was_busy_is_not_held_against_engines():
    ctx = zmq.Context.instance()
    echo = ctx.socket(zmq.ROUTER)  # stands for an engine's heartbeat channel: never answers
    port = echo.bind_to_random_port("tcp://127.0.0.1")
    hb = Heartbeats(ctx, interval=1.0, timeout=10.0)
    try:
        hb.add(7, f"tcp://127.0.0.1:{port}", now=100.0)
        for t in range(101, 106):
            assert hb.tick(float(t)) == []
        # The controller is stuck draining a backlog for 30 s: no pings, no reading.
        assert hb.tick(136.0) == []
        # From then on the engine's silence counts: dead once it passes the timeout.
        assert all(hb.tick(float(t)) == [] for t in range(137, 141))
        late = [t for t in range(141, 150) if hb.tick(float(t))]
        assert late and late[0] <= 148
        assert hb.tick(150.0)[0][0] == 7
    finally:
        hb.remove(7)
        echo.close(0)
