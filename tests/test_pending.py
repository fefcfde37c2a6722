"""A task is pending until its final attempt ends, everywhere the controller shows or acts on
tasks (issue 9 item 5): purge, resubmit, get_result from any client, queue_status, the memory
budget and the SQLite store.

Timing is the test's: a task's attempt connects to a socket the test listens on (the test's
accept() returns once it runs) and blocks until the test sends it a word, so nothing sleeps.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import ipylb
import pytest
from ipylb import connection
from ipylb.client.local import engine_env
from ipylb.error import TaskAborted

TIMEOUT = 60.0


class Gate:
    """A listening socket on 127.0.0.1 that tasks on engines of this machine connect to."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(TIMEOUT)
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []

    def running(self) -> socket.socket:
        """Wait until an attempt connects (it runs now); its connection, to release it."""
        conn, _ = self.server.accept()
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.server.close()


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


def wait_at_gate(port, fail_first_in=None):
    """Fail the first attempt (the one that creates ``fail_first_in``/first) if asked, else
    connect to the test's gate and return the word it sends."""
    import os
    import socket

    if fail_first_in is not None:
        try:
            os.close(os.open(os.path.join(fail_first_in, "first"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            raise RuntimeError("the first attempt fails on purpose")
    with socket.create_connection(("127.0.0.1", port)) as s:
        return s.recv(64).decode()


def wait_until(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)  # polling the controller's state: there is no event to wait on


def busy(status):
    return sum(v["tasks"] + v["queue"] for k, v in status.items() if k != "unassigned")


def check_retry_is_pending(rc, view, gate, tmp_path):
    """The issue's input: retries=1, the first attempt failed, the second runs."""
    seq = rc.activity()["seq"]  # what the dashboard and `ipylb top` have seen finish
    with view.temp_flags(retries=1):
        ar = view.apply_async(wait_at_gate, gate.port, str(tmp_path))
    msg_id = ar.msg_ids[0]
    conn = gate.running()  # the first attempt failed; the second runs now
    with ipylb.Client(rc.cluster_info["client_url"]) as other:
        hub = other.get_result(msg_id)  # was: answered at once with the first attempt's error
        with pytest.raises(ValueError, match="pending"):
            rc.purge_results([msg_id])
        with pytest.raises(ValueError, match="pending"):
            other.purge_results([msg_id])
        with pytest.raises(ValueError, match="pending"):
            rc.resubmit([msg_id])
        status = rc.queue_status()
        assert (busy(status), status["unassigned"]) == (1, 0)
        assert other.db_query({"msg_id": msg_id}, keys=["status"]) == [
            {"msg_id": msg_id, "status": "pending"}]
        assert not ar.ready()
        # The dashboard's view: its failed first attempt is no finished task (no red cross,
        # no failure counted), and the engine it runs on shows it as its current task.
        act = rc.activity(seq)
        assert [t for t in act["tasks"] if t[4] == "wait_at_gate"] == []
        wait_until(lambda: msg_id in [e["task"][0] for e in rc.activity(seq)["engines"].values()
                                      if e["task"]])  # health reports come once a second
        conn.sendall(b"second attempt")
        assert ar.get(TIMEOUT) == "second attempt"
        assert hub.get(TIMEOUT) == "second attempt"
        assert ar.metadata.status == "ok"
        finished = [t for t in rc.activity(seq)["tasks"] if t[4] == "wait_at_gate"]
        assert [(t[0], t[3]) for t in finished] == [(ar.metadata.engine_id, True)]
    rc.purge_results([msg_id])  # finished now: accepted
    with pytest.raises(KeyError, match="purged"):
        rc.get_result(msg_id)


def test_a_task_waiting_for_its_retry_is_pending_everywhere(rc, view, gate, tmp_path):
    check_retry_is_pending(rc, view, gate, tmp_path)
    assert busy(rc.queue_status()) == 0


def start_controller(path, *args):
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipylb.controller", "--connection-file", str(path),
         "--engines", "2", *args],
        stdout=subprocess.PIPE, text=True, env=engine_env(),  # engines import this module
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture(params=["no-budget", "no-budget+sqlite"])
def tight(request, tmp_path_factory):
    """A cluster that keeps no finished record in memory (--store-limit-mb 0): each one is
    dropped (or only in SQLite) as soon as the next finishes."""
    d = tmp_path_factory.mktemp("tight")
    path = connection.runtime_dir() / f"ipylb-h9ctl-{d.name}.json"
    args = ["--store-limit-mb", "0"]
    if request.param.endswith("sqlite"):
        args += ["--db-file", str(d / "tasks.sqlite")]
    proc = start_controller(path, *args)
    try:
        rc = ipylb.Client(str(path))
        rc.wait_for_engines(2, TIMEOUT)
        yield rc
        rc.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_task_waiting_for_its_retry_survives_the_memory_budget(tight, gate, tmp_path):
    """Records of tasks finishing while a retry runs push the oldest finished records out
    (or into SQLite); the retried one is pending, so it stays, and its result is delivered."""
    view = tight.load_balanced_view()
    with view.temp_flags(retries=1):
        ar = view.apply_async(wait_at_gate, gate.port, str(tmp_path))
    conn = gate.running()
    assert view.map_sync(lambda x: x * 2, range(6)) == [0, 2, 4, 6, 8, 10]
    conn.sendall(b"kept")
    assert ar.get(TIMEOUT) == "kept"
    assert tight.get_result(ar.msg_ids[0]).get(TIMEOUT) == "kept"
    (tmp_path / "again").mkdir()
    check_retry_is_pending(tight, view, gate, tmp_path / "again")


def test_abort_while_waiting_for_a_retry(tight, gate, tmp_path):
    """A task whose first attempt failed waits for a free engine it has not failed on: it is
    pending (another client's get_result waits), abort fails it with TaskAborted for
    every client, and nothing else is disturbed."""
    view = tight.load_balanced_view()
    blocker = view.apply_async(wait_at_gate, gate.port)
    conn = gate.running()  # one engine is busy until the test says
    with view.temp_flags(retries=1):
        ar = view.apply_async(wait_at_gate, gate.port, str(tmp_path))
    msg_id = ar.msg_ids[0]
    # It failed on the free engine and waits for the busy one (retries avoid that engine).
    wait_until(lambda: tight.queue_status()["unassigned"] == 1)
    with ipylb.Client(tight.cluster_info["client_url"]) as other:
        hub = other.get_result(msg_id)
        tight.abort(msg_id)
        with pytest.raises(TaskAborted):
            ar.get(TIMEOUT)
        with pytest.raises(TaskAborted):
            hub.get(TIMEOUT)
    conn.sendall(b"unblocked")
    assert blocker.get(TIMEOUT) == "unblocked"
    assert tight.queue_status()["unassigned"] == 0


def test_resubmit_of_a_retried_task_after_it_finished(rc, view, gate, tmp_path):
    """Once its last attempt ended, a retried task is finished: resubmit runs it again."""
    with view.temp_flags(retries=1):
        ar = view.apply_async(wait_at_gate, gate.port, str(tmp_path))
    gate.running().sendall(b"first run")
    assert ar.get(TIMEOUT) == "first run"
    again = rc.resubmit(ar.msg_ids)  # fails no more: the marker file exists
    gate.running().sendall(b"run again")
    assert again.get(TIMEOUT) == ["run again"]
    rc.purge_results([ar, again])
