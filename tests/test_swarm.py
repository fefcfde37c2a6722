"""A real controller with a swarm of engine identities (``ipylb.bench.swarm``: processes
that speak the engine protocol over real sockets): what clients see as engines come and go.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import ipylb
import pytest
from ipylb import wire
from ipylb.bench import swarm
from ipylb.client.local import LocalCluster
from procs import reap


class EventLog(ipylb.Client):
    """A Client that keeps every EVENT the controller sends it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.events: list[tuple] = []
        super().__init__(*args, **kwargs)

    def _on_message(self, kind: int, sender: bytes, meta: Any, bufs: list[Any], mac: bytes) -> None:
        if kind == wire.EVENT:
            self.events.append(meta)
        super()._on_message(kind, sender, meta, bufs, mac)


def wait_engines(rc: ipylb.Client, n: int, timeout: float = 60) -> None:
    """Until exactly ``n`` engines are registered as ``rc`` sees it (on its state's events)."""
    with rc._state:
        assert rc._state.wait_for(lambda: len(rc._engine_ids) == n, timeout), (len(rc), n)


@pytest.fixture
def swarm_cluster():
    """Yields ``start(heartbeat_timeout=10.0)`` -> (a controller with no engines of its own,
    a function that spawns swarm processes); all stopped at the end.  10 s by default: a
    loaded machine must not lose identities by accident."""
    clusters: list[LocalCluster] = []
    procs: list[subprocess.Popen] = []

    def start(heartbeat_timeout: float = 10.0) -> tuple[LocalCluster, Any]:
        cluster = LocalCluster(0, heartbeat_timeout=heartbeat_timeout)
        clusters.append(cluster)

        def spawn(n: int) -> list[subprocess.Popen]:
            new = swarm.spawn(cluster.info, n)
            procs.extend(new)
            return new

        return cluster, spawn

    try:
        yield start
    finally:
        for cluster in clusters:
            cluster.stop()
        reap(procs)


def test_engine_events_are_deltas_and_every_client_sees_the_same_engines(swarm_cluster):
    cluster, spawn = swarm_cluster(heartbeat_timeout=4.0)  # the killed ones go after 4 s
    early = EventLog(str(cluster.connection_file))
    try:
        procs = spawn(40)  # 4 processes of 10 identities
        early.wait_for_engines(40, 60)
        late = ipylb.Client(str(cluster.connection_file))  # the whole list in its welcome
        try:
            assert late.ids == early.ids == list(range(40))
            kinds = [e[0] for e in early.events]
            # One small event per registration, never the whole list again (which made n
            # registrations cost O(n^2) to every listener).
            assert "engines" not in kinds
            assert sorted(e[1] for e in early.events if e[0] == "engine_added") == list(range(40))
            procs[0].kill()  # 10 identities stop answering heartbeats
            procs[0].wait()
            wait_engines(early, 30)
            wait_engines(late, 30)
            assert late.ids == early.ids
            removed = {e[1] for e in early.events if e[0] == "engine_removed"}
            assert removed == set(range(40)) - set(early.ids) and len(removed) == 10
            # the 30 left still take tasks (a swarm answers None without running them)
            assert late.load_balanced_view().map_sync(abs, range(60)) == [None] * 60
        finally:
            late.close()
    finally:
        early.close()


