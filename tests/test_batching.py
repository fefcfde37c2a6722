"""Fewer messages per task (issue 14 item 3): submissions made back to back leave the
client together, results finished within one turn of the controller reach their client as
one message; a lone submission waits for no batch.  Real engine kernels and sockets; the
controller's batching is also driven step by step on a real Controller object."""

from __future__ import annotations

import threading
import time

import ipylb
import pytest
import zmq
from ipylb import wire
from ipylb.client import submit as submit_module
from ipylb.client.client import Client
from ipylb.controller.hub import Controller
from procs import DrivenController

TIMEOUT = 60


def square(x):
    return x * x


def noop():
    return None


@pytest.fixture
def other(rc):
    """A second client of the session's cluster (its own sending thread, counters)."""
    c = ipylb.Client(rc._local.connection_file)
    yield c
    c.close()


def test_a_thousand_apply_async_in_a_loop_leave_in_far_fewer_messages(other, monkeypatch):
    # The gap that makes a burst is set wide, so that a loaded machine (a loop preempted
    # between two calls) still makes one: the mechanism is what is tested here.
    monkeypatch.setattr(submit_module, "BURST_S", 0.05)
    view = other.load_balanced_view()
    view.apply_sync(noop)
    before = other._submit_messages
    received = other.controller_stats()["messages"]["submit"]  # counted by the controller
    ars = [view.apply_async(square, i) for i in range(1000)]
    assert [ar.get(TIMEOUT) for ar in ars] == [i * i for i in range(1000)]
    sent = other._submit_messages - before
    assert 4 <= sent <= 100, sent  # at most 256 tasks a message; far fewer than 1,000
    # (the session's other client submits nothing meanwhile)
    assert other.controller_stats()["messages"]["submit"] - received == sent


def test_a_submission_after_a_pause_is_sent_at_once(other):
    view = other.load_balanced_view()
    view.apply_sync(noop)
    time.sleep(10 * submit_module.BURST_S)  # the pause that makes the next one "lone"
    before = other._submit_messages
    ar = view.apply_async(square, 7)
    # Sent by apply_async itself, before it returned: nothing held for a batch.
    assert other._submit_messages == before + 1 and other._held is None
    assert ar.get(TIMEOUT) == 49


def test_waiting_sends_what_is_held_without_the_sending_thread(rc, monkeypatch):
    """apply_sync and any wait for a result send a held submission themselves: with the
    sending thread never running, back-to-back submissions and their results still flow."""
    monkeypatch.setattr(submit_module, "BURST_S", 10.0)  # every submission after the first is held
    monkeypatch.setattr(Client, "_send_loop", lambda self: None)  # the sending thread does nothing
    c = ipylb.Client(rc._local.connection_file)
    try:
        view = c.load_balanced_view()
        assert [view.apply_sync(square, i) for i in range(20)] == [i * i for i in range(20)]
        ars = [view.apply_async(square, i) for i in range(50)]
        assert c._held is not None  # held, and no thread will send it
        assert [ar.get(TIMEOUT) for ar in ars] == [i * i for i in range(50)]
        ar = view.apply_async(square, 3)
        assert c.queue_status()["unassigned"] >= 0  # a request sends what is held first
        assert c._held is None and ar.get(TIMEOUT) == 9
        held = [view.apply_async(square, i) for i in range(3)]
        assert c._held is not None
    finally:
        c.close()  # sends what is held: those tasks run on (another client can fetch them)
    with ipylb.Client(rc._local.connection_file) as fetcher:
        assert fetcher.get_result([ar.msg_ids[0] for ar in held]).get(TIMEOUT) == [0, 1, 4]


def test_the_sending_thread_sends_a_held_submission_nobody_waits_for(other, monkeypatch):
    monkeypatch.setattr(submit_module, "BURST_S", 10.0)
    view = other.load_balanced_view()
    view.apply_sync(noop)
    ars = [view.apply_async(square, i) for i in range(5)]
    done = threading.Event()
    left = [len(ars)]

    def one_done(_ar):
        left[0] -= 1
        if not left[0]:
            done.set()

    for ar in ars:
        ar.add_done_callback(one_done)  # (waits for nothing: sends nothing)
    assert done.wait(TIMEOUT), "held submissions were never sent"


def test_different_functions_and_flags_keep_their_own_messages(other, monkeypatch):
    monkeypatch.setattr(submit_module, "BURST_S", 10.0)
    view = other.load_balanced_view()
    view.apply_sync(noop)
    before = other._submit_messages
    a = view.apply_async(square, 2)
    b = view.apply_async(noop)
    with view.temp_flags(retries=1):
        c = view.apply_async(square, 3)
    d = view.apply_async(square, 4)
    # each unlike the one before (a DAG's loop, each task its own `after`): sent at once
    assert other._held is None and other._submit_messages == before + 4
    e = view.apply_async(square, 5)  # like d: held, for the next ones like it
    assert other._held is not None
    assert [ar.get(TIMEOUT) for ar in (a, b, c, d, e)] == [4, None, 9, 16, 25]


# -- engines: tasks in, results out, several per message --------------------------------


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


@pytest.fixture(scope="module")
def piped():
    """One real engine kernel that takes every task at once (hwm=0): tasks queue on it."""
    c = ipylb.Client(engines=1, hwm=0)
    yield c
    c.shutdown()


