"""Engines are real Jupyter kernels: their standard channels work while they serve tasks,
and a kernel interrupt stops the running task."""

from __future__ import annotations

import time

import pytest
from ipylb.error import RemoteError
from jupyter_client import BlockingKernelClient


def sleeper(seconds):
    import time

    time.sleep(seconds)
    return "slept"


def test_engine_info_names_a_kernel_connection_file(rc):
    info = rc.engine_info()
    assert set(info) == set(rc.ids)
    for meta in info.values():
        assert meta["connection_file"].endswith(".json") and meta["pid"] > 0


def test_console_can_attach_while_tasks_run(rc, view):
    """What `jupyter console --existing FILE` does: execute a cell on the engine's shell channel."""
    amr = view.map_async(sleeper, [0.05] * 40)
    path = rc.engine_info()[0]["connection_file"]
    kc = BlockingKernelClient(connection_file=path)
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        reply = kc.execute_interactive("x = 6 * 7\nprint(x)", timeout=30)
        assert reply["content"]["status"] == "ok"
        assert kc.execute_interactive("ipylb_engine_id", timeout=30)["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
    assert amr.get(60) == ["slept"] * 40  # the engine kept serving
    # the console's namespace is the engine's user namespace
    assert view.apply_sync(lambda: 1) == 1


def marked_sleeper(marker_dir, seconds):
    import os
    import time
    import uuid

    open(os.path.join(marker_dir, uuid.uuid4().hex), "w").close()
    time.sleep(seconds)


def test_interrupt_stops_a_sleeping_task(rc, view, tmp_path):
    ars = [view.apply_async(marked_sleeper, str(tmp_path), 60) for _ in rc.ids]
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) < len(rc.ids):  # both tasks are inside time.sleep
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    assert sorted(rc.interrupt()) == rc.ids
    for ar in ars:
        with pytest.raises(RemoteError) as info:
            ar.get(20)
        assert info.value.ename == "KeyboardInterrupt"
    assert time.monotonic() - t0 < 10
    assert view.apply_sync(sleeper, 0) == "slept"  # engines serve on


def _has_debugger(rc, engine_id):
    """Whether the engine kernel's kernel_info_reply offers the Jupyter debugger (ipykernel 7
    lists it in ``supported_features``, 6 said ``debugger: true``), over its shell channel."""
    kc = BlockingKernelClient(connection_file=rc.engine_info()[engine_id]["connection_file"])
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kc.kernel_info()
        content = kc.get_shell_msg(timeout=60)["content"]
    finally:
        kc.stop_channels()
    return bool(content.get("debugger")) or "debugger" in content.get("supported_features", [])


def _import_debugpy():
    import debugpy

    return debugpy.__name__


def test_engine_kernels_boot_without_the_debugger_and_tasks_may_still_import_it(rc, view):
    # Making the kernel's debugger imports debugpy, ~0.09 s of an engine's boot CPU: engines
    # go without (issue 14 item 7); a task that imports debugpy gets it all the same.
    assert _has_debugger(rc, rc.ids[0]) is False
    assert view.apply_sync(_import_debugpy) == "debugpy"


def test_ipylb_engine_debugger_1_gives_engines_the_jupyter_debugger(monkeypatch):
    import ipylb

    monkeypatch.setenv("IPYLB_ENGINE_DEBUGGER", "1")  # engines inherit the client's environment
    with ipylb.Client(engines=1) as rc1:
        assert _has_debugger(rc1, rc1.ids[0]) is True


def _history_file():
    from IPython import get_ipython

    return str(get_ipython().history_manager.hist_file)  # the engine's shell


def test_engines_keep_ipython_history_in_memory_not_in_the_users_database(monkeypatch, tmp_path):
    # Every engine start added a session to ~/.ipython's history.sqlite (11,549 in one day of
    # this project's tests) and ran a history-saving thread; tasks never reach the history.
    import ipylb

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))  # engines inherit the client's environment
    with ipylb.Client(engines=1) as rc1:
        assert rc1.load_balanced_view().apply_sync(_history_file) == ":memory:"
    assert not list(tmp_path.rglob("history.sqlite"))
