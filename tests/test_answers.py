"""How can a task be left without an answer?  Controller and client paths found by an audit
(issue 9), each answered now: results the client cannot read, submissions the controller
cannot take, a task whose record is gone."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import ipylb
import pytest
from ipylb import connection, wire
from ipylb.client.outcome import Outcome
from ipylb.controller.hub import Controller
from ipylb.controller.records import Function, Record, TaskDB, TaskStore
from ipylb.error import RemoteError, WireError
from procs import DrivenController
from test_pending import TIMEOUT, Gate, wait_at_gate


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


@pytest.mark.parametrize("meta", [
    ("t1", 0, "error", None, None, "", "", ("OnlyAName",)),  # an error this version cannot read
    ("t1", 0, "ok"),  # too short
    ("t1", 0, "error", None, None, "", "", None, None),  # an error without its report
])
def test_a_malformed_result_answers_its_task_with_an_error(meta):
    outcome = Outcome.received(meta, [], b"")
    assert outcome.meta[0] == "t1" and not outcome.ok
    error = outcome.error()
    assert isinstance(error, RemoteError) and error.ename == "WireError"
    assert "malformed" in error.evalue and "versions" in error.evalue


@pytest.mark.parametrize("meta", [None, (), (42, 0, "ok"), "t1"])
def test_a_result_naming_no_task_is_dropped_as_a_wire_error(meta):
    with pytest.raises(WireError, match="names no task"):
        Outcome.received(meta, [], b"")


def test_a_malformed_result_from_the_controller_still_ends_the_wait(rc, view, gate):
    """A result this client cannot read (a controller of another version) answers the task
    with an error instead of killing the receiving thread's handling of it halfway."""
    ar = view.apply_async(wait_at_gate, gate.port)
    conn = gate.running()
    msg_id = ar.msg_ids[0]
    rc._on_message(wire.RESULT, b"", (msg_id, 0, "error", None, None, "", "", ("Odd",)), [], b"")
    with pytest.raises(RemoteError, match="malformed") as e:
        ar.get(TIMEOUT)
    assert e.value.ename == "WireError"
    assert any(m.msg_id == msg_id for m in rc.failures)
    conn.sendall(b"late")  # the genuine result comes later: the first answer stands
    with ipylb.Client(rc.cluster_info["client_url"]) as other:
        assert other.get_result(msg_id).get(TIMEOUT) == "late"
    with pytest.raises(RemoteError, match="malformed"):
        ar.get(TIMEOUT)


class Proxy:
    """A TCP forwarder between clients and the controller's client socket, which the test
    can cut (every connection closed, new ones refused) and restore."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.links: list[socket.socket] = []
        self._listen()

    def _listen(self) -> None:
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                a, _ = server.accept()
            except OSError:  # closed by cut()
                return
            b = socket.create_connection(self.target)
            self.links += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way (Linux)
        self.server.close()
        for s in self.links:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.links = []

    def restore(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        self._listen()

    def close(self) -> None:
        self.cut()


def test_results_sent_while_a_client_was_disconnected_reach_it_once_it_is_back(rc, gate):
    """The connection to the controller breaks while a task runs and its result is sent
    meanwhile (the socket drops it); once zmq has reconnected, the client asks again
    (was: it waited forever, pings answered and all)."""
    info = dict(rc._info)
    proxy = Proxy(info["client_url"])
    info["client_url"] = f"tcp://127.0.0.1:{proxy.port}"
    path = connection.runtime_dir() / f"ipylb-h9ctl-proxy-{proxy.port}.json"
    connection.write(path, info)
    try:
        with ipylb.Client(str(path)) as far:
            view = far.load_balanced_view()
            assert view.apply_async(square, 3).get(TIMEOUT) == 9  # through the proxy
            ar = view.apply_async(wait_at_gate, gate.port)
            conn = gate.running()
            proxy.cut()
            conn.sendall(b"while away")
            # The controller has the result (another client gets it), ours was dropped.
            assert rc.get_result(ar.msg_ids[0]).get(TIMEOUT) == "while away"
            assert not ar.ready()
            proxy.restore()
            assert ar.get(TIMEOUT) == "while away"
            assert view.apply_async(square, 7).get(TIMEOUT) == 49  # and it serves on
    finally:
        proxy.close()
        path.unlink(missing_ok=True)


def square(x):
    return x * x


def test_a_record_the_database_cannot_take_is_kept_in_memory(tmp_path, caplog):
    """A failing SQLite write (a full disk; here a read-only database) used to raise out of
    the controller's delivery of a result, dropping the commands after it (the next
    task's Assign: a task that then never ran)."""
    store = TaskStore(db=TaskDB(tmp_path / "tasks.sqlite"))
    store.db.db.execute("PRAGMA query_only = ON")  # every write now fails
    rec = Record("t0", b"client-x-r", Function(b"k", [b"f"], b""), [b"a"], b"mac")
    rec.result = (0, "ok", 1.0, 2.0, "", "", None)
    store.add(rec)
    with caplog.at_level(logging.WARNING, logger="ipylb.controller"):
        assert store.finished(rec) == []
    assert "t0 was not saved to the database" in caplog.text
    assert store.get("t0") is rec


