"""Task records: bounded memory, purge, and SQLite persistence across a controller restart."""

from __future__ import annotations

import subprocess
import sys

import ipylb
import numpy as np
import pytest
import zmq
from ipylb import connection, wire
from ipylb.controller.records import RECORD_OVERHEAD, Function, Record, TaskDB, TaskStore

# A task function several records share (it is charged to none of them here).
FN = Function(b"fkey", [b"function pickle"], b"")


def finished(msg_id, size):
    rec = Record(msg_id, b"client", FN, [b"f" * size], b"mac")
    rec.result = (0, "ok", 1.0, 2.0, "", "", None)
    rec.result_bufs = [b"r"]
    return rec


def test_store_evicts_oldest_finished_records_beyond_its_budget():
    store = TaskStore(limit_bytes=2 * (1000 + RECORD_OVERHEAD) + 500)
    pending = Record("pending", b"c", FN, [b"x" * 5000], b"")
    store.add(pending)
    evicted = []
    for i in range(5):
        rec = finished(f"t{i}", 1000)
        store.add(rec)
        evicted += store.finished(rec)
    assert evicted == ["t0", "t1", "t2"]
    assert "pending" in store and "t4" in store and "t0" not in store


def test_store_purge_and_db_round_trip(tmp_path):
    db = TaskDB(tmp_path / "tasks.sqlite")
    store = TaskStore(limit_bytes=1, db=db)
    for i in range(3):
        rec = finished(f"t{i}", 10)
        store.add(rec)
        assert store.finished(rec) == []  # with a database nothing is forgotten
    again = TaskStore(db=TaskDB(tmp_path / "tasks.sqlite")).get("t0")
    assert again.result == (0, "ok", 1.0, 2.0, "", "", None) and again.bufs == [b"f" * 10]
    assert store.purge(["t1"]) == ["t1"] and "t1" not in store and "t2" in store
    assert sorted(store.purge(None)) == ["t0", "t2"] and "t2" not in store


def test_purge_results_forgets_finished_tasks(rc, view):
    ar = view.apply_async(lambda: 5)
    assert ar.get(30) == 5
    rc.purge_results([ar])
    with pytest.raises(KeyError, match="purged"):
        rc.get_result(ar.msg_ids[0])
    with pytest.raises(KeyError, match="purged"):
        rc.wait(ar.msg_ids, timeout=1)
    with view.temp_flags(after=ar):
        with pytest.raises(ipylb.error.InvalidDependency):
            view.apply_async(lambda: 1).get(30)


def test_purge_refuses_pending_tasks(rc, view):
    ar = view.apply_async(__import__("time").sleep, 0.5)
    with pytest.raises(ValueError, match="pending"):
        rc.purge_results([ar])
    ar.get(30)


def start_controller(path, db):
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipylb.controller", "--connection-file", str(path),
         "--engines", "1", "--db-file", str(db)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_results_survive_a_controller_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    path, db = connection.runtime_dir() / "ipylb-restart.json", tmp_path / "tasks.sqlite"
    proc = start_controller(path, db)
    try:
        rc = ipylb.Client(str(path))
        rc.wait_for_engines(1, 60)
        ar = rc.load_balanced_view().apply_async(lambda: "kept")
        assert ar.get(30) == "kept"
        # Big enough to travel through shared memory: the database keeps its bytes.
        big = np.arange(3 << 20, dtype="u1")
        ar_big = rc.load_balanced_view().apply_async(lambda x: x + 1, big)
        assert np.array_equal(ar_big.get(30), big + 1)
        # A signed request as an eavesdropper would record it in this run, never sent here.
        recorded = rc._signer.pack(wire.REQUEST, (10**6, "shutdown", None))
        recorded_from = rc._signer.sender
        rc.close()
    finally:
        proc.terminate()
        proc.wait(30)
    proc = start_controller(path, db)
    try:
        rc = ipylb.Client(str(path))
        assert rc.get_result(ar.msg_ids[0]).get(30) == "kept"
        assert rc.resubmit(ar.msg_ids).get(60) == ["kept"]
        assert np.array_equal(rc.get_result(ar_big.msg_ids[0]).get(30), big + 1)
        assert np.array_equal(rc.resubmit(ar_big.msg_ids).get(60)[0], big + 1)
        # Replayed into the next run (same key, kept for the records): refused.
        replay = zmq.Context.instance().socket(zmq.DEALER)
        replay.setsockopt(zmq.IDENTITY, recorded_from)
        replay.connect(connection.read(path)["client_url"])
        replay.send_multipart(recorded)
        replay.close(linger=1000)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1.5)  # a shutdown it obeyed would end it well within this
        assert rc.queue_status()["unassigned"] == 0
        rc.close()
    finally:
        proc.terminate()
        proc.wait(30)