@pytest.mark.parametrize("n", [100, 1000])
def test_panel_and_top_of_a_large_cluster_stay_a_screenful(swarm_cluster, n):
    """Issue 15 item 7: beyond a screenful of engines the dashboard draws MAX_ROWS rows and
    MAX_LANES lanes (busiest first) plus one "+N" row and lane, from an activity answer of
    bounded size (the controller sums the rest), whatever the engine count; ``ipylb top``
    likewise; and once the cluster is gone, the panel says so and stops."""
    from ipylb import dashboard, top
    from rich.console import Console

    cluster, spawn = swarm_cluster()
    rc = ipylb.Client(str(cluster.connection_file))
    try:
        spawn(n)
        rc.wait_for_engines(n, 120)
        assert rc.load_balanced_view().map_sync(abs, range(2 * n)) == [None] * (2 * n)
        act = rc.activity(top=dashboard.MAX_ROWS)
        assert len(act["engines"]) == dashboard.MAX_ROWS  # the answer: bounded
        assert len(act["status"]) == dashboard.MAX_ROWS + 1  # (+ "unassigned")
        assert set(act["buckets"]) <= set(act["engines"])
        assert act["rest"]["engines"] == n - dashboard.MAX_ROWS
        assert act["rest"]["completed"] + sum(s["completed"] for e, s in act["status"].items()
                                              if e != "unassigned") >= 2 * n

        d = dashboard.Dashboard(rc)
        try:
            assert len(d.rows) == dashboard.MAX_ROWS  # rows built per refresh, not n
            html = d.engines.value
            assert html.count('<tr class="ipylb-engine"') == dashboard.MAX_ROWS
            assert f'<tr class="ipylb-engine-rest"><td>+{n - dashboard.MAX_ROWS}</td>' in html
            assert f'class="ipylb-live">{n}<' in d.summary.value
            lanes = d.lanes(act["now"])
            assert len(lanes) == dashboard.MAX_LANES + 1
            assert lanes[-1][0] == f"+{n - dashboard.MAX_LANES}"
            d._draw_stream(act["now"])
            assert len(d._lane_names.text) == dashboard.MAX_LANES + 1

            t = top.Top(rc, "swarm")
            screen = t.render(t.poll())
            table = screen.renderables[1]
            assert table.row_count == top.MAX_ROWS + 1  # the busiest, then "+N"
            console = Console(width=160, record=True, file=open(os.devnull, "w"))
            console.print(screen)
            text = console.export_text()
            assert f"engines {n} " in text and f"+{n - top.MAX_ROWS}" in text

            cluster.stop()  # the cluster goes: the panel says so and stops updating
            d._thread.join(30)
            assert not d.running, "the dashboard kept polling a gone cluster"
            assert "the cluster is gone" in d.summary.value
        finally:
            d.close()
    finally:
        rc.close()


def test_a_forgotten_client_that_comes_back_gets_the_whole_engine_list(tmp_path):
    """Deltas assume a listener heard every one: a client forgotten meanwhile (silent for
    --forget-after) missed some, so its next ping brings it the whole list again."""
    import json
    import sys

    import zmq
    from ipylb import compat

    path = tmp_path / "ipylb-forget.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipylb.controller", "--connection-file", str(path),
         "--engines", "0", "--parent-pid", str(os.getpid()), "--forget-after", "3.0"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)})
    procs: list[subprocess.Popen] = []
    sock = zmq.Context.instance().socket(zmq.DEALER)
    rc = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        info = json.loads(path.read_text())
        rc = ipylb.Client(str(path))  # a live client (it pings): it stays a listener
        ident = b"comes-back-r"
        signer = wire.Signer(info["key"].encode(), ident, info["controller_id"].encode())
        sock.setsockopt(zmq.IDENTITY, ident)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(info["client_url"])

        def send(kind: int, meta: Any) -> None:
            sock.send_multipart([bytes(f) for f in signer.pack(kind, meta)])

        def receive() -> tuple[int, Any]:
            assert sock.poll(20_000), "nothing from the controller"
            kind, _sender, meta, _b, _m = wire.Signer(info["key"].encode(), ident).unpack(
                sock.recv_multipart())
            return kind, meta

        send(wire.HELLO, {"versions": compat.versions()})
        kind, meta = receive()
        assert kind == wire.WELCOME and meta["engines"] == []
        before = rc._request("validate", None, 30)["listeners"]
        deadline = time.monotonic() + 60  # silent: forgotten within a few seconds
        while rc._request("validate", None, 30)["listeners"] == before:
            assert time.monotonic() < deadline, "the silent client was never forgotten"
            time.sleep(0.2)
        procs = swarm.spawn(info, 4)  # registrations it does not hear about
        rc.wait_for_engines(4, 60)
        assert not sock.poll(500)
        send(wire.REQUEST, (1, "queue_status", False))  # its ping: it listens again
        got = [receive() for _ in range(2)]
        assert (wire.EVENT, ("engines", [0, 1, 2, 3])) in got
        assert any(k == wire.REPLY for k, _ in got)
    finally:
        sock.close(0)
        if rc is not None:
            rc.close()
        proc.terminate()
        proc.wait(10)
        reap(procs)
