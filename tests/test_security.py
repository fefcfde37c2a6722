"""Forged, altered, replayed and malformed messages against a real controller and engine.

Each test plays "mallory": a DEALER with a made-up identity connected straight to
one of the controller's two ROUTER sockets.  After the bad traffic, the controller
must still be alive and serving (a normal client round trip works), and nothing a
forged message carried may have run (the forged tasks would create files).

The engines themselves cannot be sent a forged task at all: their task channel is a
DEALER that connects out to the controller, and their Jupyter channels are unix
sockets in the private runtime directory (see test_engines_listen_on_no_tcp_port).
"""

from __future__ import annotations

import hmac
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ipylb
import psutil
import pytest
import zmq
from ipylb import wire

HUGE = 64 << 20
LOG_WAIT_S = 15.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A controller with one engine, logging at DEBUG level into a file we can read."""
    rt = tmp_path_factory.mktemp("runtime")
    path, log = rt / "ipylb-security.json", rt / "controller.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ipylb.controller", "--connection-file", str(path),
             "--engines", "1", "--log-level", "DEBUG", "--parent-pid", str(os.getpid())],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(rt)},
        )
    assert proc.stdout.readline().strip() == "ready"
    rc = ipylb.Client(path)
    rc.wait_for_engines(1, 60)
    info = ipylb.connection.read(path)
    yield SimpleNamespace(proc=proc, path=path, log=log, rc=rc, info=info,
                          key=info["key"].encode(), tmp=rt)
    rc.close()
    proc.terminate()
    proc.wait(10)


class Mallory:
    """A DEALER of our own on one of the controller's sockets.  Its identity ends in
    ``r``, so the controller sends replies and results for what it submits to it."""

    def __init__(self, url: str, name: str) -> None:
        self.ident = f"mallory-{name}-r".encode()
        self.others: list[tuple[int, Any]] = []  # what came while results were awaited
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.ident)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def send(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, key: bytes, timeout: float = 15.0) -> tuple[int, Any]:
        """The next authentic message sent to us but events (the controller tells every
        client it hears from the engines: those go to ``self.others``): (kind, meta)."""
        while True:
            assert self.sock.poll(timeout * 1000), "the controller sent nothing back"
            kind, _sender, meta, bufs, _mac = wire.Signer(key, self.ident).unpack(
                self.sock.recv_multipart())
            if kind != wire.EVENT:
                return kind, meta
            self.others.append((kind, meta))

    def recv_results(self, key: bytes, n: int) -> list[tuple]:
        """The metadata of the next ``n`` results sent to us, one or several per message."""
        metas: list[tuple] = []
        while len(metas) < n:
            kind, meta = self.recv(key)
            assert kind in (wire.RESULT, wire.RESULTS), (kind, meta)
            metas += [meta] if kind == wire.RESULT else [m for m, *_ in wire.unbatch(meta, [])]
        return metas

    def close(self) -> None:
        self.sock.close(0)


def wait_logged(cluster, who: Mallory, n: int) -> str:
    """Wait until the controller has logged ``n`` dropped/failed messages from ``who``
    (so it has processed them all); return those lines."""
    tag = repr(who.ident)
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        lines = [ln for ln in cluster.log.read_text().splitlines() if tag in ln]
        if len(lines) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == n, f"expected {n} log lines about {tag}, got:\n" + "\n".join(lines)
    return "\n".join(lines)


def capture_submit(rc, f, *args) -> list[bytes]:
    """The frames a real client sends to submit ``f(*args)``, signed with the real key
    but kept here instead of sent: mallory's "captured legitimate message"."""
    sent: list[list[Any]] = []

    class Recorder:
        parts: list[Any] = []

        def send(self, frame, flags=0, copy=True):
            self.parts.append(frame)
            if not flags & zmq.SNDMORE:
                sent.append(self.parts)
                self.parts = []

    real, rc._send_sock = rc._send_sock, Recorder()
    try:
        rc.load_balanced_view().apply_async(f, *args)
        rc._flush()  # (one made right after another is held to leave with the next ones)
    finally:
        rc._send_sock = real
    [frames] = sent
    return [bytes(fr.buffer if isinstance(fr, zmq.Frame) else fr) for fr in frames]


