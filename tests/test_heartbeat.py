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
        hb.close()
        echo.close(0)



def test_one_socket_pings_every_engine_and_each_echo_marks_only_its_own_engine():
    # Real sockets: three engines' heartbeat channels, of which engine 2 never answers.
    # The controller polls one socket for all of them (a socket per engine made every
    # poll O(engines)); every echo marks its own engine, and the silent one alone dies.
    ctx = zmq.Context.instance()
    chans = [ctx.socket(zmq.ROUTER) for _ in range(3)]
    hb = Heartbeats(ctx, interval=1.0, timeout=10.0)
    try:
        for i, c in enumerate(chans):
            hb.add(i, f"tcp://127.0.0.1:{c.bind_to_random_port('tcp://127.0.0.1')}", now=0.0)
        for t in range(1, 13):
            assert all(e == 2 for e, _ in hb.tick(float(t)))  # pings every engine
            for c in chans[:2]:  # (a ping sent before a connection is up is dropped)
                if c.poll(2000):
                    c.send_multipart(c.recv_multipart())  # the echo, as ipykernel's
            if hb.sock.poll(2000):
                hb.answered(float(t))
        assert len(hb.peers) == 3
        assert [e for e, _ in hb.tick(13.0)] == [2]
        assert hb.last_answer[0] >= 3.0 and hb.last_answer[1] >= 3.0
        hb.remove(2)
        assert hb.tick(14.0) == [] and set(hb.last_answer) == {0, 1}
    finally:
        hb.close()
        for c in chans:
            c.close(0)
