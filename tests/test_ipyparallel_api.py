"""The rest of ipyparallel 9's task interface (issue 11), against real engines: names,
return_exceptions, metadata attributes, get_dict, split, waiting and sizes."""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import threading
from datetime import datetime

import ipylb
import pytest
from ipylb import error
from ipylb.error import SerializationError
from test_pending import Gate, wait_at_gate


def inverse(x):
    return 1 / x


def nap(t):
    import time

    time.sleep(t)
    return t


def test_task_timeout_is_dependency_timeout(view):
    assert error.TaskTimeout is error.DependencyTimeout
    slow = view.apply_async(nap, 1.0)
    with view.temp_flags(after=[slow], timeout=0.1):
        late = view.apply_async(nap, 0)
    with pytest.raises(error.TaskTimeout, match="timed out"):
        late.get(10)
    slow.get(10)


def test_return_exceptions_on_map(view):
    out = view.map_sync(inverse, [1, 0, 4], return_exceptions=True)
    assert out[0] == 1.0 and out[2] == 0.25
    assert isinstance(out[1], error.RemoteError) and out[1].ename == "ZeroDivisionError"
    amr = view.map_async(inverse, [0, 2], return_exceptions=True)
    assert [type(x) for x in amr] == [error.RemoteError, float]  # iteration does not raise
    got = amr.get()
    assert got[1] == 0.5 and got[0].ename == "ZeroDivisionError"
    assert view.map(inverse, [2, 0], block=True, return_exceptions=True)[0] == 0.5


def test_return_exceptions_on_get_and_chunks(view):
    amr = view.map_async(inverse, [1, 0, 2])
    with pytest.raises(error.CompositeError):
        amr.get(10)
    out = amr.get(10, return_exceptions=True)
    assert out[0] == 1.0 and out[2] == 0.5 and out[1].ename == "ZeroDivisionError"
    assert isinstance(view.apply_async(inverse, 0).get(10, return_exceptions=True),
                      error.RemoteError)
    assert view.apply_async(inverse, 2).get(10, return_exceptions=True) == 0.5
    # a failed chunk stands for each of its items: positions and length are kept
    out = view.map_sync(inverse, [1, 0, 2, 4, 5], chunksize=2, return_exceptions=True)
    assert len(out) == 5 and out[0] is out[1] and isinstance(out[0], error.RemoteError)
    assert out[2:] == [0.5, 0.25, 0.2]


def test_parallel_decorator_return_exceptions(view):
    @view.parallel(block=True, return_exceptions=True)
    def inv(x):
        return 1 / x

    out = inv.map([0, 1])
    assert isinstance(out[0], error.RemoteError) and out[1] == 1.0


def test_metadata_fields_are_attributes(rc, view):
    ar = view.apply_async(nap, 0.05)
    assert ar.status == "pending" and ar.completed is None
    ar.get(10)
    assert ar.status == "ok" and ar.engine_id in rc.ids and ar.msg_id == ar.msg_ids[0]
    assert isinstance(ar.started, datetime) and ar.submitted <= ar.started <= ar.completed
    assert ar.error is None
    amr = view.map_async(inverse, [1, 0, 2], chunksize=2)  # two tasks
    amr.wait(10)
    assert len(amr.started) == 2 and all(isinstance(t, datetime) for t in amr.completed)
    assert amr.status == ["error", "ok"] and amr.error[0].ename == "ZeroDivisionError"
    with pytest.raises(AttributeError, match="no attribute 'startd'"):
        amr.startd  # noqa: B018


def test_get_dict(rc, view):
    ar = view.apply_async(nap, 0)
    assert ar.get_dict(10) == {ar.engine_id: 0}
    amr = view.map_async(nap, [0.5, 0.5])  # two engines, hwm=1: one each
    assert amr.get_dict(10) == {0: 0.5, 1: 0.5}
    with pytest.raises(ValueError, match=r"\d tasks ran on engine"):
        view.map_async(nap, [0, 0, 0, 0, 0]).get_dict(10)


