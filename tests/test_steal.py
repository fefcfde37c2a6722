"""hwm="auto" with real engine kernels: a short task never waits behind a long one while
another engine is idle (it is stolen back), and a steal never makes a task run twice.

The steal races are driven exactly: a real engine kernel (started through jupyter_client)
against a controller played by the test on real, signed sockets, so the test decides
when a steal request arrives (before the task started, or just after)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ipylb
import pytest
import zmq
from ipylb import serialize, wire
from ipylb.connection import KERNEL_NAME
from jupyter_client import KernelManager
from test_pending import Gate, wait_at_gate

TIMEOUT = 60


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


def test_short_tasks_do_not_wait_behind_a_long_one(gate):
    """One long task and many short ones on 2 engines, on a cluster whose pipeline has grown:
    the short ones all finish while the long one is held at the gate, all on the other
    engine (those queued behind the long task are taken back: stolen for the idle engine,
    or recalled once the long one has run for the hold time)."""
    with ipylb.Client(engines=2, hwm="auto") as rc:
        assert rc.cluster_info["hwm"] == "auto"
        view = rc.load_balanced_view()
        assert rc.controller_stats()["pipeline"]["depth"] == 1  # nothing measured yet
        view.map_sync(abs, range(200))  # trivial tasks: the depth grows (slow start)
        assert rc.controller_stats()["pipeline"]["depth"] >= 2
        long = view.apply_async(wait_at_gate, gate.port)
        shorts = [view.apply_async(time.sleep, 0.01) for _ in range(20)]  # some behind long
        conn = gate.running()
        for ar in shorts:
            assert ar.get(TIMEOUT) is None  # while the long one is still at the gate
        assert not long.ready()
        conn.sendall(b"go")
        assert long.get(TIMEOUT) == "go"
        assert {ar.engine_id for ar in shorts} == set(rc.ids) - {long.engine_id}
        # long ran past the hold time (0.1 s at least) while the shorts ran: its engine was
        # held, and whatever was queued behind it was taken back (stolen or recalled)
        assert rc.controller_stats()["pipeline"]["holds"] >= 1
        # follow holds with auto: b runs where a ran, even with the other engine idle
        a = view.apply_async(os.getpid)
        held = rc.load_balanced_view()
        held.set_flags(follow=a)
        assert held.apply_async(os.getpid).get(TIMEOUT) == a.get(TIMEOUT)


def test_hwm_auto_is_refused_when_misspelled():
    with pytest.raises(ValueError, match="'auto'"):
        ipylb.Client(engines=1, hwm="Auto")


# -- one real engine, the controller played by the test ---------------------------------


def marked_sleep(marker_dir, name, seconds):
    """Leave a file per run (so runs can be counted), then sleep."""
    import os
    import time
    import uuid

    open(os.path.join(marker_dir, f"{name}.{uuid.uuid4().hex}"), "w").close()
    time.sleep(seconds)
    return name


class FakeController:
    """A ROUTER socket and a signer: what an engine sees of a controller."""

    def __init__(self, tmp: Path) -> None:
        self.key = wire.new_key()
        self.ident = b"controller-steal-test"
        self.signer = wire.Signer(self.key, self.ident)
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.cluster = tmp / "cluster.json"
        self.cluster.write_text(json.dumps({"key": self.key.decode(), "controller_id": self.ident.decode(),
                                            "engine_url": f"tcp://127.0.0.1:{port}",
                                            "hwm": "auto"}))
        os.chmod(self.cluster, 0o600)
        self.km = KernelManager(kernel_name=KERNEL_NAME)
        self.km.start_kernel(env={**os.environ, "IPYLB_CLUSTER_FILE": str(self.cluster),
                                  "PYTHONPATH": os.path.dirname(__file__)})  # marked_sleep
        self.engine = b""
        self.sent = 0

    def recv(self, want: int, timeout: float = TIMEOUT) -> tuple[bytes, object]:
        """The next message of kind ``want`` (others, such as health reports, skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no message of kind {want} within {timeout} s"
            if not self.sock.poll(left * 1000):
                continue
            frames = self.sock.recv_multipart()
            kind, sender, meta, _bufs, _mac = self.signer.unpack(frames[1:])
            if kind == want:
                return sender, meta

    def done(self, n: int, timeout: float = TIMEOUT) -> list[str]:
        """The msg_ids of the next ``n`` results, whether they came one per message (DONE)
        or several (DONES)."""
        deadline = time.monotonic() + timeout
        ids: list[str] = []
        while len(ids) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(ids)} results of {n} within {timeout} s: {ids}"
            if not self.sock.poll(left * 1000):
                continue
            kind, _sender, meta, bufs, _mac = self.signer.unpack(self.sock.recv_multipart()[1:])
            if kind == wire.DONE:
                ids.append(meta[0])
            elif kind == wire.DONES:
                ids.extend(item[0][0] for item in wire.unbatch(meta, bufs))
        return ids

    def register(self) -> None:
        sender, _meta = self.recv(wire.REGISTER)
        self.engine = sender
        self.sock.send_multipart([sender, *self.signer.pack(wire.REGISTERED, 0, to=sender)])
        fn = serialize.dumps_function(marked_sleep)
        self.fkey = self.signer.bufs_mac(fn)
        self.sock.send_multipart([sender, *self.signer.pack(wire.FUNCTION, (self.fkey, []), fn,
                                                            to=sender)])

    def task(self, msg_id: str, *args: object) -> int:
        self.sent += 1
        bufs = serialize.dumps_args(args, {})
        self.sock.send_multipart([self.engine, *self.signer.pack(
            wire.TASK, (msg_id, self.fkey, 0, self.sent), bufs, to=self.engine)])
        return self.sent

    def steal(self, msg_id: str, number: int, signer: wire.Signer | None = None) -> None:
        to = self.engine + b"/steal"
        self.sock.send_multipart([to, *(signer or self.signer).pack(wire.STEAL, (msg_id, number),
                                                                   to=to)])

    def close(self) -> None:
        self.km.shutdown_kernel(now=True)
        self.sock.close(0)


