"""The dashboard's widgets follow a real cluster, updated by their own thread."""

from __future__ import annotations

import os
import re
import signal
import time

import ipylb
import numpy as np
import pytest
from ipylb import dashboard
from ipylb.dashboard import Dashboard


def sleep_then(x, delay):
    time.sleep(delay)
    return x


def invert(x):
    return 1 / x


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
        return [e for e in a["engines"].values()  # (another may still report a map's task)
                if e["task"] is not None and e["task"][0] == slow.msg_ids[0]] and a

    deadline = time.monotonic() + 30
    while not (now := running()):
        assert time.monotonic() < deadline, "no engine reported the running task"
        time.sleep(0.2)
    (busy,) = [e for e in now["engines"].values()
               if e["task"] is not None and e["task"][0] == slow.msg_ids[0]]
    assert busy["task"][0] == slow.msg_ids[0] and busy["task"][1] == "sleep_then"
    assert 0 <= now["now"] - busy["task"][2] < 3.5
    info = rc.engine_info()
    for eid, e in now["engines"].items():
        assert e["pid"] == info[eid]["pid"] and e["host"] == info[eid]["hostname"]  # (local)
        assert e["rss"] > 10 << 20 and e["cpu"] >= 0
    assert slow.get(30) == 1
    with pytest.raises(ValueError, match=r"activity takes \(seq, second\)"):
        rc._request("activity", "x")
    with pytest.raises(ValueError, match="top >= 1"):
        rc._request("activity", (0, 0, 0))
    with pytest.raises(ValueError, match="top must be an int >= 1"):
        rc.activity(top=0)
    # top=1 of 2 engines (both idle now): the one with the most busy seconds in the last
    # minute described, the other summed, every finished task counted once between them
    one = rc.activity(top=1)
    full = rc.activity()["buckets"]
    work = {e: sum(b[3] for b in full.get(e, ())) for e in rc.ids}
    (shown,) = one["engines"]
    assert shown == max(work, key=lambda e: (work[e], -e))
    assert set(one["status"]) == {shown, "unassigned"}
    rest = one["rest"]
    assert rest["engines"] == 1 and rest["busy"] == 0 and rest["running"] == []
    assert sum(b[1] for b in rest["buckets"]) + sum(b[1] for b in one["buckets"][shown]) \
        == sum(b[1] for bs in full.values() for b in bs)
    assert rc.activity(top=2).get("rest") is None  # no more engines than that: no sum


def test_activity_totals_stay_the_sum_of_the_engines_buckets_over_the_window():
    """The totals (what ``activity(top=N)`` sums the hidden engines from) and the per-engine
    buckets drop the same old seconds: an engine idle for a window, then pruned, left its
    seconds in the totals, and rest + shown exceeded every engine's buckets (seen: 1887 + 11
    against 18 after an earlier test's thousands of tasks)."""
    from ipylb.controller.activity import WINDOW_S, Activity

    act = Activity()
    for _ in range(50):
        act.finished(0, 1000.0, 1000.5, True, "old")  # engine 0: busy long ago, then gone
    act.finished(1, 1000.0 + WINDOW_S, 1000.0 + WINDOW_S + 30, True, "recent")
    act.finished(1, 1000.0 + WINDOW_S + 40, 1000.0 + WINDOW_S + 45, False, "recent")
    act.prune(1000.0 + WINDOW_S + 50)
    assert list(act.buckets) == [1]
    assert sum(b[1] for b in act.totals) == sum(b[1] for bs in act.buckets.values() for b in bs) == 2
    assert act.work[1] == pytest.approx(35.0)
    act.prune(1000.0 + 2 * WINDOW_S + 41)  # engine 1's first second leaves the window
    assert [b[1] for b in act.buckets[1]] == [b[1] for b in act.totals] == [1]
    assert act.work[1] == pytest.approx(5.0)


def sub_counts(dash, name):
    """(finished, total, failed, running, waiting) of the submission bar named ``name``."""
    m = re.search(rf'data-name="{re.escape(name)}">.*?class="ipylb-counts">(\d+)/(\d+) done · '
                  r"(\d+) failed · (\d+) running · (\d+) waiting", dash.progress.value)
    return m and tuple(int(g) for g in m.groups())