def sign(key: bytes, head: bytes) -> bytes:
    return hmac.digest(key, head, "sha256")


def signed(key: bytes, to: bytes, kind: Any, meta: Any, sender: bytes = b"mallory", seq: int = 1,
           bufs: list[bytes] = (), mac: bytes = b"", segs: Any = ()) -> list[bytes]:
    """A message with a valid signature over a head of mallory's choosing, addressed ``to``."""
    head = pickle.dumps((kind, sender, to, seq, meta, mac, segs))
    return [sign(key, head), head, *bufs]


def assert_serving(cluster, engines: int = 1) -> None:
    """The controller is alive, its engines are the real ones, and a round trip works."""
    assert cluster.proc.poll() is None, "the controller died"
    rc = ipylb.Client(cluster.path, timeout=5)
    try:
        assert rc.ids == list(range(engines))
        assert rc.load_balanced_view().apply_sync(pow, 3, 4) == 81
        status = rc.queue_status()
        assert status["unassigned"] == 0
        assert sorted(k for k in status if k != "unassigned") == rc.ids
        assert all(s["queue"] == 0 for k, s in status.items() if k != "unassigned")
    finally:
        rc.close()


# -- the client socket ---------------------------------------------------------------


def test_forged_tasks_are_dropped_unread(cluster):
    m = Mallory(cluster.info["client_url"], "forge")
    targets = {name: cluster.tmp / f"forged-{name}" for name in
               ("unsigned", "wrongkey", "head", "truncated")}
    frames = {name: capture_submit(cluster.rc, Path.touch, p) for name, p in targets.items()}
    wrong = wire.new_key()
    try:
        sig, head, *bufs = frames["unsigned"]
        m.send([b"", head, *bufs])
        sig, head, *bufs = frames["wrongkey"]
        m.send([sign(wrong, head), head, *bufs])
        sig, head, *bufs = frames["head"]
        m.send([sig, head[:-2] + bytes([head[-2] ^ 1]) + head[-1:], *bufs])
        m.send(frames["truncated"][1:2])  # the head alone: one frame
        m.send([b"\x80\x05garbage", os.urandom(300), os.urandom(7)])
        m.send([b"\0" * 32, b"\0" * HUGE])  # 64 MB, hashed and rejected
        logged = wait_logged(cluster, m, 6)
    finally:
        m.close()
    assert logged.count("signature") == 5 and "2 frames" in logged
    assert_serving(cluster)
    assert not [p for p in targets.values() if p.exists()]


def test_altered_buffer_fails_on_the_engine_without_being_unpickled(cluster):
    m = Mallory(cluster.info["client_url"], "buf")
    target = cluster.tmp / "forged-buffer"
    frames = capture_submit(cluster.rc, Path.touch, target)
    i = next(i for i, fr in enumerate(frames) if b"forged-buffer" in fr)
    frames[i] = frames[i].replace(b"forged-buffer", b"forged-BUFFER")
    try:
        m.send(frames)  # the head is genuine: the controller forwards the task
        kind, meta = m.recv(cluster.key)
    finally:
        m.close()
    assert kind == wire.RESULT and meta[2] == "error"
    assert "authentication" in str(meta), meta
    assert not target.exists() and not (cluster.tmp / "forged-BUFFER").exists()
    assert_serving(cluster)


def test_a_replayed_task_runs_once(cluster):
    m = Mallory(cluster.info["client_url"], "replay")
    target = cluster.tmp / "replayed"
    before = cluster.rc.queue_status()  # (asked first: a later request would outdate the capture)
    frames = capture_submit(cluster.rc, Path.touch, target)
    try:
        m.send(frames)  # the legitimate one: it runs
        kind, meta = m.recv(cluster.key)
        assert kind == wire.RESULT and meta[2] == "ok"
        target.unlink()
        m.send(frames)  # the same bytes again
        logged = wait_logged(cluster, m, 1)
    finally:
        m.close()
    assert "replayed" in logged
    after = cluster.rc.queue_status()
    assert after[0]["completed"] == before[0]["completed"] + 1
    assert not target.exists()
    assert_serving(cluster)


