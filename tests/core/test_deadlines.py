"""The walltime rule in the core (ipylb.core.deadlines): interrupt at start + walltime,
restart the engine at start + walltime + grace, WalltimeExceeded counts as an attempt."""

from __future__ import annotations

import pytest
from corekit import Core
from hypothesis import given, settings
from hypothesis import strategies as st
from ipylb.core.events import (
    WALLTIME,
    Assign,
    Deliver,
    EngineAdded,
    Fail,
    Interrupt,
    RestartEngine,
    TaskDone,
    TaskStarted,
    TaskSubmitted,
    Tick,
)
from ipylb.core.scheduler import Scheduler


def test_interrupt_exactly_at_start_plus_walltime_counted_from_the_reported_start():
    c = Core(engines=1)
    c.now = 1.0
    assert c.submit("a", walltime=2) == [Assign("a", 0)]
    assert c.s.next_deadline() is None  # not started: no run-time clock yet
    c.now = 1.5
    assert c.started("a", 0) == []
    assert c.s.next_deadline() == 3.5
    assert c.tick(3.49) == []
    assert c.tick(3.5) == [Interrupt("a", 0)]
    assert c.tick(4.0) == []  # interrupted once only
    assert c.s.next_deadline() == 8.5  # the grace period (5 s by default)


def test_interrupted_task_that_fails_is_walltime_exceeded_with_limit_and_time_ran():
    c = Core(engines=1)
    c.submit("a", walltime=2)
    c.started("a", 0)
    c.tick(2.0)
    c.now = 2.25
    (fail,) = c.done("a", 0, ok=False)
    assert isinstance(fail, Fail) and fail.error == WALLTIME and fail.engine_id == 0
    assert "walltime of 2s" in fail.message and "ran 2.2s" in fail.message
    assert "interrupted" in fail.message and "restarted" not in fail.message
    assert c.state("a") == "failed"
    assert c.s.next_deadline() is None


def test_interrupted_task_that_returns_a_value_succeeds():
    c = Core(engines=1)
    c.submit("a", walltime=1)
    c.started("a", 0)
    assert c.tick(1.0) == [Interrupt("a", 0)]
    assert c.done("a", 0, ok=True) == [Deliver("a")]


def test_task_finishing_in_time_is_never_interrupted_and_its_timer_is_dropped():
    c = Core(engines=1)
    c.submit("a", walltime=2)
    c.started("a", 0)
    c.now = 1.0
    assert c.done("a", 0, ok=False) == [Deliver("a")]  # its own error, not a walltime one
    assert c.s.next_deadline() is None
    assert c.tick(10.0) == []


def test_task_ignoring_the_interrupt_costs_its_engine_after_the_grace_period():
    c = Core(engines=2, hwm=2, walltime_grace=3)
    c.submit("a", walltime=1)
    assert c.submit("b") == [Assign("b", 1)]
    assert c.submit("c") == [Assign("c", 0)]  # queued behind a on engine 0
    c.submit("d")  # queued behind b on engine 1
    c.started("a", 0)
    assert c.tick(1.0) == [Interrupt("a", 0)]
    assert c.tick(3.99) == []
    out = c.tick(4.0)
    fail = next(x for x in out if isinstance(x, Fail))
    assert fail.task_id == "a" and fail.error == WALLTIME
    assert "ran 4.0s" in fail.message and "engine 0 was restarted" in fail.message
    assert RestartEngine(0, "its task a ignored an interrupt for 3s after its walltime") in out
    # c, queued behind a, is not lost: back in the queue (engine 1 is full), no retry used.
    assert c.state("c") == "ready" and c.s.engines == {1: 2}
    assert c.done("b", 1) == [Deliver("b"), Assign("c", 1)]
    assert c.done("c", 1) == [Deliver("c")]
    assert c.done("a", 0, ok=False) == []  # the old engine's late word is stale


def test_walltime_failure_with_retries_runs_again_on_another_engine():
    c = Core(engines=2)
    assert c.submit("a", walltime=1, retries=1) == [Assign("a", 0)]
    c.started("a", 0)
    c.tick(1.0)
    c.now = 1.1
    assert c.done("a", 0, ok=False) == [Assign("a", 1)]  # a retry, elsewhere
    assert c.s.next_deadline() is None  # the new attempt has not reported its start
    c.now = 2.0
    c.started("a", 1)
    assert c.tick(3.0) == [Interrupt("a", 1)]  # its clock restarted with the attempt
    c.now = 3.5
    (fail,) = c.done("a", 1, ok=False)
    assert fail.error == WALLTIME and "ran 1.5s" in fail.message  # the last attempt's error


def test_restart_with_retries_left_retries_the_task():
    c = Core(engines=2, walltime_grace=1)
    c.submit("a", walltime=1, retries=2)
    c.started("a", 0)
    c.tick(1.0)
    out = c.tick(2.0)
    assert [type(x) for x in out] == [RestartEngine, Assign]
    assert out[1] == Assign("a", 1) and c.state("a") == "assigned"
    assert "retrying (1 left)" in c.s.story("a")[-2][3]