def test_split(view):
    ar = view.apply_async(nap, 0)
    assert ar.split() == (ar,)
    amr = view.map_async(nap, [1.0, 0, 0])
    parts = amr.split()
    assert parts is amr.split() and len(parts) == 3
    done, _ = concurrent.futures.wait(parts, timeout=10,
                                      return_when=concurrent.futures.FIRST_COMPLETED)
    assert parts[0] not in done  # the slow one finishes last
    assert [p.get(10) for p in parts] == [[1.0], [0], [0]]
    chunked = view.map_async(inverse, [1, 2, 4], chunksize=2)
    chunked.wait(10)
    assert [p.get(10) for p in chunked.split()] == [[1.0, 0.5], [0.25]]
    hub = view.client.get_result(amr.msg_ids)
    assert [p.get(10) for p in hub.split()] == [1.0, 0, 0]


def test_wait_interactive_with_return_exceptions(view, monkeypatch, capsys):
    monkeypatch.setenv("IPYLB_PROGRESS", "1")
    amr = view.map_async(inverse, [1, 0, 0, 2], return_exceptions=True)
    amr.wait_interactive(interval=0.01, timeout=-1)  # failures neither stop nor raise here
    err = capsys.readouterr().err  # tqdm's text bar (tqdm.auto outside a notebook)
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("inverse: 100%") and "4/4" in last and "failed=2" in last, err
    out = amr.get()
    assert out[0] == 1.0 and out[3] == 0.5 and all(isinstance(x, error.RemoteError) for x in out[1:3])


def test_wait_interactive_names_its_bar_by_label_and_can_be_off(view, monkeypatch, capsys):
    monkeypatch.setenv("IPYLB_PROGRESS", "1")
    with view.temp_flags(label="squares"):
        amr = view.map_async(inverse, [1, 2])
    amr.wait_interactive(interval=0.01)
    assert capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1].startswith(
        "squares: 100%")
    monkeypatch.setenv("TQDM_DISABLE", "1")  # tqdm's own switch
    view.map_async(inverse, [1, 2]).wait_interactive(interval=0.01)
    monkeypatch.setenv("TQDM_DISABLE", "0")
    monkeypatch.setenv("IPYLB_PROGRESS", "0")
    ar = view.map_async(inverse, [1, 2])
    ar.wait_interactive(interval=0.01)
    assert ar.ready() and capsys.readouterr().err == ""


def test_view_wait_waits_for_its_own_tasks(rc):
    v1, v2 = rc.load_balanced_view(), rc.load_balanced_view()
    other = v2.apply_async(nap, 1.5)
    mine = [v1.apply_async(nap, 0.3), v1.map_async(nap, [0.2])]
    assert v1.wait(timeout=0.05) is False
    assert v1.wait() is True
    assert all(ar.ready() for ar in mine) and not other.ready()
    assert v2.wait(other, timeout=-1) is True


def test_every_wait_takes_ipyparallels_timeouts_and_says_what_is_wrong(rc, view):
    """ipyparallel's rule for every wait: None or a negative number (its default, -1): no
    limit.  ar.wait(-1) returned False at once; ar.get("1") raised "'<' not supported"."""
    ar = view.apply_async(nap, 0.3)
    assert ar.wait(-1) is True and ar.get(-1) == 0.3  # waited, as ipyparallel does
    assert rc.wait([view.apply_async(nap, 0.2)], timeout=-1) is True
    assert view.wait(timeout=-1) is True
    assert rc.wait_for_engines(2, timeout=-1) is None
    import numpy as np

    assert view.apply_async(nap, 0).get(np.float32(30)) == 0  # any real number of seconds
    for wait in (ar.get, ar.wait, lambda t: ar.wait_interactive(timeout=t),
                 lambda t: rc.wait(timeout=t),
                 lambda t: view.wait(timeout=t), lambda t: rc.wait_for_engines(1, timeout=t)):
        for bad in ("1", True, [1]):
            with pytest.raises(TypeError, match=r"timeout must be a number of seconds \(None "
                                                r"or -1: no limit\), got "):
                wait(bad)
        with pytest.raises(ValueError, match="got nan"):
            wait(float("nan"))