def test_signed_but_malformed_messages_do_not_crash_the_controller(cluster):
    """Only a key holder can send these (a peer bug, not an attack): each is dropped
    and logged, or answered with an error, and the controller serves on."""
    key = cluster.key
    to = cluster.info["controller_id"].encode()
    m = Mallory(cluster.info["client_url"], "malformed")
    seq = iter(range(1, 1000))

    def msg(kind: Any, meta: Any, bufs: list[bytes] = (), segs: Any = ()) -> list[bytes]:
        return signed(key, to, kind, meta, sender=m.ident, seq=next(seq), bufs=bufs, segs=segs)

    task = (None, (1, b"fkey", b""), [("forged-seg", 1, b"")], (None, ""))
    outside = f"{cluster.info['shm_prefix']}../../../tmp/x-1"

    dropped = [
        [sign(key, pickle.dumps("not a head")), pickle.dumps("not a head")],
        [sign(key, b"\x80\x05garbage"), b"\x80\x05garbage"],
        signed(key, to, wire.REQUEST, None, sender=["unhashable"]),
        signed(key, to, wire.REQUEST, None, sender=b"m2", seq="1"),
        msg(wire.SUBMIT, "not a tuple"),
        msg(wire.SUBMIT, (None, "xyz"), [b"f"]),
        msg(wire.SUBMIT, (None, (1, b"fkey", b""), [("forged-nobufs", 1, b"")], (None, ""))),
        msg(wire.REQUEST, "not a tuple"),
        msg(99, None),
        msg(wire.DONE, ("x", "ok")),
        msg(wire.SUBMIT, task, [b"f", b""], segs=((1, outside, 1 << 21, 1, 2),)),
        msg(wire.SUBMIT, task, [b"f", b""], segs=((7, "ipylb-1-ab-cd-1", 1 << 21, 1, 2),)),
        msg(wire.SUBMIT, task, [b"f", b""], segs="not a list"),
    ]
    answered = [
        msg(wire.REQUEST, (1, "no_such_op", None)),
        msg(wire.REQUEST, (2, "abort", 12345)),
        msg(wire.REQUEST, (3, "add_engines", 10**9)),
        msg(wire.REQUEST, (4, "add_engines", "lots")),
    ]
    # Tasks whose flags this controller cannot read (another version's client, say): each
    # is answered with an error result, so its submitter does not wait for it forever.
    # (Signed after the requests above: sequence numbers only grow.)
    refused = [
        msg(wire.SUBMIT, ({"no_such_flag": 1}, (1, b"fkey", b""), [("forged-flag", 0, b"")], (None, "")), [b"f"]),
        msg(wire.SUBMIT, ({"after": 12345}, (1, b"fkey", b""), [("forged-after", 0, b"")], (None, "")), [b"f"]),
        msg(wire.SUBMIT, ({"retries": "many"}, (1, b"fkey", b""), [("forged-retries", 0, b"")], (None, "")), [b"f"]),
        msg(wire.SUBMIT, ({"timeout": "soon"}, (1, b"fkey", b""), [("forged-timeout", 0, b"")], (None, "")), [b"f"]),
    ]
    try:
        for frames in dropped:
            m.send(frames)
        logged = wait_logged(cluster, m, len(dropped))
        for frames in answered:
            m.send(frames)
        replies = [m.recv(key) for _ in answered]
        for frames in refused:
            m.send(frames)
        results = m.recv_results(key, len(refused))
        logged += "\n" + wait_logged(cluster, m, len(dropped) + len(refused))
    finally:
        m.close()
    assert [(meta[0], meta[2], meta[7][0]) for meta in results] == [
        (f"forged-{name}", "error", "WireError") for name in ("flag", "after", "retries", "timeout")]
    assert all("refused" in meta[7][1] and "malformed" in meta[7][1] for meta in results)
    assert "unreadable" in logged
    assert [(k, meta[0], meta[1]) for k, meta in replies] == [
        (wire.REPLY, i, False) for i in range(1, len(answered) + 1)]
    assert_serving(cluster)