def test_an_engine_takes_tasks_and_sends_results_several_per_message(piped, monkeypatch):
    monkeypatch.setattr(submit_module, "BURST_S", 10.0)
    view = piped.load_balanced_view()
    view.apply_sync(square, 0)  # its run time is known from now on: short
    before = piped.controller_stats()["messages"]
    ars = [view.apply_async(square, i) for i in range(500)]
    assert [ar.get(TIMEOUT) for ar in ars] == [i * i for i in range(500)]
    after = piped.controller_stats()["messages"]
    done, dones = (after.get(k, 0) - before.get(k, 0) for k in ("done", "dones"))
    assert dones >= 1 and done + dones <= 250, (done, dones)  # far fewer than 500


def test_results_do_not_wait_for_a_task_whose_function_is_not_known_to_be_short(piped):
    """A result waits to leave with the next task's only if that task's function last ran
    under SHORT_TASK_S: the first run of a function (here one that sleeps) sends first."""
    view = piped.load_balanced_view()
    view.apply_sync(square, 0)
    quick = [view.apply_async(square, i) for i in range(20)]
    slow = view.apply_async(sleep_for, 5.0)  # queued right behind them on the one engine
    assert [ar.get(TIMEOUT) for ar in quick] == [i * i for i in range(20)]
    assert not slow.ready()  # the quick ones' results came while it still ran
    assert slow.get(TIMEOUT) == 5.0


# -- the controller: results of one turn, one message per client -------------------------


def test_tasks_for_one_engine_and_results_for_one_client_go_as_one_message_each():
    key = wire.new_key()
    d = DrivenController(Controller(key, hwm=0), key, "b1")
    ctl, engine, submit, results = d.ctl, d.engine, d.submit, d.results
    esign, ssign, rsign, receive = d.esign, d.ssign, d.rsign, d.receive
    try:
        fkey = ssign.bufs_mac([b"function"])
        tasks = [(f"t{i}", 1, ssign.bufs_mac([f"argument {i}".encode()])) for i in range(3)]
        submit.send_multipart(ssign.pack(
            wire.SUBMIT, (None, (1, fkey, fkey), tasks, (None, "f")),
            [b"function", *(f"argument {i}".encode() for i in range(3))], b""))
        assert ctl.clients.poll(10_000)
        ctl._drain(ctl.clients, ctl._on_client)
        assert receive(engine, esign)[0] == wire.FUNCTION
        # hwm=0: all three assigned to the one engine by one drain, so sent as one message
        kind, meta, bufs, _ = receive(engine, esign)
        assert kind == wire.TASKS
        sent = wire.unbatch(meta, bufs)
        assert [(m[0], b) for m, b, _mac in sent] == [
            (f"t{i}", [f"argument {i}".encode()]) for i in range(3)]
        for _m, b, mac in sent:  # each under its client's MAC
            esign.check_bufs(b, mac)
        assert not engine.poll(200)
        now = time.time()
        made = {}
        for i in range(3):  # three results within one turn of the controller's loop
            value = [f"value {i}".encode()]
            made[f"t{i}"] = value
            ctl._on_engine([zmq.Frame(b"engine-b1"), *esign.pack(
                wire.DONE, (f"t{i}", "ok", now, now, "", "", None), value)])
        assert not results.poll(200)  # held until the turn ends
        ctl._flush_results()
        kind, meta, bufs, _ = receive(results, rsign)
        assert kind == wire.RESULTS
        items = wire.unbatch(meta, bufs)
        assert [(m[0], m[2], b) for m, b, _mac in items] == [
            (t, "ok", made[t]) for t in ("t0", "t1", "t2")]
        for _m, b, mac in items:  # each still under its engine's MAC over its own buffers
            rsign.check_bufs(b, mac)
        assert not results.poll(200)  # one message for all three

        # A lone result is a plain RESULT; one owed to a client goes before a reply to it.
        submit.send_multipart(ssign.pack(
            wire.SUBMIT, (None, (1, fkey, fkey), [("t3", 1, ssign.bufs_mac([b"a"]))],
                          (None, "f")), [b"function", b"a"], b""))
        assert ctl.clients.poll(10_000)
        ctl._drain(ctl.clients, ctl._on_client)
        assert receive(engine, esign)[1][0] == "t3"
        ctl._on_engine([zmq.Frame(b"engine-b1"), *esign.pack(
            wire.DONE, ("t3", "ok", now, now, "", "", None), [b"v3"])])
        ctl._on_client([zmq.Frame(b"client-b1-r"), *wire.Signer(key, b"client-b1-r", ctl.ident).pack(
            wire.REQUEST, (5, "ping", None))])
        kind, meta, bufs, _ = receive(results, rsign)
        assert (kind, meta[0], bufs) == (wire.RESULT, "t3", [b"v3"])
        kind, meta = receive(results, rsign)[:2]
        if kind == wire.EVENT:  # (a socket that pings is a listener: it is told the engines)
            kind, meta = receive(results, rsign)[:2]
        assert (kind, meta) == (wire.REPLY, (5, True, None))
    finally:
        d.close()


def test_a_batch_is_refused_unless_its_entries_account_for_its_buffers():
    assert wire.unbatch(*wire.batch([("a", [b"1", b"2"], b"m"), ("b", [], b"")])) == [
        ("a", [b"1", b"2"], b"m"), ("b", [], b"")]
    for meta, bufs in [
        ([], []),  # empty
        ("x", []),  # not a list
        ([("a", 2, b"")], [b"1"]),  # more than there is
        ([("a", 1, b"")], [b"1", b"2"]),  # a buffer nobody claims
        ([("a", -1, b"")], []),
        ([("a", 0)], []),  # not a triple
        ([("a", 0, "mac")], []),  # a MAC that is not bytes
    ]:
        with pytest.raises(wire.WireError):
            wire.unbatch(meta, bufs)
