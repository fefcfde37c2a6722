"""The client API against real engine kernels (session-scoped two-engine cluster)."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime

import ipylb
import numpy as np
import pytest
from ipylb.error import CompositeError, RemoteError, SerializationError


def square(x):
    return x * x


def slow_identity(x, delay):
    time.sleep(delay)
    return x


def whoami():
    return os.getpid()


# -- the specification's examples -------------------------------------------------


def test_parallel_map_equals_serial_map(view):
    view.block = True
    serial = list(map(lambda x: x**10, range(32)))
    parallel = view.map(lambda x: x**10, range(32))
    assert parallel == serial


def test_parallel_decorator(view):
    @view.parallel(block=True)
    def f(x):
        return 10.0 * x**4

    assert f.map(range(32)) == [10.0 * x**4 for x in range(32)]
    assert f(3) == 810.0


def test_map_results_iterate_as_they_arrive_in_order(view):
    delays = [0.3, 0.0, 0.0, 0.0]
    amr = view.map_async(slow_identity, range(4), delays)
    t0 = time.monotonic()
    seen = []
    for x in amr:
        seen.append((x, amr.ready()))
    assert [x for x, _ in seen] == [0, 1, 2, 3]
    assert time.monotonic() - t0 >= 0.25


def held_identity(x, release):
    """``x`` once the file ``release`` exists (None: at once); 60 s at most."""
    deadline = time.monotonic() + 60
    while release is not None and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def test_unordered_iteration_yields_fast_items_first(view, tmp_path):
    release = tmp_path / "release"  # "slow" finishes only after "fast" has been yielded
    amr = view.map_async(held_identity, ["slow", "fast"], [str(release), None], ordered=False)
    first = next(iter(amr))
    release.touch()
    assert first == "fast"
    assert sorted(amr) == ["fast", "slow"]
    assert amr.get() == ["slow", "fast"]  # get() is always in submission order


def test_tasks_use_both_engines(rc, view):
    amr = view.map_async(slow_identity, range(6), [0.1] * 6)
    assert amr.get(30) == list(range(6))
    assert set(amr.engine_id) == set(rc.ids) == {0, 1}


# -- map details ------------------------------------------------------------------


def test_map_several_sequences_shortest_wins(view):
    assert view.map_sync(lambda a, b: a + b, [1, 2, 3], [10, 20]) == [11, 22]


def test_map_accepts_generators_and_empty_input(view):
    assert view.map_sync(square, (i for i in range(5))) == [0, 1, 4, 9, 16]
    empty = view.map_async(square, [])
    assert empty.get(1) == [] and empty.ready() and len(empty) == 0


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_chunksize(view, chunksize):
    amr = view.map_async(square, range(10), chunksize=chunksize)
    assert amr.get(30) == [x * x for x in range(10)]
    assert len(amr.msg_ids) == -(-10 // chunksize)
    assert len(amr) == 10
    assert list(amr) == [x * x for x in range(10)]


def test_map_failures_raise_composite_error(view):
    amr = view.map_async(lambda x: 1 // x, [1, 0, 2, 0])
    with pytest.raises(CompositeError) as info:
        amr.get(30)
    assert len(info.value.elist) == 2
    assert all(e[0] == "ZeroDivisionError" for e in info.value.elist)
    assert "(items 1, 3)" in str(info.value) and "(engine " in str(info.value)
    with pytest.raises(RemoteError):
        list(amr)  # iteration raises at the first failing item
    assert not amr.successful()


# -- AsyncResult ------------------------------------------------------------------


def test_async_result_api(view):
    ar = view.apply_async(slow_identity, 7, 0.3)
    assert not ar.ready()
    with pytest.raises(ValueError):
        ar.successful()
    with pytest.raises(TimeoutError):
        ar.get(0.01)
    assert ar.wait(30) is True
    assert ar.get() == 7 and ar.get(0) == 7  # repeatable
    assert ar.successful()
    assert len(ar.msg_ids) == 1 and isinstance(ar.msg_ids[0], str)


def test_metadata_and_stdout(view):
    def chatty(x):
        import sys

        print("hello", x)
        print("oops", file=sys.stderr)
        return x

    ar = view.apply_async(chatty, 5)
    assert ar.get(30) == 5
    md = ar.metadata
    assert md["status"] == md.status == "ok"
    assert md.engine_id in (0, 1)
    assert isinstance(md.submitted, datetime) and isinstance(md.completed, datetime)
    assert md.submitted <= md.started <= md.completed
    assert ar.stdout == "hello 5\n" and md.stdout == "hello 5\n"
    assert ar.stderr == "oops\n"


def test_stdout_is_captured_per_task(view):
    amr = view.map_async(lambda i: print(f"item {i}") or i, range(6))
    amr.get(30)
    assert amr.stdout == [f"item {i}\n" for i in range(6)]


def test_msg_ids_are_unique(view):
    amr = view.map_async(square, range(50))
    ar = view.apply_async(square, 1)
    ids = amr.msg_ids + ar.msg_ids
    assert len(set(ids)) == 51
    amr.get(30)


def test_remote_error_carries_remote_traceback(view):
    def boom():
        raise ValueError("bad value here")

    ar = view.apply_async(boom)
    with pytest.raises(RemoteError) as info:
        ar.get(30)
    err = info.value
    assert err.ename == "ValueError" and err.evalue == "bad value here"
    assert "bad value here" in str(err) and "ValueError" in str(err)
    assert "in boom" in err.traceback
    assert "taskchannel.py" not in err.traceback  # starts at the user's code
    assert err.engine_info["engine_id"] in (0, 1)
    with pytest.raises(RemoteError):
        ar.get()  # re-raised each time


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
def test_system_exit_and_keyboard_interrupt_are_task_errors(view, exc):
    def leave():
        raise exc(3)

    with pytest.raises(RemoteError) as info:
        view.apply_sync(leave)
    assert info.value.ename == exc.__name__
    assert view.apply_sync(square, 4) == 16  # the engines survived


# -- flags ------------------------------------------------------------------------


def test_block_flag_and_sync_async_variants(view):
    view.block = True
    assert view.apply(square, 3) == 9
    assert isinstance(view.apply_async(square, 3), ipylb.AsyncResult)
    view.block = False
    ar = view.apply(square, 3)
    assert isinstance(ar, ipylb.AsyncResult) and ar.get(30) == 9
    assert view.apply_sync(square, 3) == 9


def test_temp_flags_restores_even_on_error(view):
    with view.temp_flags(block=True, retries=2, timeout=5):
        assert view.block and view.retries == 2 and view.timeout == 5
    assert (view.block, view.retries, view.timeout) == (False, 0, 0)
    with pytest.raises(RuntimeError), view.temp_flags(block=True):
        raise RuntimeError
    assert view.block is False


@pytest.mark.parametrize(
    "flags, error",
    [({"nonsense": 1}, (TypeError, KeyError, ValueError)), ({"timeout": -1}, ValueError),
     ({"retries": -2}, ValueError), ({"after": 3.5}, TypeError), ({"follow": object()}, TypeError)],
)
def test_bad_flags_raise(view, flags, error):
    with pytest.raises(error), view.temp_flags(**flags):
        pass
    assert view.retries == 0 and view.timeout == 0


def test_views_are_independent(rc):
    a, b = rc.load_balanced_view(), rc.load_balanced_view()
    assert a is not b
    a.block = True
    assert b.block is False


# -- bad input --------------------------------------------------------------------


def test_unpicklable_argument_is_named_and_nothing_is_sent(rc, view):
    before = rc.queue_status()
    with pytest.raises(SerializationError, match="positional argument 1 .*lock"):
        view.apply_async(square, 1, threading.Lock())
    with pytest.raises(SerializationError, match="keyword argument 'k'"):
        view.apply_async(square, k=threading.Lock())
    after = rc.queue_status()
    assert sum(v["completed"] for k, v in after.items() if k != "unassigned") == sum(
        v["completed"] for k, v in before.items() if k != "unassigned"
    )


def test_unpicklable_function_is_named(view):
    lock = threading.Lock()

    def holds_lock():
        return lock

    with pytest.raises(SerializationError, match="holds_lock"):
        view.apply_async(holds_lock)


def test_unpicklable_result_fails_the_task_only(view):
    ar = view.apply_async(lambda: threading.Lock())
    with pytest.raises(RemoteError, match="could not be pickled") as info:
        ar.get(30)
    assert info.value.ename == "SerializationError"
    assert view.apply_sync(square, 5) == 25


def test_apply_needs_a_callable(view):
    with pytest.raises(TypeError):
        view.apply_async(42)


# -- data -------------------------------------------------------------------------


def test_large_numpy_round_trip(view):
    arr = np.random.default_rng(0).random(100 * 1024 * 1024 // 8)  # 100 MB
    out = view.apply_sync(lambda a: a * 2, arr)
    assert out.shape == arr.shape and np.array_equal(out, arr * 2)
    out[0] = 1.0  # results are ordinary writable arrays


def test_arrays_arrive_writable_on_the_engine(view):
    def bump(a):
        a += 1
        return a

    assert np.array_equal(view.apply_sync(bump, np.zeros(100_000)), np.ones(100_000))


# -- interactive functions ----------------------------------------------------------


def test_main_functions_see_the_engine_namespace(view):
    ns = {"__name__": "__main__", "K": 5}
    exec(
        "def probe(x):\n"
        "    global G\n"
        "    G = x\n"
        "    ip = get_ipython()\n"
        "    return globals() is ip.user_ns and ip.user_ns['G'] == x\n"
        "def addk(x):\n"
        "    return x + K\n",
        ns,
    )
    assert view.apply_sync(ns["probe"], 3) is True
    assert view.apply_sync(ns["addk"], 1) == 6  # captured globals travel with the function


# -- client ---------------------------------------------------------------------------


def test_ids_queue_status_and_wait(rc, view):
    assert rc.ids == [0, 1]
    amr = view.map_async(slow_identity, range(6), [0.05] * 6)
    assert rc.wait(timeout=30) is True
    assert rc.wait([amr]) and rc.wait(amr.msg_ids)
    qs = rc.queue_status()
    assert set(qs) == {0, 1, "unassigned"}
    assert qs["unassigned"] == 0
    # API.md's three counts, plus (issue 12) how often the engine's slot was restarted
    assert all(set(v) == {"queue", "completed", "tasks", "restarts"} and v["restarts"] == 0
               for k, v in qs.items() if k != "unassigned")


def test_queue_status_counts_unassigned(rc, view):
    amr = view.map_async(slow_identity, range(8), [0.3] * 8)
    qs = rc.queue_status()
    assert qs["unassigned"] >= 4  # hwm=1: two running, the rest waiting in the controller
    amr.get(30)


def test_wait_for_unknown_msg_id_raises(rc):
    with pytest.raises(KeyError):
        rc.wait(["no-such-task"], timeout=1)


@pytest.mark.parametrize("n", [0, -1])
def test_engine_count_must_be_positive(n):
    with pytest.raises(ValueError):
        ipylb.Client(engines=n)


def test_unknown_scheme_is_a_value_error():
    with pytest.raises(ValueError, match="scheme"):
        ipylb.Client(engines=1, scheme="fastest")


# -- the Future interface and ipyparallel's extras --------------------------------


def fails():
    raise ValueError("no")


def test_async_results_are_futures(view):
    import asyncio
    import concurrent.futures as cf

    good, bad = view.apply_async(slow_identity, 1, 0.05), view.apply_async(fails)
    called = threading.Event()
    good.add_done_callback(lambda f: called.set() if f is good else None)
    done, not_done = cf.wait([good, bad], timeout=30)
    assert done == {good, bad} and not not_done and called.wait(5)
    assert good.done() and good.result() == 1 and good.exception() is None
    assert isinstance(bad.exception(), RemoteError) and bad.exception().ename == "ValueError"
    assert [f.result() for f in cf.as_completed([view.apply_async(square, 3)], 30)] == [9]

    async def awaited():
        return await asyncio.wrap_future(view.apply_async(square, 4))

    assert asyncio.run(awaited()) == 16


def test_indexing_timing_and_outputs(view, capsys):
    amr = view.map_async(slow_identity, [10, 11, 12], [0.01] * 3)
    slow = view.apply_async(slow_identity, 0, 0.5)
    with pytest.raises(TimeoutError, match="not finished"):
        slow[0]
    amr.wait(30)
    assert amr[1] == 11 and amr[1:] == [11, 12] and amr.sent
    assert amr["status"] == ["ok"] * 3 and len(amr["engine_id"]) == 3
    assert amr.serial_time >= 0.03 and amr.wall_time == amr.elapsed > 0  # 3 tasks of 10 ms
    md = slow.metadata  # still pending: every field is there
    assert md.status == "pending" and md.engine_id is None and md.completed is None
    printed = view.apply_async(print, "said on an engine")
    printed.wait(30)
    printed.display_outputs()
    assert "said on an engine" in capsys.readouterr().out


def test_hub_results_keep_the_submission_time(rc, view):
    ar = view.apply_async(square, 5)
    ar.get(30)
    time.sleep(0.05)  # so that a "submitted" taken now would differ
    hub = rc.get_result(ar.msg_ids[0])
    assert hub.get(30) == 25
    assert hub.metadata.submitted == ar.metadata.submitted <= ar.metadata.started


def test_a_failed_get_result_keeps_earlier_waiters(rc, view):
    ar = view.apply_async(slow_identity, 7, 0.3)
    first = rc.get_result(ar.msg_ids[0])
    with pytest.raises(KeyError) as info:
        rc.get_result([ar.msg_ids[0], "no-such-id"])
    assert str(info.value).count("'no-such-id'") == 1 and '"\\' not in str(info.value)
    assert first.get(30) == 7


def test_closing_a_client_fails_what_it_still_waits_for(rc, view):
    from ipylb.error import ClientClosed

    other = ipylb.Client(rc._local.connection_file)
    ar = other.load_balanced_view().apply_async(slow_identity, 8, 0.5)
    other.close()
    with pytest.raises(ClientClosed, match="get_result"):
        ar.get(0)
    assert rc.get_result(ar.msg_ids[0]).get(30) == 8  # the task ran on regardless


def test_views_start_with_the_clients_block_flag(rc):
    rc.block = True
    try:
        view = rc.load_balanced_view()
        assert view.block and view.apply(square, 6) == 36
    finally:
        rc.block = False
    assert rc.load_balanced_view().block is False


def test_cluster_options_need_a_cluster_to_start(rc):
    with pytest.raises(ValueError, match="engines=N"):
        ipylb.Client(rc._local.connection_file, scheme="lru")


def test_an_empty_result_is_a_done_future(view):
    import concurrent.futures as cf

    empty = view.map_async(abs, [])
    assert empty.done() and cf.wait([empty], timeout=5).done == {empty}
    assert empty.result() == [] and empty.exception() is None


def test_done_callbacks_may_wait_for_other_results(view):
    """Callbacks run on a thread of their own: one that waits for a slower result, or
    cancels one, stalls neither the delivery of results nor itself."""
    fast, slow = view.apply_async(square, 2), view.apply_async(slow_identity, 3, 0.3)
    seen, called = [], threading.Event()

    def callback(f):
        seen.append((f.result(), slow.result(30)))
        slow.cancel()  # already running or done: returns at once, without a round trip
        called.set()

    fast.add_done_callback(callback)
    assert view.apply_async(square, 5).get(10) == 25  # delivered while the callback waits
    assert called.wait(30) and seen == [(4, 3)]


def test_closing_fails_a_request_waiting_for_the_controller(rc):
    import signal

    other = ipylb.Client(rc._local.connection_file)
    errors = []

    def ask():
        try:
            other.queue_status(timeout=None)
        except RuntimeError as e:
            errors.append(e)

    os.kill(rc._local.proc.pid, signal.SIGSTOP)  # the controller cannot answer now
    try:
        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 10
        while not other._replies and time.monotonic() < deadline:  # the request is out
            time.sleep(0.01)
        other.close()
        asker.join(10)
    finally:
        os.kill(rc._local.proc.pid, signal.SIGCONT)
    assert not asker.is_alive() and "closed" in str(errors[0])
