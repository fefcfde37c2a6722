"""The dashboard's widgets follow a real cluster, updated by their own thread."""

from __future__ import annotations

import os
import re
import signal
import time

import ipylb
import pytest
from ipylb.dashboard import Dashboard


def sleep_then(x, delay):
    time.sleep(delay)
    return x


def fail():
    raise ValueError("dashboard test failure")


def until(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` (a widget's value, say) until it holds, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def queue_depth(dash):
    return int(re.search(r'class="ipylb-queue-depth">(\d+)<', dash.summary.value).group(1))


def engine_states(dash):
    return re.findall(r'data-engine="(\d+)"><td>\d+</td><td>[^<]*</td><td class="ipylb-(\w+)"', dash.engines.value)


@pytest.fixture
def dash(rc):
    d = rc.dashboard()
    yield d
    d.close()


def test_one_row_per_engine(dash, rc):
    assert dash.engines.value.count('<tr class="ipylb-engine"') == len(rc.ids) == 2
    assert [int(e) for e, _ in engine_states(dash)] == rc.ids
    assert dash.interval <= 0.5  # at least twice a second
    # Each engine's host (local engines: this machine's name; tests/test_multihost.py shows
    # remote ones with their address).
    import socket
    assert [r.host for r in dash.rows] == [socket.gethostname()] * 2
    assert f"<td>{socket.gethostname()}</td>" in dash.engines.value


def test_queue_depth_and_busy_engines_update_live(dash, view):
    view.map_async(sleep_then, range(2), [1.0, 1.0])
    amr = view.map_async(sleep_then, range(3), [0.0] * 3)
    until(lambda: queue_depth(dash) == 3, what="queue depth 3")
    assert [s for _, s in engine_states(dash)] == ["busy", "busy"]
    until(lambda: queue_depth(dash) == 0 and amr.ready(), what="the queue to drain")
    until(lambda: [s for _, s in engine_states(dash)] == ["idle", "idle"], what="idle engines")
    done = [int(d) for d in re.findall(r"<td>(\d+)</td></tr>", dash.engines.value)]
    assert sum(done) >= 5
    until(lambda: dash.throughput is not None and dash.throughput > 0, what="a throughput")
    assert "tasks/s (last minute)" in dash.summary.value


def test_failures_list_reasons(dash, view, rc):
    bad = view.apply_async(fail)
    with view.temp_flags(after=[bad]):
        impossible = view.apply_async(sleep_then, 1, 0)
    blocker = view.apply_async(sleep_then, 1, 1.0)
    with view.temp_flags(after=[blocker], timeout=0.1):
        timed_out = view.apply_async(sleep_then, 2, 0)
    for ar in (bad, impossible, timed_out):
        ar.wait(10)

    def row(ar):
        m = re.search(rf'<tr class="ipylb-failure[^"]*" data-ename="(\w+)"><td>{ar.msg_ids[0]}</td>'
                      r"<td>[^<]*</td><td[^>]*>\w+</td><td>([^<]*)</td>", dash.failures.value)
        return m and m.groups()

    until(lambda: row(bad) and row(impossible) and row(timed_out), what="three failure rows")
    assert row(bad) == ("ValueError", "dashboard test failure")
    ename, reason = row(impossible)
    assert ename == "ImpossibleDependency" and bad.msg_ids[0] in reason
    assert row(timed_out)[0] == "DependencyTimeout"
    blocker.get(10)


def test_several_dashboards_update_independently(rc, view):
    one, two = rc.dashboard(), rc.dashboard()
    try:
        one.close()
        assert not one.running and two.running
        frozen = one.engines.value
        view.map_sync(sleep_then, range(4), [0.0] * 4)
        until(lambda: two.engines.value != frozen, what="the open dashboard to move on")
        assert one.engines.value == frozen
    finally:
        two.close()


def test_dead_engine_shown_and_thread_ends_with_the_client():
    with ipylb.Client(engines=2, restart=False) as rc:
        dash = Dashboard(rc)
        pid = rc.engine_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        until(lambda: ("1", "dead") in engine_states(dash), what="engine 1 shown dead")
        assert ("0", "idle") in engine_states(dash)
        assert '<span class="ipylb-live">1</span>' in dash.summary.value
    until(lambda: not dash.running, what="the dashboard thread to stop")
    assert "stopped: the client was shut down" in dash.summary.value


def test_activity_reports_tasks_engine_health_and_current_task(rc, view):
    """The controller's activity request: finished tasks with their label or function,
    per-second buckets, and each engine's host, pid, CPU, RSS and running task, which the
    engines report themselves (psutil, every second)."""
    first = rc.activity()
    with view.temp_flags(label="stream"):
        view.map(sleep_then, range(4), [0.0] * 4, block=True)
    view.map(sleep_then, range(2), [0.0] * 2, block=True)
    slow = view.apply_async(sleep_then, 1, 3.0)
    got = rc.activity(first["seq"])
    assert got["seq"] == first["seq"] + 6 and not got["skipped"]
    assert [t[4] for t in got["tasks"]] == ["stream"] * 4 + ["sleep_then"] * 2
    assert all(t[0] in rc.ids and t[1] <= t[2] and t[3] is True for t in got["tasks"])
    assert sum(b[1] for bs in got["buckets"].values() for b in bs) >= 6

    def running():
        a = rc.activity(got["seq"], int(time.time()))
        return [e for e in a["engines"].values() if e["task"] is not None] and a

    deadline = time.monotonic() + 30
    while not (now := running()):
        assert time.monotonic() < deadline, "no engine reported the running task"
        time.sleep(0.2)
    (busy,) = [e for e in now["engines"].values() if e["task"] is not None]
    assert busy["task"][0] == slow.msg_ids[0] and busy["task"][1] == "sleep_then"
    assert 0 <= now["now"] - busy["task"][2] < 3.5
    info = rc.engine_info()
    for eid, e in now["engines"].items():
        assert e["pid"] == info[eid]["pid"] and e["host"] == info[eid]["hostname"]
        assert e["rss"] > 10 << 20 and e["cpu"] >= 0
    assert slow.get(30) == 1
    with pytest.raises(ValueError, match="two ints"):
        rc._request("activity", "x")