def test_a_result_sent_just_before_its_engine_is_declared_dead_is_delivered():
    """An engine's result waits in the controller's socket when the engine is declared dead
    (its heartbeat silent; the same for a process exit): the result is taken first, so the
    task that finished succeeds instead of failing with EngineError (or running again).

    A real Controller object on real sockets, driven step by step (time is an argument of
    its housekeeping); the engine and the client are plain DEALER sockets of the test."""
    key = wire.new_key()
    d = DrivenController(Controller(key, heartbeat_timeout=5.0), key, "h9")
    ctl, engine, submit, results, serve = d.ctl, d.engine, d.submit, d.results, d.serve
    esign, ssign, rsign, receive = d.esign, d.ssign, d.rsign, d.receive
    try:
        fkey = ssign.bufs_mac([b"function"])  # the function's frames, then the task's
        submit.send_multipart(ssign.pack(
            wire.SUBMIT, (None, (1, fkey, fkey), [("t1", 1, ssign.bufs_mac([b"argument"]))],
                          (None, "")),
            [b"function", b"argument"], b""))
        serve(ctl.clients, ctl._on_client)
        assert receive(engine, esign)[:2] == (wire.FUNCTION, (fkey, []))  # once per engine
        kind, meta = receive(engine, esign)[:2]
        assert (kind, meta[:2]) == (wire.TASK, ("t1", fkey))  # (hwm="auto" numbers it too)
        now = time.time()
        engine.send_multipart(esign.pack(wire.DONE, ("t1", "ok", now, now, "", "", None),
                                         [b"the result"]))
        assert ctl.engines.poll(10_000)  # it waits in the controller's socket, unread
        ctl._housekeeping(time.monotonic() + 60)  # a minute of heartbeat silence: dead
        assert ctl.engine_ident == {}
        ctl._flush_results()  # (the end of the loop's turn)
        kind, meta, bufs, _ = receive(results, rsign)
        assert (kind, meta[0], meta[2], bufs) == (wire.RESULT, "t1", "ok", [b"the result"])
    finally:
        d.close()


def test_wait_on_a_msg_id_another_client_submitted_and_this_one_fetched(rc, view, gate):
    """rc.wait(msg_id) knew only this client's own submissions: for a task fetched with
    get_result it raised KeyError ('never submitted') while the task was pending."""
    ar = view.apply_async(wait_at_gate, gate.port)
    conn = gate.running()
    with ipylb.Client(rc.cluster_info["client_url"]) as other:
        hub = other.get_result(ar.msg_ids[0])
        assert other.wait(ar.msg_ids[0], timeout=0) is False  # pending, and known
        conn.sendall(b"done")
        assert other.wait(ar.msg_ids[0], timeout=TIMEOUT) is True
        assert hub.get(0) == "done"
        with pytest.raises(KeyError, match="never submitted here"):
            other.wait("no-such-task", timeout=0)