def test_len_and_wait_for_engines(rc):
    assert len(rc) == 2 == len(rc.load_balanced_view())
    assert rc.wait_for_engines(2, timeout=5) is None
    with pytest.raises(TimeoutError, match="2 of 3 engines"):
        rc.wait_for_engines(3, timeout=0.2)
    fut = rc.wait_for_engines(2, block=False)
    assert isinstance(fut, concurrent.futures.Future) and fut.result(5) is None
    fut = rc.wait_for_engines(3, timeout=0.2, block=False)
    assert isinstance(fut.exception(5), TimeoutError)


def test_wait_for_engines_interactive_shows_progress(rc, monkeypatch, capsys):
    from ipylb import limits

    monkeypatch.setenv("IPYLB_PROGRESS", "1")
    monkeypatch.setattr(limits, "PROGRESS_AFTER_S", 0.0)
    rc.wait_for_engines(2, timeout=5)
    assert capsys.readouterr().err == ""  # not asked for
    rc.wait_for_engines(2, timeout=5, interactive=True)
    assert "ipylb: 2/2 engines up" in capsys.readouterr().err
    fut = rc.wait_for_engines(3, timeout=0.3, block=False, interactive=True)
    assert isinstance(fut.exception(5), TimeoutError)
    assert "ipylb: 2/3 engines up" in capsys.readouterr().err


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


def test_outstanding_is_this_clients_unfinished_tasks(rc, view, gate):
    ar = view.apply_async(wait_at_gate, gate.port)
    assert isinstance(rc.outstanding, frozenset) and ar.msg_ids[0] in rc.outstanding
    gate.running().sendall(b"go")
    assert ar.get(30) == "go"
    assert ar.msg_ids[0] not in rc.outstanding
    assert rc.validate()["engines"] == 2  # the controller's self-check, public too


def test_shutdown_reason_names_what_stopped_the_cluster(gate):
    with ipylb.Client(engines=1) as own:
        ar = own.load_balanced_view().apply_async(wait_at_gate, gate.port)
        gate.running()
        assert own.outstanding == {ar.msg_ids[0]}
        own.shutdown(reason="the {test} stopped it")
    with pytest.raises(error.ClientClosed) as e:
        ar.get(5)
    assert str(e.value) == f"task {ar.msg_ids[0]} had not finished when the {{test}} stopped it"
    with pytest.raises(error.ClientClosed, match=r"closed \(the \{test\} stopped it\)"):
        own.load_balanced_view()
    with pytest.raises(TypeError, match="takes only reason="):
        own.shutdown(hub=True)


def test_client_wait_takes_futures_wrapping_async_results(rc, view):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(view.apply_async, nap, 0.4)
        assert rc.wait([fut], timeout=0.05) is False
        assert rc.wait(fut, timeout=10) is True
        assert fut.result().ready()  # the AsyncResult inside was waited for too
    assert rc.wait(concurrent.futures.Future(), timeout=0.05) is False


def test_queue_status_targets_and_verbose(rc, view):
    ar = view.apply_async(nap, 0)
    ar.get(10)
    one = rc.queue_status(targets=ar.engine_id)
    assert {"queue", "completed", "tasks"} <= set(one) and one["completed"] >= 1
    assert set(rc.queue_status(targets=[1])) == {1, "unassigned"}
    verbose = rc.queue_status(verbose=True)
    assert ar.msg_id in verbose[ar.engine_id]["completed"]
    assert verbose["unassigned"] == [] and isinstance(verbose[0]["queue"], list)
    with pytest.raises(IndexError, match="no such engine"):
        rc.queue_status(targets=7)


# -- targets ---------------------------------------------------------------------------