def test_progress_bar_per_submission_named_by_label(dash, view):
    with view.temp_flags(label="phase one"):
        amr = view.map_async(sleep_then, range(6), [1.5] * 6)
    odd = view.map_async(invert, [1, 0])  # named by its function
    until(lambda: (c := sub_counts(dash, "phase one")) and c[3] >= 1 and c[4] >= 1, 30,
          "phase one running and waiting")
    finished, total, failed, running, waiting = sub_counts(dash, "phase one")
    assert total == 6 and finished + running + waiting == 6 and failed == 0
    until(lambda: sub_counts(dash, "invert") == (2, 2, 1, 0, 0), 30, "the lambda's bar")
    until(lambda: sub_counts(dash, "phase one") == (6, 6, 0, 0, 0), 30, "phase one done")
    assert "done" in dash.progress.value and "tasks/s" in dash.progress.value
    amr.get(1)
    odd.wait(1)


def test_task_stream_draws_bars_coloured_by_label_and_marks_failures(dash, view):
    with view.temp_flags(label="blue-ish"):
        view.map_sync(sleep_then, range(4), [0.05] * 4)
    view.apply_async(fail).wait(30)
    live = view.apply_async(sleep_then, 0, 3.0)

    def drawn():
        dash._draw_stream(time.time())  # (what the thread does every STREAM_EVERY ticks)
        return dash._done.colors, dash._failed.x, dash._live.x

    blue, red = dash._colour("blue-ish"), dash._colour("fail")
    until(lambda: blue in drawn()[0] and red in drawn()[0] and len(drawn()[1]) >= 1
          and not np.isnan(dash._live.y).all(), 30, "bars, failure marks and a running bar")
    colours, fails, _ = drawn()
    assert blue != red
    assert all(-60 <= x <= 0 for x in fails)
    assert list(dash._lane_names.text) == [str(e) for e in dash.client.ids]
    # the health columns are filled from the engines' own reports
    until(lambda: re.search(r'class="ipylb-task">sleep_then</td><td class="ipylb-ran">\d',
                            dash.engines.value), 30, "the running task and its time")
    assert re.search(r'class="ipylb-rss">\d+<', dash.engines.value)
    live.get(30)
    assert min(dash.refresh_ms) < 1000


def test_impossible_chain_is_drawn_as_a_tree(dash, view):
    root = view.apply_async(fail)
    with view.temp_flags(after=[root]):
        child = view.apply_async(sleep_then, 1, 0)
    with view.temp_flags(after=[child]):
        grandchild = view.apply_async(sleep_then, 2, 0)
    grandchild.wait(30)
    r, c, g = (a.msg_ids[0] for a in (root, child, grandchild))
    until(lambda: g in dash.failures.value and "ipylb-tree" in dash.failures.value, 30,
          "the tree")
    tree = re.search(rf'<div class="ipylb-tree">({re.escape(r)}.*?)</div>', dash.failures.value,
                     re.S).group(1).splitlines()
    assert tree[0].startswith(f"{r}  ValueError")
    assert tree[1] == f"    └─ {c}  ImpossibleDependency"
    assert tree[2] == f"        └─ {g}  ImpossibleDependency"


def test_lanes_and_rows_aggregate_beyond_a_screenful(rc, view, monkeypatch):
    monkeypatch.setattr(dashboard, "MAX_LANES", 1)
    monkeypatch.setattr(dashboard, "MAX_ROWS", 1)
    monkeypatch.setattr(dashboard, "MAX_SUBMISSIONS", 1)
    v1 = rc.load_balanced_view(targets=1)
    held = [v1.map_async(sleep_then, range(3), [0.05] * 3), view.map_async(sleep_then, [1], [0])]
    for ar in held:
        ar.wait(30)
    d = rc.dashboard()
    try:
        (name, ids), summed = d.lanes(time.time())
        # the busiest (seconds of work in the last minute) keeps its lane; the controller
        # summed the other one (activity(top=1)): counted in "+1", its id not even sent
        full = rc.activity()["buckets"]
        busy = {e: sum(b[3] for b in full.get(e, ())) for e in rc.ids}
        assert ids == [max(busy, key=lambda e: (busy[e], -e))] and name == str(ids[0])
        assert summed == ("+1", []) and set(d._buckets) == set(ids)
        until(lambda: "ipylb-engine-rest" in d.engines.value, what="the summed row")
        assert d.engines.value.count('<tr class="ipylb-engine"') == 1
        assert d.progress.value.count('class="ipylb-sub"') == 1  # one bar, the rest counted
        assert re.search(r"… and \d+ more submissions", d.progress.value)
    finally:
        d.close()


def test_a_dashboard_whose_cluster_is_gone_says_so():
    rc = ipylb.Client(engines=1)
    try:
        dash = Dashboard(rc)
        os.kill(rc.cluster_info["pid"], signal.SIGKILL)
        until(lambda: not dash.running, 30, "the dashboard thread to stop")
        assert "the cluster is gone" in dash.summary.value or \
            "stopped: the client was shut down" in dash.summary.value
    finally:
        rc.close()
