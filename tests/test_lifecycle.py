"""Starting and stopping private clusters: nothing is left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import ipylb
import pytest
from ipylb.error import ClientClosed
from procs import pid_alive, wait_gone


def test_shutdown_ends_every_process():
    rc = ipylb.Client(engines=2)
    assert rc.ids == [0, 1]
    pids = [m["pid"] for m in rc.engine_info().values()] + [rc._local.proc.pid]
    conn = rc._local.connection_file
    assert oct(conn.stat().st_mode & 0o777) == "0o600"
    rc.shutdown()
    assert wait_gone(pids, 10), [p for p in pids if pid_alive(p)]
    assert not conn.exists()


def test_context_manager_shuts_down():
    with ipylb.Client(engines=1) as rc:
        view = rc.load_balanced_view()
        assert view.apply_sync(pow, 2, 5) == 32
        pids = [m["pid"] for m in rc.engine_info().values()] + [rc._local.proc.pid]
        unfinished = view.apply_async(time.sleep, 30)
    assert wait_gone(pids, 10)
    with pytest.raises(ClientClosed, match="shut down"):  # at once: nothing will come
        unfinished.get(0)
    with pytest.raises(RuntimeError, match="closed"):
        view.apply_async(pow, 2, 2)


def test_sigkilled_client_leaves_no_orphans(tmp_path):
    script = textwrap.dedent(
        """
        import json, sys, time
        import ipylb
        rc = ipylb.Client(engines=2)
        pids = [m["pid"] for m in rc.engine_info().values()] + [rc._local.proc.pid]
        print(json.dumps(pids), flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = json.loads(proc.stdout.readline())
    assert all(pid_alive(p) for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_gone(pids, 10), [p for p in pids if pid_alive(p)]


def test_no_running_cluster_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ipylb.error.NoCluster, match="ipylb cluster start"):
        ipylb.Client()
    assert time.monotonic() - t0 < 5


def test_stale_connection_file_is_a_clear_error(tmp_path):
    path = tmp_path / "ipylb-stale.json"
    path.write_text(json.dumps({"key": "00", "controller_id": "controller-x", "client_url": "tcp://127.0.0.1:9", "engine_url": "tcp://127.0.0.1:9"}))
    t0 = time.monotonic()
    with pytest.raises(ipylb.error.NoCluster, match="not running"):
        ipylb.Client(str(path), timeout=2)
    assert time.monotonic() - t0 < 5


def test_missing_kernelspec_says_how_to_install(monkeypatch):
    from ipylb.client import local

    monkeypatch.setattr(local, "KERNEL_NAME", "ipylb-engine-missing")
    with pytest.raises(RuntimeError, match="pip install"):
        local.check_kernelspec()
