"""The standalone cluster through the real ``ipylb`` command: start, status, engine add,
stop, refusals, and clients that find it, share it, and leave it.

Each test has its own Jupyter runtime directory (so its connection files are its own)
and runs the installed ``ipylb`` script in subprocesses, as a user would.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ipylb
import pytest
from ipylb import connection
from ipylb.error import NoCluster
from procs import IPYLB, ipylb_cmd, wait_gone


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    """A private runtime directory, for this process and the commands it runs.  A daemon
    a failed test left running is stopped (it watches no parent)."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    yield tmp_path
    for path in tmp_path.glob("ipylb-*.json"):
        ipylb_cmd("cluster", "stop", "--profile", path.stem.removeprefix("ipylb-"))


def cluster_pids(rc) -> list[int]:
    return [rc._info["pid"], *(e["pid"] for e in rc.engine_info().values())]


def status(profile: str) -> dict[str, int]:
    out = ipylb_cmd("cluster", "status", "--profile", profile)
    assert out.returncode == 0, out.stderr
    return {k: int(v) for k, v in re.findall(r"^(engines|unassigned|tasks done): (\d+)$",
                                              out.stdout, re.M)}


def test_start_refuse_status_add_stop(runtime):
    out = ipylb_cmd("cluster", "start", "-n", "1", "--daemon", "--profile", "p1")
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path == runtime / "ipylb-p1.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    info = json.loads(path.read_text())
    assert info["client_url"].startswith("tcp://127.0.0.1:")

    again = ipylb_cmd("cluster", "start", "-n", "3", "--daemon", "--profile", "p1")
    assert again.returncode == 1 and "already running" in again.stderr
    assert json.loads(path.read_text()) == info  # untouched

    rc = ipylb.Client(profile="p1")
    try:
        assert rc.ids == [0]
        pids = cluster_pids(rc)
        view = rc.load_balanced_view()
        busy = view.apply_async(time.sleep, 30)  # holds the only engine (hwm 1)
        waiting = view.apply_async(pow, 2, 5)
        assert status("p1") == {"engines": 1, "unassigned": 1, "tasks done": 0}
        # what the controller process handled, and its GC policy (issue 14)
        said = ipylb_cmd("cluster", "status", "--profile", "p1").stdout
        assert re.search(r"^messages received: \d+ \(.*\bsubmit [12]\b", said, re.M), said
        assert re.search(r"^controller GC: freeze survivors of full collections, [1-9]\d* objects "
                         r"frozen, \d+ full collections$", said, re.M), said

        added = ipylb_cmd("engine", "add", "-n", "1", "--profile", "p1")
        assert added.returncode == 0, added.stderr
        assert waiting.get(timeout=15) == 32  # the new engine took it at once
        assert waiting.metadata.engine_id == 1 and not busy.ready()
        assert status("p1") == {"engines": 2, "unassigned": 0, "tasks done": 1}
        pids += [e["pid"] for i, e in rc.engine_info().items() if i == 1]
    finally:
        rc.close()

    stop = ipylb_cmd("cluster", "stop", "--profile", "p1")
    assert stop.returncode == 0, stop.stderr
    assert wait_gone(pids), [p for p in pids if connection.pid_alive(p)]
    assert not path.exists()
    again = ipylb_cmd("cluster", "stop", "--profile", "p1")
    assert again.returncode == 1 and "no cluster is running" in again.stderr


def test_clients_find_share_and_leave_the_default_cluster(runtime):
    out = ipylb_cmd("cluster", "start", "-n", "1", "--daemon")
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    url = json.loads(path.read_text())["client_url"]
    try:
        a, b = ipylb.Client(), ipylb.Client(profile="default")
        by_path, by_url = ipylb.Client(str(path)), ipylb.Client(url)
        for rc in (a, b, by_path, by_url):
            assert rc.ids == [0]
        by_path.close()
        by_url.close()

        # Two clients at once: each gets its own results.
        ma = a.load_balanced_view().map_async(lambda x: ("a", x * x), range(20))
        mb = b.load_balanced_view().map_async(lambda x: ("b", -x), range(20))
        assert mb.get(timeout=30) == [("b", -x) for x in range(20)]
        assert ma.get(timeout=30) == [("a", x * x) for x in range(20)]

        # A client that leaves loses nothing: its task runs on, and another client
        # gets the result by msg_id.
        slow = a.load_balanced_view().apply_async(lambda: time.sleep(1) or "kept")
        msg_id = slow.msg_ids[0]
        a.close()
        assert b.get_result(msg_id).get(timeout=30) == "kept"
        c = ipylb.Client()
        assert c.get_result(msg_id).get(timeout=10) == "kept"
        c.close()
        b.close()
    finally:
        assert ipylb_cmd("cluster", "stop").returncode == 0


def test_foreground_cluster_stale_file_and_ip(runtime):
    path = runtime / "ipylb-fg.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    path.write_text(json.dumps({"key": "00", "controller_id": "controller-x",
                                "client_url": "tcp://127.0.0.1:9",
                                "engine_url": "tcp://127.0.0.1:9", "pid": int(dead)}))
    t0 = time.monotonic()
    with pytest.raises(NoCluster, match="ipylb cluster start"):
        ipylb.Client(profile="fg", timeout=2)
    with pytest.raises(NoCluster, match="ipylb cluster start"):
        ipylb.Client()  # no default cluster at all
    assert time.monotonic() - t0 < 5
    assert ipylb_cmd("cluster", "status", "--profile", "fg").returncode == 1

    # Started on the stale file, in the foreground, listening where --ip says.
    proc = subprocess.Popen([IPYLB, "cluster", "start", "-n", "1", "--profile", "fg",
                             "--ip", "127.0.0.2"], stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        lines = []
        while not lines or "running" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        assert "stale" in "".join(lines)
        info = json.loads(path.read_text())
        assert info["client_url"].startswith("tcp://127.0.0.2:")
        rc = ipylb.Client(profile="fg")
        assert rc.load_balanced_view().apply_sync(pow, 3, 3) == 27
        pids = cluster_pids(rc)
        rc.close()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_gone(pids)
    assert not path.exists()


def test_ctrl_c_while_engines_start_stops_the_cluster(runtime):
    path = runtime / "ipylb-early.json"
    proc = subprocess.Popen([IPYLB, "cluster", "start", "-n", "2", "--profile", "early"],
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not path.exists():  # written before the engines are launched
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    controller = json.loads(path.read_text())["pid"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    assert wait_gone([controller])
    assert not path.exists()


def test_sqlite_records_survive_a_restart(runtime):
    start = ("cluster", "start", "-n", "1", "--daemon", "--db", "sqlite", "--profile", "db")
    assert ipylb_cmd(*start).returncode == 0
    rc = ipylb.Client(profile="db")
    ar = rc.load_balanced_view().apply_async(pow, 7, 2)
    assert ar.get(timeout=30) == 49
    rc.close()
    assert ipylb_cmd("cluster", "stop", "--profile", "db").returncode == 0
    db = runtime / "data" / "ipylb" / "db" / "tasks.sqlite"
    assert oct(db.stat().st_mode & 0o777) == "0o600"

    assert ipylb_cmd(*start).returncode == 0
    rc = ipylb.Client(profile="db")
    try:
        assert rc.get_result(ar.msg_ids[0]).get(timeout=10) == 49
    finally:
        rc.close()
        assert ipylb_cmd("cluster", "stop", "--profile", "db").returncode == 0