# -- the engine socket -----------------------------------------------------------------


def test_bad_messages_on_the_engine_socket(cluster):
    """Forged registrations and results: none is believed, and a task running meanwhile
    gets its own result (a forged DONE would have told the client 666)."""
    key = cluster.key
    to = cluster.info["controller_id"].encode()
    view = cluster.rc.load_balanced_view()
    running = view.apply_async(time.sleep, 1.0)
    fake_result = pickle.dumps(666)
    wrong = wire.new_key()
    m = Mallory(cluster.info["engine_url"], "engine")
    done = (running.msg_ids[0], "ok", time.time(), time.time(), "", "", None)
    genuine = signed(key, to, wire.DONE, done, sender=b"e1", bufs=[fake_result],
                     mac=wire.Signer(key, b"x").bufs_mac([fake_result]))
    bad = [
        [b"", *genuine[1:]],                                   # unsigned
        [sign(wrong, genuine[1]), *genuine[1:]],               # wrong key
        [genuine[0], genuine[1] + b"x", *genuine[2:]],         # altered head
        genuine[:1],                                           # truncated
        [os.urandom(32), os.urandom(1000)],                    # garbage
        [b"\0" * 32, b"\0" * HUGE],                            # huge
        genuine,                                 # signed, but mallory never registered
        signed(key, to, wire.REGISTER, "not a dict", sender=b"e2"),  # would be a ghost engine
        signed(key, to, wire.REGISTER, ["x"], sender=b"e3"),
        signed(key, to, 99, None, sender=b"e4"),
        signed(key, to, wire.SUBMIT, ("x", None), sender=b"e5"),
    ]
    try:
        for frames in bad:
            m.send(frames)
        wait_logged(cluster, m, len(bad))
    finally:
        m.close()
    assert running.get(timeout=15) is None
    assert running.metadata.engine_id == 0
    assert_serving(cluster)


def test_engines_listen_on_no_tcp_port(cluster):
    """A forged task cannot reach an engine directly: the task channel connects out to
    the controller, and the kernel's own channels are unix sockets in the private
    runtime directory (authenticated by Jupyter's session key besides)."""
    def iopub_pipe_port():  # nested: pickled by value, the engine need not import us
        from ipykernel.kernelapp import IPKernelApp

        return IPKernelApp.instance().iopub_thread._pipe_port

    [info] = cluster.rc.engine_info().values()
    engine = psutil.Process(info["pid"])
    listening = {c.laddr.port for c in engine.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    # The one tcp listener is ipykernel's own: forked children's output comes back on it,
    # gated by a random token, and it only ever reaches iopub (it runs nothing).
    assert listening <= {cluster.rc.load_balanced_view().apply_sync(iopub_pipe_port)}
    assert json.loads(Path(info["connection_file"]).read_text())["transport"] == "ipc"
    assert oct(Path(info["connection_file"]).parent.stat().st_mode & 0o777) == "0o700"


def test_servers_bind_to_loopback_and_the_file_is_private(cluster):
    for field in ("client_url", "engine_url"):
        assert cluster.info[field].startswith("tcp://127.0.0.1:")
    assert oct(cluster.path.stat().st_mode & 0o777) == "0o600"


def test_the_key_is_never_logged(cluster):
    m = Mallory(cluster.info["client_url"], "keylog")
    try:
        m.send([b"", b"x"])
        wait_logged(cluster, m, 1)
    finally:
        m.close()
    assert_serving(cluster)
    text = cluster.log.read_bytes()
    assert b"DEBUG" in text or b"INFO" in text  # the log is verbose, not empty
    assert cluster.key not in text
    assert bytes.fromhex(cluster.key.decode()) not in text
