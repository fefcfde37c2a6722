"""A real controller with a swarm of engine identities (``ipylb.bench.swarm``: processes
that speak the engine protocol over real sockets): what clients see as engines come and go.
"""

from __future__ import annotations

import subprocess
from typing import Any

import ipylb
import pytest
from ipylb import wire
from ipylb.bench import swarm
from ipylb.client.local import LocalCluster


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
    """A controller with no engines of its own (heartbeat timeout 2 s); yields it and a
    function that spawns swarm processes, all stopped at the end."""
    cluster = LocalCluster(0, heartbeat_timeout=2.0)
    procs: list[subprocess.Popen] = []

    def spawn(n: int) -> list[subprocess.Popen]:
        new = swarm.spawn(cluster.info, n)
        procs.extend(new)
        return new

    try:
        yield cluster, spawn
    finally:
        cluster.stop()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_engine_events_are_deltas_and_every_client_sees_the_same_engines(swarm_cluster):
    cluster, spawn = swarm_cluster
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
