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


def busy_3ms(i):
    """Python bytecode for 3 ms (a SIGINT raises in it at once), then ``i``."""
    import time

    t = time.perf_counter()
    while time.perf_counter() - t < 0.003:
        pass
    return i


def test_a_flood_of_interrupts_stops_tasks_and_nothing_else(capfd):
    """rc.interrupt() sent while engines take queued tasks one after another: a SIGINT that
    was pending as the engine installed its task handler raised before the task's try, left
    that handler in place between tasks, and a later interrupt then broke the engine's
    reporting: it was restarted, blaming a task ('it could not report a task's outcome
    (KeyboardInterrupt)'), a task failed with that message, and (a KeyError on the way, since
    fixed in the core) one was never answered.  Every task ends with its value or
    KeyboardInterrupt, and no engine is restarted."""
    import threading

    from ipylb.error import RemoteError

    with ipylb.Client(engines=2) as rc:
        ids = rc.ids
        view = rc.load_balanced_view()
        other = ipylb.Client(rc._local.connection_file)
        stop = threading.Event()

        def flood():
            while not stop.is_set():
                other.interrupt()

        ars = [view.apply_async(busy_3ms, i) for i in range(1500)]
        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            outcomes = []
            for i, ar in enumerate(ars):
                try:
                    outcomes.append(ar.get(120) == i)
                except RemoteError as e:
                    assert e.ename == "KeyboardInterrupt" and e.evalue == "", e
                    outcomes.append("interrupted")
        finally:
            stop.set()
            flooder.join()
            other.close()
        assert False not in outcomes
        assert "interrupted" in outcomes  # the flood did reach tasks
        status = rc.queue_status()
        assert rc.ids == ids and all(status[e]["restarts"] == 0 for e in ids), status
    assert "could not report" not in capfd.readouterr().err


def test_a_cluster_stopped_leaves_no_watchdog_file(monkeypatch, tmp_path):
    """Each engine kernel keeps its idle watchdog's file (ipylb-<ident>-frozen.txt, empty
    unless the watchdog fires) in the Jupyter runtime directory; every shutdown left one per
    engine there (114 in one afternoon of this session's runs)."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    with ipylb.Client(engines=2) as rc:
        assert rc.load_balanced_view().apply_sync(pow, 2, 5) == 32
        assert len(list(tmp_path.glob("ipylb-*-frozen.txt"))) == 2  # (what is checked is made)
    assert list(tmp_path.glob("ipylb-*-frozen.txt")) == []
