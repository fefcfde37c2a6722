"""Fuzz while serving (issue 12 item 4): thousands of random, truncated, unsigned, wrongly
signed, replayed and signed-but-malformed messages at both controller sockets while real
tasks run.  The controller never crashes, the real tasks all complete with their values, and
the scheduler core's invariants hold at the end.  Also: the frame size cap, and peers that
are gone are forgotten.  A real controller process, real engine kernels, real sockets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import ipylb
import pytest
import zmq
import zmq.utils.monitor
from ipylb import compat, wire
from ipylb.error import RemoteError
from ipylb.fuzz import KINDS, Fuzzer

CAP_MB = 4
FORGET_S = 3.0
PER_KIND = 400  # messages of each kind at each socket


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A controller with two engines, a small frame cap, quick forgetting, a log file."""
    rt = tmp_path_factory.mktemp("runtime")
    path, log = rt / "ipylb-fuzz.json", rt / "controller.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ipylb.controller", "--connection-file", str(path),
             "--engines", "2", "--log-level", "INFO", "--parent-pid", str(os.getpid()),
             "--max-frame-mb", str(CAP_MB), "--forget-after", str(FORGET_S)],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(rt)},
        )
    assert proc.stdout.readline().strip() == "ready"
    rc = ipylb.Client(path)
    rc.wait_for_engines(2, 60)
    yield SimpleNamespace(proc=proc, path=path, log=log, rc=rc, tmp=rt,
                          info=json.loads(path.read_text()))
    rc.close()
    proc.terminate()
    proc.wait(10)


def validate(rc) -> dict[str, int]:
    """The controller's own consistency check (core invariants, shell vs core); its sizes."""
    return rc.validate(30)


def test_fuzz_while_real_tasks_run(cluster, tmp_path):
    rc = cluster.rc
    view = rc.load_balanced_view()
    before = validate(rc)

    fuzzer = Fuzzer(cluster.info, per_kind=PER_KIND, seed=12)
    fuzzing = threading.Thread(target=fuzzer.run, kwargs={"duration": 8.0})
    fuzzing.start()
    # Real work of every shape, submitted while the fuzzer runs.
    amr = view.map_async(lambda x: x * x, range(3000))
    sleepy = view.map_async(time.sleep, [0.002] * 300)
    chain = [view.apply_async(lambda: 0)]
    for i in range(1, 30):
        with view.temp_flags(after=chain[-1]):
            chain.append(view.apply_async(lambda i=i: i))
    with view.temp_flags(follow=chain[0]):
        followers = [view.apply_async(pow, 2, i) for i in range(20)]
    def flaky_once(marks: str, x: int) -> int:  # (nested: pickled by value for the engines)
        """Fails the first time it runs for ``x`` (a retry then succeeds)."""
        path = os.path.join(marks, str(x))
        if not os.path.exists(path):
            open(path, "w").close()
            raise RuntimeError("first attempt fails")
        return -x

    marks = tmp_path / "marks"
    marks.mkdir()
    with view.temp_flags(retries=2):
        retried = view.map_async(flaky_once, [str(marks)] * 50, range(50))
    fuzzing.join(120)
    assert not fuzzing.is_alive()

    assert amr.get(timeout=120) == [x * x for x in range(3000)]
    assert sleepy.get(timeout=60) == [None] * 300
    assert [ar.get(timeout=60) for ar in chain] == list(range(30))
    assert [ar.get(timeout=60) for ar in followers] == [2**i for i in range(20)]
    assert {ar.metadata.engine_id for ar in followers} == {chain[0].metadata.engine_id}
    assert retried.get(timeout=60) == [-x for x in range(50)]

    assert cluster.proc.poll() is None, "the controller died"
    after = validate(rc)  # raises unless every invariant holds
    assert after["engines"] == before["engines"] == 2
    assert rc.queue_status()["unassigned"] == 0
    assert dict(fuzzer.sent) == {kind: 2 * PER_KIND for kind in KINDS}
    print(f"\nfuzz: {dict(fuzzer.sent)} messages per kind (both sockets), {fuzzer.frames} "
          f"frames, {fuzzer.answers} answers; real tasks: 3,429 all correct; validate: {after}")


