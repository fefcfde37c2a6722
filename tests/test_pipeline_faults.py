"""Tasks queued on an engine (hwm="auto", the default, or > 1) behind one that ends its
engine: each runs once, elsewhere, and the controller's log says only what happened."""

from __future__ import annotations

import time

import ipylb
from test_pending import Gate


def ends_the_engine_when_told(port):
    import os
    import socket

    socket.create_connection(("127.0.0.1", port)).recv(1)
    os._exit(3)


def test_tasks_queued_behind_os_exit_run_once_and_their_refusals_are_not_warned(capfd):
    """The engine a task's os._exit ends asks to be restarted, then refuses the tasks queued
    behind (they never ran there; the controller had placed them again): each refusal was
    logged as 'dropped a message ... a result from an unregistered engine' (6 lines here)."""
    gate = Gate()
    with ipylb.Client(engines=1, hwm=8) as rc:
        view = rc.load_balanced_view()
        first = view.apply_async(ends_the_engine_when_told, gate.port)
        conn = gate.running()
        behind = [view.apply_async(pow, 2, i) for i in range(6)]
        deadline = time.monotonic() + 60
        while rc.queue_status()[rc.ids[0]]["queue"] < 6:  # all queued behind it
            assert time.monotonic() < deadline, rc.queue_status()
            time.sleep(0.01)
        conn.sendall(b"x")
        assert [ar.get(120) for ar in behind] == [2 ** i for i in range(6)]
        assert "os._exit(3)" in str(first.error)
        assert all(ar.engine_id != first.engine_id for ar in behind)  # on the new engine
    gate.close()
    err = capfd.readouterr().err
    assert "restarted: the task called os._exit(3)" in err  # (what happened is said)
    assert "result from an unregistered engine" not in err