def test_engine_dying_after_the_interrupt_is_a_walltime_failure():
    c = Core(engines=1)
    c.submit("a", walltime=1)
    c.started("a", 0)
    c.tick(1.0)
    c.now = 1.5
    (fail,) = c.remove(0, "killed by SIGKILL")
    assert fail.error == WALLTIME and "then its engine 0 died (killed by SIGKILL)" in fail.message


def test_a_late_start_report_or_one_for_another_engine_is_ignored():
    c = Core(engines=2)
    c.submit("a", walltime=1)
    assert c.started("a", 1) == []  # not on engine 1
    assert c.s.next_deadline() is None
    c.done("a", 0)
    assert c.started("a", 0) == []  # already done
    assert c.s.next_deadline() is None


def test_negative_walltime_raises_and_zero_is_no_limit():
    c = Core(engines=1)
    with pytest.raises(ValueError, match="negative walltime"):
        c.submit("a", walltime=-1)
    assert c.state("a") is None
    assert c.submit("b", walltime=0) == [Assign("b", 0)]
    c.started("b", 0)
    assert c.s.next_deadline() is None
    with pytest.raises(ValueError, match="grace"):
        Scheduler(walltime_grace=-1)


# -- property: the rule holds for any timing ------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    walltime=st.floats(0.1, 5),
    grace=st.floats(0, 3),
    delay=st.floats(0, 3),  # from assignment to the start report
    runtime=st.floats(0, 12),  # how long the attempt runs (None-like when past the kill)
    obeys=st.booleans(),  # does it stop when interrupted?
    hwm=st.integers(1, 3),
    retries=st.integers(0, 1),
)
def test_property_interrupt_and_restart_happen_exactly_when_the_rule_says(
        walltime, grace, delay, runtime, obeys, hwm, retries):
    s = Scheduler(hwm=hwm, walltime_grace=grace, validate=True)
    s.handle(TaskSubmitted("a", 0.0, retries=retries, walltime=walltime))
    behind = [f"q{i}" for i in range(hwm - 1)]
    for q in behind:
        s.handle(TaskSubmitted(q, 0.0))
    assert s.handle(EngineAdded(0, 0.0))[0] == Assign("a", 0)
    start = delay
    s.handle(TaskStarted("a", 0, start))
    due_int, due_kill = start + walltime, start + walltime + grace
    # The attempt ends at start + runtime, or right after the interrupt if it obeys.
    end = start + runtime
    if obeys and end >= due_int:
        end = due_int + 0.01
    seen: list = []
    t = start
    while True:
        nxt = s.next_deadline()
        if nxt is None or nxt > end:
            break
        t = nxt
        seen.extend(s.handle(Tick(t)))
    interrupts = [c for c in seen if isinstance(c, Interrupt)]
    restarts = [c for c in seen if isinstance(c, RestartEngine)]
    # Interrupt iff still running at start + walltime, once, for that task on that engine
    # (a timer due at the time of an event fires before the event: an end at the very
    # deadline comes too late).
    assert interrupts == ([Interrupt("a", 0)] if end >= due_int else [])
    assert restarts == ([RestartEngine(0, restarts[0].reason)] if end >= due_kill else [])
    if restarts:
        # Queued tasks are not lost: back in the queue (no engine left to take them).
        assert all(s.task_state(q) == "ready" for q in behind)
        expect = "ready" if retries else "failed"
        assert s.task_state("a") == expect
        fails = [c for c in seen if isinstance(c, Fail)]
        assert [f.error for f in fails] == ([] if retries else [WALLTIME])
        return
    out = s.handle(TaskDone("a", 0, not (obeys and end >= due_int), end))
    if end >= due_int and obeys:  # interrupted, ended with KeyboardInterrupt
        if retries:  # a second attempt (engine 0 again: the only one), its clock not started
            assert s.task_state("a") == "assigned" and Assign("a", 0) in out
        else:
            assert [c.error for c in out if isinstance(c, Fail)] == [WALLTIME]
    else:
        assert Deliver("a") in out
    assert s.next_deadline() is None  # the attempt's timers died with it


def test_zero_grace_interrupts_and_restarts_in_the_same_event():
    c = Core(engines=1, walltime_grace=0)
    c.submit("a", walltime=1)
    c.started("a", 0)
    out = c.tick(1.0)
    assert [type(x) for x in out] == [Interrupt, Fail, RestartEngine], out
    assert out[1].error == WALLTIME and c.s.engines == {}


def test_a_start_report_for_a_task_queued_behind_is_ignored():
    c = Core(engines=1, hwm=2)
    c.submit("a")
    c.submit("b", walltime=1)  # queued behind a on engine 0
    assert c.started("b", 0) == []  # an engine runs its tasks in order: a runs, not b
    assert c.s.next_deadline() is None
    c.done("a", 0)
    c.started("b", 0)
    assert c.s.next_deadline() == 1.0