def disconnected_after(url: str, frames: list[bytes], timeout: float = 15.0) -> bool:
    """Send ``frames`` from a fresh DEALER; whether the controller then drops the connection."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(url)
        deadline = time.monotonic() + timeout
        events = []
        while zmq.EVENT_HANDSHAKE_SUCCEEDED not in events:
            assert monitor.poll(max(0, deadline - time.monotonic()) * 1000), "never connected"
            events.append(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
        sock.send_multipart(frames)
        while monitor.poll(max(0, deadline - time.monotonic()) * 1000):
            if zmq.utils.monitor.recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                return True
        return False
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


def test_frames_over_the_cap_are_refused_unread(cluster):
    """An unauthenticated peer cannot make the controller buffer a frame over the cap: zmq
    reads the size first and drops the peer.  Real clients and engines check before sending,
    so their tasks fail with a clear error instead of vanishing with a dropped connection."""
    cap = CAP_MB << 20
    assert cluster.info["max_frame_bytes"] == cap
    for url in (cluster.info["client_url"], cluster.info["engine_url"]):
        assert disconnected_after(url, [b"\0" * 32, b"x" * (cap + 1)])
        assert not disconnected_after(url, [b"\0" * 32, b"x" * 1000], timeout=2.0)

    view = cluster.rc.load_balanced_view()
    big = "x" * (cap + 10)  # a str pickles in-band: one frame over the cap
    ar = view.apply_async(len, big)
    with pytest.raises(RemoteError, match="over the cluster's limit") as info:
        ar.get(timeout=10)
    assert info.value.ename == "SerializationError" and "arguments" in str(info.value)
    amr = view.map_async(len, ["a", big, "bc"])
    assert amr.get(timeout=30, return_exceptions=True)[0::2] == [1, 2]
    ret = view.apply_async(lambda n: "y" * n, cap + 10)  # the result over the cap
    with pytest.raises(RemoteError, match="over the cluster's limit") as info:
        ret.get(timeout=30)
    assert info.value.ename == "SerializationError" and "result" in str(info.value)
    np = pytest.importorskip("numpy")
    arr = np.ones(cap + 10, dtype="u1")  # an array goes through shared memory: no limit
    assert view.apply_sync(lambda a: int(a.sum()), arr) == cap + 10
    assert view.apply_sync(pow, 2, 5) == 32  # the engines served on
    validate(cluster.rc)


def test_gone_peers_are_forgotten_and_their_messages_stay_refused(cluster):
    key, to = cluster.info["key"].encode(), cluster.info["controller_id"].encode()
    base = validate(cluster.rc)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    ident = b"gone-client-r"
    sock.setsockopt(zmq.IDENTITY, ident)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.info["client_url"])
    hello = wire.Signer(key, ident, to).pack(wire.HELLO, {"versions": compat.versions()})
    hello = [bytes(f) for f in hello]
    sock.send_multipart(hello)
    assert sock.poll(10_000), "no welcome"
    kind, *_ = wire.Signer(key, ident).unpack(sock.recv_multipart())
    assert kind == wire.WELCOME
    grown = validate(cluster.rc)
    assert grown["listeners"] == base["listeners"] + 1
    assert grown["senders"] == base["senders"] + 1
    sock.close(0)

    deadline = time.monotonic() + 10 * FORGET_S
    while validate(cluster.rc)["listeners"] > base["listeners"]:
        assert time.monotonic() < deadline, "the gone client was never forgotten"
        time.sleep(0.2)
    assert validate(cluster.rc)["senders"] <= base["senders"]
    # The real client, pinging while idle, is still known and served.
    assert cluster.rc.load_balanced_view().apply_sync(pow, 3, 2) == 9

    # Its old message, replayed now that the controller no longer remembers it: refused.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, ident)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.info["client_url"])
    try:
        sock.send_multipart(hello)
        assert not sock.poll(2000), "a replayed hello was answered"
    finally:
        sock.close(0)
    log = cluster.log.read_text()
    assert f"dropped a message from {ident!r}: replayed" in log
