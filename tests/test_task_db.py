"""The task database as ipyparallel's clients use it (issue 11 item 7): db_query with its
operators, hub_history, history, results, purge_local_results, purge_hub_results; on the
controller's records in memory and in SQLite (--db sqlite)."""

from __future__ import annotations

import pickle
import random
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta

import ipylb
import pytest
from ipylb import connection
from ipylb.controller.records import Function, Record, TaskDB, TaskStore, matches, parse_query, row


def inverse(x):
    return 1 / x


def nap(t):
    import time

    time.sleep(t)
    return t


for _f in (inverse, nap):  # pickled by value: engines of a cluster started here cannot import
    _f.__module__ = "__main__"  # this test module


# -- the query language, without a cluster ----------------------------------------------


@pytest.mark.parametrize("query,error,text", [
    ({"color": 1}, ValueError, "cannot query 'color'"),
    ({"engine_id": {"$regex": 1}}, ValueError, "unknown operator '\\$regex'"),
    ({"engine_id": "0"}, TypeError, "engine_id compares with int"),
    ({"completed": {"$gt": None}}, ValueError, "None compares with nothing"),
    ({"msg_id": {"$in": "abc"}}, TypeError, "takes a list"),
    ({"status": {}}, ValueError, "empty condition"),
    ([("engine_id", 0)], TypeError, "a query is a dict"),
])
def test_bad_queries_say_what_is_wrong(query, error, text):
    with pytest.raises(error, match=text):
        parse_query(query)


def record(i, engine_id, status, completed):
    rec = Record(f"t{i}", b"client-abc-r", Function(b"k", [b"f"], b""), [b"a"], b"m",
                 label=("fit", "plot", None)[i % 3])
    rec.submitted = 1000.0 + i
    if status != "pending":
        rec.result = (engine_id, status, completed - 0.5, completed, "out", "",
                      None if status == "ok" else ("ValueError", "bad", ""), rec.submitted)
    return rec


QUERIES = [
    {}, {"engine_id": 1}, {"engine_id": {"$ne": 1}}, {"status": "error"},
    {"completed": None}, {"completed": {"$ne": None}},
    {"completed": {"$gt": 1010.0}}, {"completed": {"$gte": 1005, "$lt": 1020}},
    {"submitted": {"$lte": 1003.0}}, {"engine_id": {"$in": [0, 2]}},
    {"engine_id": {"$nin": [0]}}, {"msg_id": {"$in": ["t1", "t7", "nope"]}},
    {"status": {"$nin": ["ok", "error"]}}, {"engine_id": 0, "status": "ok"},
    {"label": "fit"}, {"label": None}, {"label": {"$in": ["plot"]}, "status": "ok"},
]


def test_sqlite_answers_as_memory_does(tmp_path):
    """The same records and queries through both stores give the same rows."""
    rng = random.Random(11)
    recs = []
    for i in range(40):
        status = rng.choice(["ok", "ok", "error", "pending"])
        recs.append(record(i, rng.choice([0, 1, 2]), status, 1000.0 + i + rng.random() * 10))
    memory = TaskStore()
    sql = TaskStore(limit_bytes=1, db=TaskDB(tmp_path / "t.sqlite"))  # finished: on disk only
    for store in (memory, sql):
        for rec in recs:
            store.add(rec)
            if rec.result is not None:
                store.finished(rec)
    assert len(sql.records) < 20  # most answers must come from SQL
    for q in QUERIES:
        conds = parse_query(q)
        want = [r.msg_id for r in recs if matches(row(r), conds)]
        assert [r["msg_id"] for r in memory.query(conds)] == want, q
        assert [r["msg_id"] for r in sql.query(conds)] == want, q
        assert memory.query(conds, ["engine_id"]) == sql.query(conds, ["engine_id"]), q
        assert memory.query(conds, ["label"]) == sql.query(conds, ["label"]), q
    assert sql.query(parse_query({"msg_id": "t3"})) == memory.query(parse_query({"msg_id": "t3"}))


def test_sqlite_time_queries_use_an_index(tmp_path):
    db = TaskDB(tmp_path / "t.sqlite")
    for key in ("completed", "submitted"):
        plan = db.plan(parse_query({key: {"$gt": 5.0}, "engine_id": 1}))
        assert plan.startswith(f"SEARCH tasks USING INDEX tasks_{key} ({key}>?)"), plan
    assert "SEARCH" in db.plan(parse_query({"msg_id": {"$in": ["a", "b"]}}))
    assert db.plan([]).startswith("SCAN")  # (a full listing has nothing to search)


def test_an_older_database_gets_its_query_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE tasks (msg_id TEXT PRIMARY KEY, client BLOB, flags BLOB,"
                " bufs BLOB, bufs_mac BLOB, result BLOB, result_bufs BLOB, result_mac BLOB)")
    result = (1, "ok", 5.0, 6.0, "", "", None, 4.0)
    old.execute("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                ("old1", b"client-x-r", pickle.dumps(None), pickle.dumps([b"f"]), b"m",
                 pickle.dumps(result), pickle.dumps([]), b""))
    old.commit()
    old.close()
    rows = TaskStore(db=TaskDB(path)).query(parse_query({"engine_id": 1, "completed": {"$gt": 5}}))
    assert [(r["msg_id"], r["submitted"], r["client"]) for r in rows] == [("old1", 4.0, "x")]


# -- against real engines, on both stores ----------------------------------------------


