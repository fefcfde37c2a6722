"""Engines come back: a kernel that dies is restarted through jupyter_client's
KernelRestarter, as a new engine id; off with restart=False / --no-restart; a slot that
keeps dying stays down and clients are told."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import ipylb
import pytest
from ipylb import connection
from ipylb.dashboard import Dashboard
from ipylb.error import EngineError


def pid():
    import os

    return os.getpid()


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def nap_pid(seconds):
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


def wait_until(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)  # remote state, polled: there is no event to wait on


def test_killed_engine_comes_back_as_a_new_engine_and_tasks_keep_working():
    with ipylb.Client(engines=2) as rc:
        view = rc.load_balanced_view()
        assert [rc.queue_status()[e]["restarts"] for e in rc.ids] == [0, 0]
        victim = rc.engine_info()[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: 2 in rc.ids, 60, "engine 0's slot back as engine 2")
        assert rc.ids == [1, 2]  # a new engine id; the dead one is gone
        assert [rc.queue_status()[e]["restarts"] for e in rc.ids] == [0, 1]
        info = rc.engine_info()[2]
        assert info["restarts"] == 1 and info["pid"] != victim
        assert rc.engine_info()[1]["restarts"] == 0
        # The dashboard (it reads the client's public API) shows the restart.
        dash = Dashboard(rc)
        try:
            wait_until(lambda: '<span class="ipylb-restarts">1</span>' in dash.summary.value, 15,
                       "the dashboard showing 1 restart")
        finally:
            dash.close()
        # Tasks keep working, on both engines, the new one included.
        pids = {view.apply_async(nap_pid, 0.3) for _ in range(4)}
        assert {ar.get(30) for ar in pids} == {info["pid"], rc.engine_info()[1]["pid"]}


def test_running_task_on_a_killed_engine_follows_the_death_rules():
    with ipylb.Client(engines=1) as rc:
        view = rc.load_balanced_view()
        engine_pid = view.apply_sync(pid)
        doomed = view.apply_async(nap, 60)
        wait_until(lambda: rc.queue_status()[rc.ids[0]]["tasks"] == 1, what="the task running")
        os.kill(engine_pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="SIGKILL.*restarting it"):
            doomed.get(30)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "the cluster has no engines": one is coming back
            assert view.apply_async(pid).get(60) != engine_pid  # the restarted kernel serves


def segfault():
    import ctypes

    ctypes.string_at(0)  # reads address 0: SIGSEGV in C code, as a crashing extension would


def test_a_task_that_segfaults_its_engine_fails_saying_so_and_the_engine_comes_back():
    """The issue's third way to die (after a kill and out of memory, which is a SIGKILL):
    a segfault.  The task fails with EngineError naming the signal; the slot is restarted."""
    with ipylb.Client(engines=1) as rc:
        view = rc.load_balanced_view()
        old_pid = view.apply_sync(pid)
        with pytest.raises(EngineError, match="SIGSEGV.*restarting it"):
            view.apply_async(segfault).get(60)
        assert view.apply_async(pid).get(60) != old_pid  # the restarted kernel serves
        assert [rc.queue_status()[e]["restarts"] for e in rc.ids] == [1]


def test_a_hung_engine_found_by_its_heartbeat_is_restarted():
    with ipylb.Client(engines=2, heartbeat_timeout=2.0) as rc:
        hung = rc.engine_info()[1]["pid"]
        os.kill(hung, signal.SIGSTOP)
        try:
            wait_until(lambda: 2 in rc.ids, 60, "engine 1's slot back as engine 2")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert rc.ids == [0, 2] and rc.engine_info()[2]["pid"] != hung
        assert rc.queue_status()[2]["restarts"] == 1
        assert rc.load_balanced_view().map_sync(nap, [0.01] * 4) == [0.01] * 4


def test_restart_false_leaves_a_dead_engine_down():
    with ipylb.Client(engines=2, restart=False) as rc:
        victim_id = rc.ids[0]
        os.kill(rc.engine_info()[victim_id]["pid"], signal.SIGKILL)
        wait_until(lambda: rc.ids == [1], 15, "the dead engine dropped")
        with pytest.raises(TimeoutError):  # a restart would register within a second or two
            rc.wait_for_engines(2, timeout=4)
        assert rc.ids == [1] and rc.queue_status()[1]["restarts"] == 0


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    """A private Jupyter runtime directory for this test and the clusters it starts (their
    logs and connection files go there); a cluster a failed test left running is stopped."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    yield tmp_path
    for path in tmp_path.glob("ipylb-*.json"):
        _ipylb("cluster", "stop", "--profile", path.stem.removeprefix("ipylb-"), env=os.environ)


def _ipylb(*args, env):
    ipylb_cmd = str(Path(sys.executable).with_name("ipylb"))
    return subprocess.run([ipylb_cmd, *args], env=env, capture_output=True, text=True, timeout=120)