@pytest.fixture
def fake(tmp_path):
    f = FakeController(tmp_path)
    try:
        f.register()
        yield f
    finally:
        f.close()


def runs(marker_dir: Path, name: str) -> int:
    return sum(1 for p in marker_dir.iterdir() if p.name.startswith(name + "."))


def wait_for_run(marker_dir: Path, name: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not runs(marker_dir, name):
        assert time.monotonic() < deadline, f"{name} never started"
        time.sleep(0.01)


def test_a_queued_task_is_given_back_and_never_runs_there(fake, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    fake.task("long", str(marks), "long", 1.0)
    n = fake.task("queued", str(marks), "queued", 0.0)
    wait_for_run(marks, "long")  # the engine is inside the long task: "queued" waits
    fake.steal("queued", n)
    sender, meta = fake.recv(wire.STOLEN)
    assert sender == fake.engine + b"/steal" and meta == ("queued", True)
    fake.task("after", str(marks), "after", 0.0)
    done = [fake.recv(wire.DONE)[1][0] for _ in range(2)]
    assert done == ["long", "after"]  # nothing for "queued": it was skipped
    assert runs(marks, "queued") == 0


def test_a_task_queued_twice_on_an_engine_is_given_back_by_its_number(fake, tmp_path):
    """The same task can be queued twice on one engine (given back, retried elsewhere, then
    sent here again behind a long task) and given back twice.  The engine kept what it gave
    back by msg_id: the first copy's skip forgot it, and the second copy ran here while the
    engine it was given to ran it too.  By number, each copy is skipped or run as answered."""
    marks = tmp_path / "marks"
    marks.mkdir()
    fake.task("long", str(marks), "long", 1.5)
    first = fake.task("twice", str(marks), "twice", 0.0)
    wait_for_run(marks, "long")
    fake.steal("twice", first)
    assert fake.recv(wire.STOLEN)[1] == ("twice", True)
    second = fake.task("twice", str(marks), "twice", 0.0)  # back again, still behind "long"
    fake.steal("twice", second)
    assert fake.recv(wire.STOLEN)[1] == ("twice", True)
    # and a copy given back while another copy of the same task stays: that one runs
    fake.task("again", str(marks), "again", 0.0)
    kept = fake.task("again", str(marks), "again", 0.0)
    fake.steal("again", kept)
    assert fake.recv(wire.STOLEN)[1] == ("again", True)
    fake.task("after", str(marks), "after", 0.0)
    assert fake.done(3) == ["long", "again", "after"]
    assert runs(marks, "twice") == 0 and runs(marks, "again") == 1


def test_a_steal_of_a_task_that_just_started_is_too_late(fake, tmp_path):
    """The race: the engine has just taken the task (its result is on its way) when the
    request arrives: the answer is "too late", and the task runs once, its result comes."""
    marks = tmp_path / "marks"
    marks.mkdir()
    fake.task("first", str(marks), "first", 0.2)
    n = fake.task("next", str(marks), "next", 0.5)
    assert fake.recv(wire.DONE)[1][0] == "first"
    wait_for_run(marks, "next")
    fake.steal("next", n)
    assert fake.recv(wire.STOLEN)[1] == ("next", False)
    assert fake.recv(wire.DONE)[1][:2] == ("next", "ok")
    # and one that already ended, asked for late (the answer crossing its result)
    fake.steal("first", 1)
    assert fake.recv(wire.STOLEN)[1] == ("first", False)
    assert runs(marks, "next") == 1 and runs(marks, "first") == 1


def test_a_steal_under_another_key_is_ignored(fake, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    fake.task("long", str(marks), "long", 0.5)
    n = fake.task("queued", str(marks), "queued", 0.0)
    wait_for_run(marks, "long")
    forger = wire.Signer(wire.new_key(), fake.ident)
    fake.steal("queued", n, signer=forger)
    done = [fake.recv(wire.DONE)[1][0] for _ in range(2)]
    assert done == ["long", "queued"]  # it ran: the forged request did nothing
    assert runs(marks, "queued") == 1


def test_hwm_on_the_command_lines(capsys):
    """`--hwm` takes an int >= 0 or auto, on `ipylb cluster start` and `ipylb bench`; anything
    else is refused before anything starts, with the reason."""
    import argparse

    from ipylb import cli
    from ipylb.bench import main as bench_main

    assert cli._hwm("auto") == "auto" and cli._hwm("0") == 0 and cli._hwm("4") == 4
    for bad in ("fast", "-1", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="int >= 0 .* or 'auto'"):
            cli._hwm(bad)
    with pytest.raises(SystemExit):
        bench_main(["--hwm", "1,fast"])
    assert "--hwm: hwm must be an int >= 0 (0: no limit) or 'auto', not 'fast'" in capsys.readouterr().err
