"""No user code running on a thread of ipylb's may hold up the delivery of a result
(issue 9 item 6): done callbacks, asyncio.wrap_future, callbacks that wait or block."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading

import pytest
from ipylb.client import callbacks
from ipylb.client.callbacks import CallbackRunner
from test_pending import Gate, wait_at_gate, wait_until

TIMEOUT = 30.0
BLOCK = 4 * TIMEOUT  # a blocked callback waits this long at most: well beyond any assertion


def square(x):
    return x * x


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


# -- on real engines -----------------------------------------------------------------


def test_a_done_callback_may_wait_for_a_task_it_submits(view):
    """The issue's input: the callback submits c and waits for it with a timeout."""
    got, called = {}, threading.Event()

    def cb(_ar):
        c = view.apply_async(square, 3)
        done, _ = cf.wait([c], timeout=10)
        got.update(done=c in done, value=c.result(1), thread=threading.current_thread().name)
        called.set()

    view.apply_async(square, 2).add_done_callback(cb)
    assert called.wait(TIMEOUT)
    assert got == {"done": True, "value": 9, "thread": "ipylb-callbacks"}


def test_a_result_with_callbacks_of_its_own_is_delivered_while_a_callback_waits_for_it(view):
    """The same, when c has a done callback too: c's state is set by the receiving thread,
    not queued behind the callback that waits for it (was: a timeout), and c's callback
    runs after."""
    got, inner_ran = {}, threading.Event()

    def cb(_ar):
        c = view.apply_async(square, 4)
        c.add_done_callback(lambda f: inner_ran.set())
        done, _ = cf.wait([c], timeout=10)
        got["done"] = c in done

    view.apply_async(square, 1).add_done_callback(cb)
    assert inner_ran.wait(TIMEOUT) and got == {"done": True}


def test_a_blocked_callback_does_not_hold_up_other_callbacks(view):
    a_started, release, b_ran = threading.Event(), threading.Event(), threading.Event()
    a = view.apply_async(square, 2)
    a.add_done_callback(lambda f: (a_started.set(), release.wait(BLOCK)))
    assert a_started.wait(TIMEOUT)  # a's callback now blocks the callback thread
    try:
        b = view.apply_async(square, 3)
        b.add_done_callback(lambda f: b_ran.set())
        assert b.get(TIMEOUT) == 9
        assert b_ran.wait(TIMEOUT)  # on another thread, since a's callback is stuck
    finally:
        release.set()


def test_asyncio_wrap_future_is_not_held_up_by_a_blocked_callback(view):
    """asyncio.wrap_future completes the asyncio future through a done callback: it must
    not wait behind a user callback that blocks (here, until the awaiting code is done)."""
    blocked, release = threading.Event(), threading.Event()

    async def main():
        loop = asyncio.get_running_loop()
        a = view.apply_async(square, 1)
        a.add_done_callback(lambda f: (blocked.set(), release.wait(BLOCK)))
        await loop.run_in_executor(None, blocked.wait, TIMEOUT)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(view.apply_async(square, 6)), TIMEOUT)
        finally:
            release.set()

    assert asyncio.run(main()) == 36


def test_callbacks_of_one_result_run_in_the_order_added(view, gate, caplog):
    ar = view.apply_async(wait_at_gate, gate.port)
    conn = gate.running()  # not finished until the test says: callbacks queue up
    ran, last = [], threading.Event()

    def failing(_f):
        ran.append("raises")
        raise ValueError("a callback's bug")

    for i in range(3):
        ar.add_done_callback(lambda f, i=i: ran.append(i))
    ar.add_done_callback(failing)
    ar.add_done_callback(lambda f: (ran.append(f.result()), last.set()))
    with caplog.at_level(logging.ERROR, logger="ipylb.client"):
        conn.sendall(b"go")
        assert last.wait(TIMEOUT)
    assert ran == [0, 1, 2, "raises", "go"]  # a raising callback stops none after it
    assert "a callback's bug" in caplog.text
    # On a finished result a callback runs at once, in the caller's thread.
    here = []
    ar.add_done_callback(lambda f: here.append(threading.current_thread()))
    assert here == [threading.current_thread()]


# -- the runner itself ---------------------------------------------------------------


def test_runner_runs_callbacks_in_order_on_one_thread():
    runner, seen, done = CallbackRunner(), [], threading.Event()
    for i in range(200):
        runner.call(seen.append, i)
    runner.call(done.set)
    assert done.wait(TIMEOUT)
    assert seen == list(range(200))
    assert runner._workers == 1


def test_runner_gives_the_queue_to_another_thread_when_a_callback_blocks(monkeypatch):
    monkeypatch.setattr(callbacks, "CALLBACK_STALL_S", 0.05)
    runner, release, started = CallbackRunner(), threading.Event(), threading.Event()
    seen, done = [], threading.Event()
    runner.call(lambda: (started.set(), release.wait(BLOCK)))
    assert started.wait(TIMEOUT)
    for i in range(5):
        runner.call(seen.append, i)
    runner.call(done.set)
    assert done.wait(TIMEOUT) and seen == list(range(5))  # in order, while the first blocks
    assert not release.is_set() and runner._workers == 2
    release.set()
    # Once idle, the extra worker leaves: one is enough.
    idle = threading.Event()
    runner.call(idle.set)
    assert idle.wait(TIMEOUT)
    wait_until(lambda: runner._workers == 1)