def test_cluster_restart_limit_reached_stays_down_and_clients_are_warned(runtime):
    """`ipylb cluster start --restart-limit 1 --restart-stable 60`: the second death in a
    row of one slot is past jupyter_client's limit: the slot stays down, the controller
    logs it, clients get a RuntimeWarning, and `ipylb cluster status` counts the restart."""
    profile = "h12a"
    env = dict(os.environ)
    started = _ipylb("cluster", "start", "-n", "2", "--daemon", "--profile", profile,
                     "--restart-limit", "1", "--restart-stable", "60", env=env)
    assert started.returncode == 0, started.stderr
    try:
        with ipylb.Client(profile=profile) as rc:
            first = rc.engine_info()[0]["pid"]
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: 2 in rc.ids, 60, "engine 0 restarted as engine 2")
            assert rc.queue_status()[2]["restarts"] == 1
            with pytest.warns(RuntimeWarning, match="stays down.*not restarted again") as seen:
                os.kill(rc.engine_info()[2]["pid"], signal.SIGKILL)
                wait_until(lambda: len(seen) > 0, 30, "the warning")
            assert rc.ids == [1]
            assert rc.load_balanced_view().apply_sync(os.getpid) == rc.engine_info()[1]["pid"]
        status = _ipylb("cluster", "status", "--profile", profile, env=env)
        assert "engines: 1" in status.stdout
        assert re.search(r"engine 1 on \S+: queue 0, tasks 0, completed 1, restarts 0", status.stdout)
        log = connection.log_file(profile).read_text()
        assert "an engine stays down" in log and "killed by SIGKILL" in log
        (gone,) = [line for line in log.splitlines() if "engine 2 is gone" in line]
        assert "not restarted again" in gone and "restarting it" not in gone
    finally:
        _ipylb("cluster", "stop", "--profile", profile, env=env)


def test_no_restart_flag_of_cluster_start(runtime):
    profile = "h12a"
    env = dict(os.environ)
    started = _ipylb("cluster", "start", "-n", "1", "--daemon", "--profile", profile,
                     "--no-restart", env=env)
    assert started.returncode == 0, started.stderr
    try:
        with ipylb.Client(profile=profile) as rc:
            os.kill(rc.engine_info()[0]["pid"], signal.SIGKILL)
            wait_until(lambda: rc.ids == [], 15, "the dead engine dropped")
            with pytest.raises(TimeoutError):  # a restart would register within a second or two
                rc.wait_for_engines(1, timeout=4)
    finally:
        _ipylb("cluster", "stop", "--profile", profile, env=env)


@pytest.mark.parametrize("bad", ["yes", 1, (5,), (-1, 10.0), (5, -1), (5.0, 10), (True, 1)])
def test_restart_policy_is_checked_before_anything_starts(bad):
    with pytest.raises(ValueError, match=r"restart must be True, False or \(limit, seconds\)"):
        ipylb.Client(engines=1, restart=bad)


def test_restart_policy_of_a_private_cluster():
    """Client(engines=N, restart=(limit, seconds)): KernelRestarter's two numbers; with limit 0
    the first death of a slot is already past it."""
    with ipylb.Client(engines=2, restart=(0, 60.0)) as rc:
        with pytest.warns(RuntimeWarning, match="died 1 time in a row") as seen:
            os.kill(rc.engine_info()[0]["pid"], signal.SIGKILL)
            wait_until(lambda: len(seen) > 0, 30, "the warning")
        assert rc.ids == [1]


def test_a_restart_that_cannot_start_the_kernel_leaves_the_slot_down(runtime):
    """jupyter_client's restart_kernel raising (here: the kernelspec's program is gone) does
    not take the controller down: the slot stays down and clients are told."""
    launcher = runtime / "engine"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} -m ipylb.engine \"$@\"\n")
    launcher.chmod(0o700)
    spec = runtime / "jupyter-path" / "kernels" / "h12a-doomed"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps(
        {"argv": [str(launcher), "-f", "{connection_file}"], "display_name": "doomed",
         "language": "python"}))
    env = {**os.environ, "JUPYTER_PATH": str(runtime / "jupyter-path")}
    profile = "h12a"
    started = _ipylb("cluster", "start", "-n", "2", "--daemon", "--profile", profile,
                     "--kernel", "h12a-doomed", env=env)
    assert started.returncode == 0, started.stderr
    try:
        with ipylb.Client(profile=profile) as rc:
            launcher.unlink()  # a restart now fails to spawn the kernel
            with pytest.warns(RuntimeWarning, match="stays down.*restarting .*failed") as seen:
                os.kill(rc.engine_info()[0]["pid"], signal.SIGKILL)
                wait_until(lambda: len(seen) > 0, 30, "the warning")
            assert rc.ids == [1]
            assert rc.load_balanced_view().apply_sync(os.getpid) == rc.engine_info()[1]["pid"]
    finally:
        _ipylb("cluster", "stop", "--profile", profile, env=env)
