"""The bounded soak (issue 12 item 3): two clients submit every kind of task (no-op maps,
short sleeps, after chains, follow groups, retries, walltimes, some made to overrun) while a
chaos thread SIGKILLs a random engine every 2 s (restart on) and the fuzzer hits both
controller sockets.  Nothing is lost, nothing is delivered or run twice, every error is one
the rules give, and the controller is consistent at the end.  About a minute; `ipylb soak`
runs the full-size one (20,000 tasks).
"""

from __future__ import annotations

import pytest
from ipylb.fuzz import KINDS
from ipylb.soak import run_soak

pytestmark = pytest.mark.slow


def test_soak_under_chaos_loses_nothing(tmp_path):
    report = run_soak(tasks=3000, engines=3, kill_every=2.0, fuzz_per_kind=200, timeout=240,
                      seed=7, log=tmp_path / "controller.log")
    print("\n" + "\n".join(f"{what:>32}  {value}" for what, value in report.rows()))
    assert report.tasks >= 3000
    assert report.lost == 0
    assert report.duplicate_results == 0 and report.duplicate_runs == 0
    assert report.unexpected == []
    assert report.succeeded + sum(report.errors.values()) == report.tasks
    assert report.succeeded > report.tasks * 0.8  # the errors are the few the kills caused
    assert report.kills >= 3 and report.restarts >= 1
    assert report.validate["records"] >= report.tasks  # validate() ran and passed
    assert report.fuzz == {kind: 400 for kind in KINDS}
    assert 0 < report.rss_start < report.rss_end


def test_kept_records_do_not_pin_receive_buffers():
    """The controller keeps every finished task's record (for get_result): a 100-byte task
    must not cost it a whole 8 KiB zmq receive buffer (it did: 11.4 KB of RSS per record)."""
    import ipylb
    import psutil

    with ipylb.Client(engines=1) as rc:
        controller = psutil.Process(rc.cluster_info["pid"])
        view = rc.load_balanced_view()
        view.map_sync(pow, [2] * 200, range(200))  # warm up
        before = controller.memory_info().rss
        assert view.map_async(pow, [2] * 10_000, range(10_000)).get(120)[-1] == 2**9999
        per_record = (controller.memory_info().rss - before) / 10_000
    assert per_record < 6_000, f"{per_record:.0f} bytes of controller memory per task record"