def start_controller(path, db):
    args = [sys.executable, "-m", "ipylb.controller", "--connection-file", str(path),
            "--engines", "2"]
    proc = subprocess.Popen([*args, "--db-file", str(db)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture(params=["memory", "sqlite"])
def store_client(request, tmp_path, monkeypatch):
    """A client of the session's in-memory cluster, or of a cluster with --db sqlite."""
    if request.param == "memory":
        yield request.getfixturevalue("rc")
        return
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    path = connection.runtime_dir() / "ipylb-db.json"
    proc = start_controller(path, tmp_path / "tasks.sqlite")
    try:
        client = ipylb.Client(str(path))
        client.test_file = path  # (for a second client)
        client.wait_for_engines(2, 60)
        yield client
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_db_query_on_real_tasks(store_client):
    rc = store_client
    t0 = datetime.now() - timedelta(seconds=1)  # (a clock tick of slack)
    v0 = rc.load_balanced_view(targets=0)
    v1 = rc.load_balanced_view(targets=1)
    ok0 = v0.map_async(nap, [0, 0])
    bad1 = v1.apply_async(inverse, 0)
    slow = v1.apply_async(nap, 1.0)
    ok0.wait(30)
    bad1.wait(30)
    mine = {"msg_id": {"$in": [*ok0.msg_ids, *bad1.msg_ids, *slow.msg_ids]}}
    rows = rc.db_query(mine)
    assert [r["msg_id"] for r in rows] == [*ok0.msg_ids, *bad1.msg_ids, *slow.msg_ids]
    assert rows[-1]["status"] == "pending" and rows[-1]["completed"] is None
    assert {r["status"] for r in rows[:2]} == {"ok"} and rows[2]["status"] == "error"
    assert rows[2]["error"].ename == "ZeroDivisionError" and rows[2]["engine_id"] == 1
    assert rows[0]["client"] == rc.session and isinstance(rows[0]["submitted"], datetime)
    on0 = rc.db_query({**mine, "engine_id": 0}, keys=["engine_id", "completed"])
    assert [set(r) for r in on0] == [{"msg_id", "engine_id", "completed"}] * 2
    assert [r["msg_id"] for r in on0] == ok0.msg_ids
    done = rc.db_query({**mine, "completed": {"$gte": t0}}, keys=["status"])
    assert [r["msg_id"] for r in done] == [*ok0.msg_ids, *bad1.msg_ids]
    assert rc.db_query({**mine, "status": {"$ne": "ok"}, "engine_id": {"$nin": [0]}},
                       keys=[]) == [{"msg_id": m} for m in [*bad1.msg_ids, *slow.msg_ids]]
    assert rc.db_query({**mine, "completed": {"$lt": t0}}) == []
    history = rc.hub_history()
    assert history.index(ok0.msg_ids[0]) < history.index(bad1.msg_ids[0]) < history.index(
        slow.msg_ids[0])
    with pytest.raises(ValueError, match="cannot query 'color'"):
        rc.db_query({"color": "red"})
    slow.wait(30)


def test_label_flag_in_records_metadata_and_db_query(store_client):
    """label (API.md, ipyparallel 9.1): a view flag, temp_flags too, kept in the task
    record; db_query and get_result metadata show it, also for another client."""
    rc = store_client
    view = rc.load_balanced_view()
    with view.temp_flags(label="warm-up"):
        ar = view.map_async(nap, [0, 0])
    assert view.label is None  # restored
    view.label = "lone"
    one = view.apply_async(nap, 0)
    view.label = None
    plain = view.apply_async(nap, 0)
    for r in (ar, one, plain):
        r.wait(30)
    assert ar.metadata[0]["label"] == "warm-up" and one.metadata.label == "lone"
    assert plain.metadata.label is None
    rows = rc.db_query({"label": "warm-up"}, keys=["label", "status"])
    assert [(r["msg_id"], r["label"], r["status"]) for r in rows] == [
        (m, "warm-up", "ok") for m in ar.msg_ids]
    assert [r["msg_id"] for r in rc.db_query({"label": {"$in": ["lone"]}}, keys=[])] == \
        one.msg_ids
    path = rc._local.connection_file if rc._local else rc.test_file
    with ipylb.Client(str(path)) as other:  # metadata from the controller's record
        assert other.get_result(one.msg_ids[0]).wait(30)
        assert other.get_result(one.msg_ids[0]).metadata.label == "lone"
    with pytest.raises(TypeError, match="label must be a str"):
        view.label = 3


def test_history_results_and_purges(rc, view):
    start = len(rc.history)
    ar = view.map_async(inverse, [1, 0])
    ar.wait(30)
    assert rc.history[start:] == ar.msg_ids
    assert sum(1 for _ in view.imap(inverse, [1, 2])) == 2
    assert rc.history[start:] == ar.msg_ids  # imap's tasks are not recorded per item
    ok, bad = ar.msg_ids
    assert rc.results[ok] == 1.0 and rc.results[bad].ename == "ZeroDivisionError"
    assert ok in set(rc.results) and len(rc.results) >= 2
    rc.wait(start, timeout=10)  # an int job is an index into rc.history
    rc.purge_local_results([start])
    assert ok not in rc.results and bad in rc.results
    assert rc.get_result(ok).get(10) == 1.0  # the controller still has it
    rc.purge_hub_results(ar)
    assert rc.db_query({"msg_id": {"$in": ar.msg_ids}}) == []
    assert bad in rc.results and ok in rc.results  # this client's cache is left alone
    rc.purge_local_results(ok)
    with pytest.raises(KeyError, match="purged"):
        rc.get_result(ok)  # gone from both
    slow = view.apply_async(nap, 0.5)
    with pytest.raises(RuntimeError, match="still pending"):
        rc.purge_local_results(slow)
    slow.wait(10)
    rc.purge_local_results("all")
    assert len(rc.results) == 0
    with pytest.raises(IndexError, match="rc.history"):
        rc.abort(10**9)
