"""Retries, engine death, abort, resubmit and get_result on real engines.

Killing engines spoils a cluster, so each test that does starts its own, with restarts
off (restarts: tests/test_restarts.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import ipylb
import numpy as np
import pytest
from ipylb.error import EngineError, RemoteError, TaskAborted


def engine_id():
    from IPython import get_ipython

    return get_ipython().user_ns["ipylb_engine_id"]


def engine_pid():
    import os

    return os.getpid()


def sleep_then(x, delay):
    import time

    time.sleep(delay)
    return x


def sleep_marked(marker_dir, seconds):
    """Sleep, after leaving a file that says the task has really started."""
    import os
    import time
    import uuid

    open(os.path.join(marker_dir, uuid.uuid4().hex), "w").close()
    time.sleep(seconds)


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)  # polling remote state: there is no event to wait on


@pytest.fixture
def rc3():
    rc = ipylb.Client(engines=3, heartbeat_timeout=2.0, restart=False)
    yield rc
    rc.shutdown()


# -- retries --------------------------------------------------------------------------


def flaky_on_first_engine(marker_dir):
    """Fails on whichever engine runs it first; succeeds elsewhere."""
    import os

    path = os.path.join(marker_dir, "first")
    me = str(os.getpid())
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, me.encode())
        os.close(fd)
    except FileExistsError:
        pass
    if open(path).read() == me:
        raise RuntimeError(f"failing on {me}")
    return me


def test_retry_goes_to_another_engine(view, tmp_path):
    with view.temp_flags(retries=1):
        ar = view.apply_async(flaky_on_first_engine, str(tmp_path))
    pid = ar.get(30)
    assert pid != (tmp_path / "first").read_text()


def test_no_retries_means_the_error_is_final(view, tmp_path):
    with pytest.raises(RemoteError, match="failing on"):
        view.apply_async(flaky_on_first_engine, str(tmp_path)).get(30)


def always_fails(counter_dir):
    import os
    import uuid

    open(os.path.join(counter_dir, uuid.uuid4().hex), "w").close()
    raise ValueError(f"attempt {len(os.listdir(counter_dir))}")


def test_more_retries_than_engines_are_all_used(view, tmp_path):
    with view.temp_flags(retries=4):
        ar = view.apply_async(always_fails, str(tmp_path))
    with pytest.raises(RemoteError, match="attempt 5"):  # the last attempt's error
        ar.get(30)
    assert len(list(tmp_path.iterdir())) == 5


# -- engine death ---------------------------------------------------------------------


def test_engine_death_fails_its_running_task_and_keeps_the_rest(rc3, tmp_path):
    view = rc3.load_balanced_view()
    victim = view.apply_async(engine_pid).get(30)
    victim_engine = [e for e, m in rc3.engine_info().items() if m["pid"] == victim][0]
    # one long task per engine, then a queue of short ones waiting in the controller
    longs = [view.apply_async(sleep_marked, str(tmp_path), 30) for i in range(3)]
    wait_until(lambda: len(list(tmp_path.iterdir())) == 3)  # all three are inside time.sleep
    queued = view.map_async(sleep_then, range(6), [0.01] * 6)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim_engine not in rc3.ids, 10)
    doomed = [ar for ar in longs if ar.ready()]
    assert len(doomed) == 1
    with pytest.raises(EngineError) as info:
        doomed[0].get(0)
    assert "SIGKILL" in str(info.value) and str(victim_engine) in str(info.value)
    rc3.interrupt()  # stop the other long tasks
    assert queued.get(30) == list(range(6))  # nothing queued was lost


def pid_and_sum_after(x, delay):
    import os
    import time

    time.sleep(delay)
    return os.getpid(), int(x.sum())


def test_engine_death_with_retries_reruns_elsewhere(rc3):
    view = rc3.load_balanced_view()
    arr = np.ones(3 << 20, "u1")  # big: the rerun maps the argument's shared-memory segment again
    with view.temp_flags(retries=1):
        ar = view.apply_async(pid_and_sum_after, arr, 1.0)
    wait_until(lambda: any(qs["tasks"] for k, qs in rc3.queue_status().items() if k != "unassigned"))
    busy = [e for e, qs in rc3.queue_status().items() if e != "unassigned" and qs["tasks"]][0]
    pid = rc3.engine_info()[busy]["pid"]
    os.kill(pid, signal.SIGKILL)
    new_pid, total = ar.get(30)
    assert new_pid != pid and total == arr.size
    assert ar.metadata.engine_id != busy
    assert len(rc3.ids) == 2


def test_follow_on_a_dead_engine_becomes_impossible(rc3):
    view = rc3.load_balanced_view()
    first = view.apply_async(engine_pid)
    pid = first.get(30)
    blocker = view.apply_async(sleep_then, 0, 0.5)
    with view.temp_flags(follow=first, after=blocker):
        ar = view.apply_async(lambda: 1)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ipylb.error.ImpossibleDependency, match="engine"):
        ar.get(30)


def test_a_frozen_engine_is_found_by_its_heartbeat(rc3):
    view = rc3.load_balanced_view()
    pid = rc3.engine_info()[rc3.ids[-1]]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: len(rc3.ids) == 2, 15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert view.map_sync(lambda x: x, range(4)) == [0, 1, 2, 3]
    wait_until(lambda: not _alive(pid), 10)  # the controller put the hung kernel down


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


# -- abort ----------------------------------------------------------------------------


def test_abort_queued_tasks_only(rc, view, tmp_path):
    blockers = [view.apply_async(sleep_then, i, 0.5) for i in rc.ids]
    marker = tmp_path / "ran"
    victims = [view.apply_async(lambda p=str(marker): open(p, "w").close()) for _ in range(3)]
    neighbour = view.apply_async(lambda: "neighbour")
    rc.abort(victims)
    for ar in victims:
        with pytest.raises(TaskAborted, match="abort"):
            ar.get(30)
    assert neighbour.get(30) == "neighbour"
    assert [b.get(30) for b in blockers] == rc.ids
    assert not marker.exists()


def test_abort_queued_on_an_engine_with_hwm():
    with ipylb.Client(engines=1, hwm=2) as rc:
        view = rc.load_balanced_view()
        first = view.apply_async(sleep_then, "first", 0.5)
        second = view.apply_async(sleep_then, "second", 0)
        wait_until(lambda: rc.queue_status()[0]["queue"] == 1)
        rc.abort(second)
        with pytest.raises(RemoteError, match="abort"):
            second.get(30)
        assert first.get(30) == "first"


def test_abort_unknown_id_is_a_clear_error(rc):
    with pytest.raises(KeyError, match="no such task"):
        rc.abort("not-a-task")


# -- get_result and resubmit -------------------------------------------------------------


def test_get_result_by_msg_id_pending_and_done(rc, view):
    ar = view.apply_async(sleep_then, "late", 0.3)
    hub = rc.get_result(ar.msg_ids[0])
    assert hub.get(30) == "late"
    assert rc.get_result(ar.msg_ids).get(30) == ["late"]


def test_get_result_from_another_client(rc, view):
    ar = view.apply_async(sleep_then, "shared", 0.3)
    other = ipylb.Client(rc._local.connection_file)
    try:
        hub = other.get_result(ar.msg_ids[0])
        assert hub.get(30) == "shared"
        assert hub.metadata.engine_id in rc.ids
    finally:
        other.close()


def test_get_result_unknown_raises(rc):
    with pytest.raises(KeyError, match="no such task"):
        rc.get_result("never-submitted")


def test_resubmit_runs_finished_tasks_again(rc, view):
    ok = view.apply_async(lambda: __import__("os").getpid())
    bad = view.apply_async(lambda: 1 / 0)
    ok.wait(30), bad.wait(30)
    again = rc.resubmit([ok.msg_ids[0], bad.msg_ids[0]])
    assert set(again.msg_ids).isdisjoint(ok.msg_ids + bad.msg_ids)
    with pytest.raises(ipylb.error.CompositeError):
        again.get(30)
    assert again.metadata[0]["status"] == "ok"
    assert rc.resubmit(ok.msg_ids).get(30)[0] in [m["pid"] for m in rc.engine_info().values()]


def test_resubmit_pending_or_unknown_raises(rc, view):
    ar = view.apply_async(sleep_then, 0, 0.5)
    with pytest.raises(ValueError, match="pending"):
        rc.resubmit(ar.msg_ids)
    with pytest.raises(KeyError):
        rc.resubmit(["never-submitted"])
    ar.get(30)


def test_losing_every_engine_warns_about_the_waiting_tasks():
    with ipylb.Client(engines=1, restart=False) as rc:
        view = rc.load_balanced_view()
        pid = view.apply_sync(engine_pid)
        running = view.apply_async(sleep_then, 1, 30)
        waiting = view.apply_async(sleep_then, 2, 0)  # queued behind it (hwm=1)
        wait_until(lambda: rc.queue_status()["unassigned"] == 1)
        with pytest.warns(RuntimeWarning, match="every engine of the cluster is gone: 1 task") as seen:
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(EngineError):
                running.get(10)
            wait_until(lambda: len(seen) > 0, 10)  # it comes on the client's receiving thread
        assert not waiting.ready()