def fail_first_time_here(tag):
    """Fails on the first call on each engine (per tag), succeeds after."""
    import builtins

    seen = builtins.__dict__.setdefault("_ipylb_test_seen", set())
    if tag not in seen:
        seen.add(tag)
        raise RuntimeError(f"first attempt of {tag}")
    return tag


def test_targets_restrict_placement(rc):
    v = rc.load_balanced_view(targets=[1])
    assert len(v) == 1 and "targets=[1]" in repr(v)
    amr = v.map_async(nap, [0.05] * 6)
    amr.get(20)
    assert amr.engine_id == [1] * 6  # engine 0 was free all along, and never used
    with v.temp_flags(targets=0):
        assert {v.apply_async(nap, 0.02).get_dict(10).popitem()[0] for _ in range(3)} == {0}
    assert v.targets == [1]


def test_targets_with_dependencies(rc):
    v = rc.load_balanced_view()
    with v.temp_flags(targets=0):
        first = v.apply_async(nap, 0.2)
    with v.temp_flags(targets=1):
        second = v.apply_async(nap, 0)
    second.get(10)
    with v.temp_flags(after=[first], targets=1):  # waits for first, still runs on 1
        later = v.apply_async(nap, 0)
    with v.temp_flags(follow=[first], targets=[0, 1]):
        follower = v.apply_async(nap, 0)
    assert later.get(10) == 0 and later.engine_id == 1 and first.ready()
    assert follower.get(10) == 0 and follower.engine_id == 0
    with v.temp_flags(follow=[second], targets=[0]):  # second ran on engine 1
        bad = v.apply_async(nap, 0)
    with pytest.raises(error.ImpossibleDependency, match="not among its targets"):
        bad.get(10)


def test_retries_stay_within_the_targets(rc):
    v = rc.load_balanced_view(targets=[1])
    v.retries = 2
    ar = v.apply_async(fail_first_time_here, "retry-within-targets")
    # the retry could have gone to engine 0 (untried), but targets allow only engine 1
    assert ar.get(20) == "retry-within-targets" and ar.engine_id == 1
    assert any("retrying" in str(row[3]) for row in rc.story(ar.msg_id))


def test_targets_are_checked(rc):
    v = rc.load_balanced_view()
    v.targets = [7]
    with pytest.raises(IndexError, match=r"no such engine\(s\): 7"):
        v.apply_async(nap, 0)
    with pytest.raises(TypeError, match="targets must be"):
        v.targets = "0"
    with pytest.raises(ValueError, match="names no engine"):
        v.set_flags(targets=[])
    with pytest.raises(AttributeError, match="not a flag of LoadBalancedView; its flags are"):
        v.tragets = [0]
    with pytest.raises(ValueError, match="timeout"):
        v.timeout = -1  # flags are validated when set, not at the next submission
    assert v.targets == [7] and v.timeout == 0


# -- imap ------------------------------------------------------------------------------


def square(x):
    return x * x


def test_imap_is_map_lazily(view):
    it = view.imap(square, range(50))
    assert list(it) == [x * x for x in range(50)]
    assert list(view.imap(pow, [2, 3], [5, 2, 9])) == [32, 9]  # zips, shortest wins
    assert list(view.imap(square, [])) == []
    first = next(iter(view.imap(nap, [0.4, 0, 0], ordered=False)))
    assert first == 0  # completion order: a fast item before the slow one


def test_imap_endless_input_with_a_bounded_window(rc, view):
    pulled = 0

    def numbers():
        nonlocal pulled
        for n in itertools.count():
            pulled += 1
            yield n

    results = []
    it = view.imap(square, numbers(), max_outstanding=5)
    assert pulled <= 5  # work starts at once, within the window
    for k, r in enumerate(it, 1):
        results.append(r)
        assert pulled - k <= 5, (pulled, k)  # never more than 5 submitted and not yielded
        if k == 40:
            break
    assert results == [n * n for n in range(40)]
    assert rc.wait(timeout=10)  # what was in flight has answered; nothing waits


