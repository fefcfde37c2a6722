"""walltime on real engine kernels: interrupted the Jupyter way, or the engine restarted.

The issue's inputs: ``time.sleep``, a pure-Python busy loop, a task that ignores SIGINT;
with and without retries; in a map; and an interrupt that arrives for a task that has
ended must not stop the next one.
"""

from __future__ import annotations

import os
import time

import ipylb
import pytest
from ipylb.error import CompositeError, WalltimeExceeded
from jupyter_client import BlockingKernelClient


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def chatty_nap(seconds):
    import time

    print("working")
    time.sleep(seconds)


def spin(seconds):
    import time

    end = time.time() + seconds
    n = 0
    while time.time() < end:  # pure Python: the interrupt lands between bytecodes
        n += 1
    return seconds


def deaf(seconds):
    """Ignores SIGINT, as some C code does: only a restart stops it."""
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end = time.time() + seconds
    while time.time() < end:
        time.sleep(0.05)
    return seconds


def slow_the_first_time(marker):
    """Overruns on the first attempt only (a retry finds the marker)."""
    import os
    import time

    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(60)
    return os.getpid()


def pid():
    import os

    return os.getpid()


def nap_marked(marker, seconds):
    """Sleep, after leaving a file that says the task has really started."""
    import time

    open(marker, "w").close()
    time.sleep(seconds)
    return seconds


def wait_for_file(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):  # a file the remote task writes: nothing to wait on
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def rc2():
    rc = ipylb.Client(engines=2)
    yield rc
    rc.shutdown()


@pytest.mark.parametrize("f", [nap, spin])
def test_overrunning_task_is_interrupted_and_its_engine_serves_on(rc2, f):
    view = rc2.load_balanced_view()
    ids = rc2.ids
    t0 = time.monotonic()
    with view.temp_flags(walltime=1):
        ar = view.apply_async(f, 60)
    with pytest.raises(WalltimeExceeded) as info:
        ar.get(30)
    took = time.monotonic() - t0
    message = str(info.value)
    assert "walltime of 1s" in message and "interrupted (KeyboardInterrupt)" in message
    assert "restarted" not in message
    assert 1.0 <= took < 4.0, took  # a KeyboardInterrupt, not the grace period's restart
    assert rc2.ids == ids  # no engine was restarted
    assert view.apply_async(f, 0.01).get(30) == 0.01  # and the engine serves on


