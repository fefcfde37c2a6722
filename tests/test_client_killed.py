"""A client killed with SIGKILL in the middle of a 5,000-task map loses nothing on a standalone
cluster with ``--db sqlite`` (issue 12 item 6): a new client fetches every result by msg_id,
each present once, and each task ran once.  Real processes: the ``ipylb`` command, a client
in a subprocess of its own, engine kernels.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import ipylb
import pytest
from ipylb.client.client import Client

IPYLB = str(Path(sys.executable).with_name("ipylb"))
N = 5000
KILL_AFTER = 500  # results the doomed client has received when it is killed

# The doomed client: it submits the map, writes the msg_ids to a file (fsynced) once they are
# sent, then reports each result it receives on stdout, until it is killed.
CLIENT = textwrap.dedent("""
    import os, sys, time
    import ipylb

    marks = sys.argv[1]

    def square(x):
        # Each run leaves a file named by its item: a second run of it would raise here.
        fd = os.open(os.path.join(marks, str(x)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        time.sleep(0.001)
        return x * x

    rc = ipylb.Client(profile="killed")
    amr = rc.load_balanced_view().map_async(square, range({n}), ordered=False)
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write("\\n".join(amr.msg_ids))
        f.flush()
        os.fsync(f.fileno())
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    for i, _ in enumerate(amr, 1):
        print(i, flush=True)
""").format(n=N)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    start = [IPYLB, "cluster", "start", "-n", "2", "--daemon", "--db", "sqlite",
             "--profile", "killed"]
    out = subprocess.run(start, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    yield tmp_path
    subprocess.run([IPYLB, "cluster", "stop", "--profile", "killed"], capture_output=True,
                   timeout=60, stdin=subprocess.DEVNULL)


def test_a_client_killed_mid_map_loses_nothing(cluster, monkeypatch):
    marks, ids_file = cluster / "marks", cluster / "msg_ids"
    marks.mkdir()
    script = cluster / "client.py"
    script.write_text(CLIENT)
    doomed = subprocess.Popen([sys.executable, str(script), str(marks), str(ids_file)],
                              stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        received = 0
        while received < KILL_AFTER:
            line = doomed.stdout.readline()
            assert line, f"the client ended early (status {doomed.poll()})"
            received = int(line)
        doomed.send_signal(signal.SIGKILL)
        assert doomed.wait(10) == -signal.SIGKILL
    finally:
        if doomed.poll() is None:
            doomed.kill()
    msg_ids = ids_file.read_text().split()
    assert len(msg_ids) == N == len(set(msg_ids))
    assert len(os.listdir(marks)) < N, "the map had finished: the kill came too late"

    # A new client, counting every result message it receives.
    seen: Counter[str] = Counter()
    on_result = Client._on_result

    def counting(self, meta, bufs, mac):  # each result, alone (RESULT) or batched (RESULTS)
        seen[meta[0]] += 1
        on_result(self, meta, bufs, mac)

    monkeypatch.setattr(Client, "_on_result", counting)
    rc = ipylb.Client(profile="killed")
    try:
        ar = rc.get_result(msg_ids)
        ar.wait(300)
        # Item i of the map is msg_ids[i]: every one present, with its own value.
        assert dict(zip(msg_ids, ar.get(0))) == {m: i * i for i, m in enumerate(msg_ids)}
        # A round trip: the reply comes after any result the controller sent before it.
        assert rc.queue_status()["unassigned"] == 0
        assert set(seen) == set(msg_ids) and set(seen.values()) == {1}
        assert sorted(map(int, os.listdir(marks))) == list(range(N))  # each ran exactly once
    finally:
        rc.close()
