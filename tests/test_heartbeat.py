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


def test_an_engine_whose_health_reports_stop_while_its_heartbeat_answers_is_frozen():
    """Engines alive by heartbeat whose health reports (a Python thread's) stopped are named
    once per interval; one that never reported (ipylb.bench.swarm's) is not watched; one
    whose heartbeat is silent too is the heartbeat's business."""
    ctx = zmq.Context.instance()
    chan = ctx.socket(zmq.ROUTER)
    hb = Heartbeats(ctx, interval=1.0, timeout=10.0)
    try:
        url = f"tcp://127.0.0.1:{chan.bind_to_random_port('tcp://127.0.0.1')}"
        hb.add(0, url, now=0.0)
        hb.add(1, url, now=0.0)  # never reports
        hb.reported(0, 1.0, None)
        hb.reported(0, 2.0, "t1")
        hb.last_answer[0] = hb.last_answer[1] = 25.0  # heartbeats answered
        assert hb.frozen(10.0, 20.0) == []
        assert hb.frozen(10.5, 20.0) == []  # (checked once per interval)
        assert hb.frozen(23.0, 20.0) == [(0, "t1", 21.0)]
        assert hb.warn_once(0) and not hb.warn_once(0)
        hb.reported(0, 23.5, None)  # it came back
        assert hb.frozen(24.0, 20.0) == [] and hb.warn_once(0)
        hb.last_answer[0] = 30.0
        assert hb.frozen(50.0, 20.0) == []  # its heartbeat is silent too: not this
        hb.remove(0)
        assert hb.frozen(51.0, 0.0) == []
    finally:
        for e in list(hb.peers):
            hb.remove(e)
        hb.close()
        chan.close(0)