def test_walltime_as_a_view_attribute_is_checked_when_set_and_applies(rc2):
    """`view.walltime = S` (the flag set directly, not through temp_flags): checked when
    set, applied to what the view submits after, 0/None: no limit."""
    view = rc2.load_balanced_view()
    for bad, error in ((-1, ValueError), (float("nan"), ValueError), ("1", TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match="walltime must be"):
            view.walltime = bad
    assert view.walltime == 0
    view.walltime = 0.5
    ar = view.apply_async(nap, 60)
    view.walltime = None
    assert view.apply_async(nap, 1.0).get(30) == 1.0  # past 0.5 s, but no limit now
    with pytest.raises(WalltimeExceeded, match="walltime of 0.5s"):
        ar.get(30)


def test_an_interrupted_task_keeps_its_output_and_where_it_stopped(rc2):
    view = rc2.load_balanced_view()
    with view.temp_flags(walltime=1):
        ar = view.apply_async(chatty_nap, 60)
    with pytest.raises(WalltimeExceeded) as info:
        ar.get(30)
    assert ar.stdout == "working\n"
    assert "KeyboardInterrupt" in info.value.traceback and "chatty_nap" in info.value.traceback
    assert ar.metadata.started is not None and ar.metadata.completed is not None


def test_tasks_within_their_walltime_are_untouched(rc2):
    view = rc2.load_balanced_view()
    with view.temp_flags(walltime=5):
        assert view.map_sync(nap, [0.05] * 6) == [0.05] * 6


def test_walltime_in_a_map_applies_to_each_chunk(rc2):
    view = rc2.load_balanced_view()
    with view.temp_flags(walltime=1):
        amr = view.map_async(nap, [0.01, 60, 0.02, 60])
    got = amr.get(30, return_exceptions=True)
    assert got[0] == 0.01 and got[2] == 0.02
    assert all(isinstance(e, WalltimeExceeded) for e in (got[1], got[3])), got
    with view.temp_flags(walltime=1):
        amr = view.map_async(nap, [0.01, 0.02, 60, 0.01], chunksize=2)
    with pytest.raises(CompositeError, match="WalltimeExceeded"):
        amr.get(30)
    assert amr.get(30, return_exceptions=True)[:2] == [0.01, 0.02]


def test_walltime_failure_is_retried_on_another_engine(rc2, tmp_path):
    view = rc2.load_balanced_view()
    marker = str(tmp_path / "tried")
    with view.temp_flags(walltime=1, retries=1):
        ar = view.apply_async(slow_the_first_time, marker)
    second = ar.get(30)
    assert os.path.exists(marker)
    story = [entry[3] for entry in rc2.story(ar.msg_ids[0])]
    assert any("exceeded its walltime of 1s" in str(s) and "retrying (0 left)" in str(s)
               for s in story), story
    first_engine = next(s for s in story if isinstance(s, int))
    assert ar.metadata.engine_id != first_engine  # the retry ran elsewhere
    assert second == rc2.engine_info()[ar.metadata.engine_id]["pid"]


def test_walltime_without_retries_left_fails_with_the_last_attempt(rc2):
    view = rc2.load_balanced_view()
    with view.temp_flags(walltime=0.5, retries=1):
        ar = view.apply_async(spin, 60)
    with pytest.raises(WalltimeExceeded, match="walltime of 0.5s"):
        ar.get(30)
    engines = [s[3] for s in rc2.story(ar.msg_ids[0]) if isinstance(s[3], int)]
    assert len(engines) == 2 and engines[0] != engines[1]  # two attempts, two engines


def test_interrupt_for_a_task_that_ended_does_not_stop_the_next_one(rc2, tmp_path):
    """The race the engine guards against: an interrupt naming a task that is no longer
    running (it ended just before) reaches the engine while another task runs."""
    view = rc2.load_balanced_view()
    with view.temp_flags(walltime=30):
        ended = view.apply_async(pid)
        engine_pid = ended.get(30)
        eid = ended.metadata.engine_id
        with view.temp_flags(follow=ended):
            current = view.apply_async(nap_marked, str(tmp_path / "started"), 1.0)  # same engine
    kc = BlockingKernelClient()
    kc.load_connection_file(rc2.engine_info()[eid]["connection_file"])
    try:
        wait_for_file(tmp_path / "started")  # then name the task that has ended
        kc.control_channel.send(kc.session.msg("ipylb_interrupt_request",
                                               {"msg_id": ended.msg_ids[0]}))
        assert current.get(30) == 1.0
    finally:
        kc.stop_channels()
    assert rc2.engine_info()[eid]["pid"] == engine_pid


def test_task_ignoring_sigint_costs_its_engine_and_tasks_behind_it_survive():
    """walltime + grace (5 s, API.md's default): the kernel is restarted through
    jupyter_client; the task queued behind it on that engine (hwm=2) is not lost."""
    with ipylb.Client(engines=1, hwm=2) as rc:
        view = rc.load_balanced_view()
        old = rc.ids
        t0 = time.monotonic()
        with view.temp_flags(walltime=1):
            ar = view.apply_async(deaf, 120)
        behind = view.apply_async(pid)  # queued on the same engine, behind it
        with pytest.raises(WalltimeExceeded) as info:
            ar.get(60)
        took = time.monotonic() - t0
        message = str(info.value)
        assert "walltime of 1s" in message and "did not stop within 5s" in message
        assert f"engine {old[0]} was restarted" in message
        assert 6.0 <= took < 15.0, took
        new_pid = behind.get(60)  # it ran on the restarted kernel
        assert behind.metadata.engine_id not in old
        assert rc.ids == [behind.metadata.engine_id]
        assert rc.queue_status()[rc.ids[0]]["restarts"] == 1
        assert rc.engine_info()[rc.ids[0]]["pid"] == new_pid


def test_interrupts_racing_the_end_of_their_task_never_hit_the_next_task():
    """Tasks that end right at their walltime, each followed at once on the same engine
    (hwm=2: it is already there) by a task without a walltime: the interrupts that arrive
    just too late are ignored, so every follower succeeds."""
    with ipylb.Client(engines=1, hwm=2) as rc:
        view = rc.load_balanced_view()
        racers, followers = [], []
        for i in range(30):
            with view.temp_flags(walltime=0.3):
                racers.append(view.apply_async(nap, 0.2 + 0.01 * i))  # 0.2 .. 0.49 s
            followers.append(view.apply_async(nap, 0.1))
        assert [ar.get(60) for ar in followers] == [0.1] * 30
        outcomes = [ar.get(60, return_exceptions=True) for ar in racers]
        interrupted = sum(isinstance(o, WalltimeExceeded) for o in outcomes)
        assert 0 < interrupted < 30, outcomes  # both sides of the deadline were exercised
        assert all(isinstance(o, WalltimeExceeded) or o == 0.2 + 0.01 * i
                   for i, o in enumerate(outcomes))
        assert rc.queue_status()[rc.ids[0]]["restarts"] == 0