def test_imap_leaving_early_aborts_the_rest_and_keeps_nothing(rc, view):
    cached = len(rc._outcomes)
    before = sum(s["completed"] for k, s in rc.queue_status().items() if k != "unassigned")
    it = view.imap(nap, [0.2] * 40, max_outstanding=20)
    assert next(it) == 0.2
    it.close()
    assert rc.wait(timeout=20)  # the aborted tasks answer at once, the running ones soon
    after = sum(s["completed"] for k, s in rc.queue_status().items() if k != "unassigned")
    assert after - before < 10  # most of the 20 submitted never ran
    assert len(rc._outcomes) == cached  # their results were dropped as they came
    assert next(it, "end") == "end"
    gen = view.imap(nap, [0.2] * 10, max_outstanding=6)
    next(gen)
    del gen  # garbage: the same as close()
    gc.collect()
    assert rc.wait(timeout=20) and len(rc._outcomes) == cached


def test_imap_input_error_comes_after_the_results_before_it(view):
    def items():
        yield from [0.8, 0, 0]
        raise ValueError("bad input item")

    before = set(view.client.hub_history())
    it = view.imap(nap, items(), max_outstanding=2)
    got = []
    with pytest.raises(ValueError, match="bad input item"):
        for r in it:
            got.append(r)
    assert got == [0.8, 0, 0]  # nothing in flight was lost
    assert next(it, "end") == "end"
    ran = [m for m in view.client.hub_history() if m not in before]
    assert sorted(view.client.get_result(ran).get(10)) == [0, 0, 0.8]  # the controller has them
    got = []
    with pytest.raises(ValueError, match="bad input item"):
        for r in view.imap(nap, items(), ordered=False):
            got.append(r)
    assert got == [0, 0, 0.8]  # in completion order, then the error
    bad = view.imap(square, [1, 2, threading.Lock()])  # an item that cannot be pickled
    assert next(bad) == 1 and next(bad) == 4
    with pytest.raises(SerializationError, match=r"could not pickle item 2 of the imap, "
                       r"positional argument 0 \(lock object\).*; the 2 item\(s\) before it "
                       "were sent: their results are yielded before this error is raised"):
        next(bad)
    # across refills of a window of 2: the position counts every item sent before
    bad = view.imap(square, [1, 2, 3, 4, threading.Lock()], max_outstanding=2)
    assert [next(bad) for _ in range(4)] == [1, 4, 9, 16]
    with pytest.raises(SerializationError, match=r"item 4 of the imap, .*the 4 item\(s\) before"):
        next(bad)
    with pytest.raises(SerializationError, match=r"item 0 of the imap, .*; nothing was sent\.$"):
        next(view.imap(square, [threading.Lock(), 1]))


def test_imap_return_exceptions(view):
    out = list(view.imap(inverse, [1, 0, 2], return_exceptions=True))
    assert out[0] == 1.0 and out[2] == 0.5 and out[1].ename == "ZeroDivisionError"
    it = view.imap(inverse, [1, 0, 2, 4])
    assert next(it) == 1.0
    with pytest.raises(error.RemoteError, match="ZeroDivisionError"):
        next(it)
    assert next(it, "end") == "end"  # finished, like a generator that raised


def test_imap_keeps_no_record_per_item(rc, view):
    cached = len(rc._outcomes)
    assert sum(1 for _ in view.imap(square, range(3000))) == 3000
    assert len(rc._outcomes) == cached
    with pytest.raises(ValueError, match="max_outstanding"):
        view.imap(square, range(3), max_outstanding=-1)
    with pytest.raises(TypeError, match="at least one iterable"):
        view.imap(square)


def test_imap_of_a_closed_client_fails_instead_of_waiting(rc):
    from ipylb import Client
    from ipylb.error import ClientClosed

    other = Client(rc._local.connection_file)
    it = other.load_balanced_view().imap(nap, [0.5, 0.5, 0.5])
    other.close()
    with pytest.raises(ClientClosed, match="get_result"):
        next(it)
    assert next(it, "end") == "end"
