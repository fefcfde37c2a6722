"""targets: a task runs only on the engines it names (ipyparallel's load-balanced view
over a subset of engines), with follow, retries and refusals choosing among them."""

from __future__ import annotations

from corekit import Core, dep
from ipylb.core.events import IMPOSSIBLE, Assign, Deliver, Fail


def test_targets_restrict_placement_even_when_others_are_free():
    c = Core(engines=3)
    assert c.submit("a", targets=[2]) == [Assign("a", 2)]
    assert c.submit("b", targets=[2]) == []  # engines 0 and 1 are free, but not allowed
    assert c.run("plain") in (0, 1)
    assert c.done("a", 2) == [Deliver("a"), Assign("b", 2)]


def test_a_task_takes_any_free_engine_among_its_targets():
    c = Core(engines=3)
    assert c.submit("a", targets=[0, 2]) == [Assign("a", 0)]
    assert c.submit("b", targets=[0, 2]) == [Assign("b", 2)]


def test_no_registered_target_fails_at_once():
    c = Core(engines=2)
    (cmd,) = c.submit("a", targets=[7, 9])
    assert isinstance(cmd, Fail) and cmd.error == IMPOSSIBLE
    assert "targets 7, 9" in cmd.message and "never reused" in cmd.message


def test_losing_the_last_target_fails_waiting_and_queued_tasks():
    c = Core(engines=2)
    assert c.run("x") == 0
    c.submit("w", after="x", targets=[1])  # waiting for x
    assert c.submit("r", targets=[0]) == []  # ready, queued behind x on engine 0
    cmds = c.remove(1)
    assert [(f.task_id, f.error) for f in cmds] == [("w", IMPOSSIBLE)]
    cmds = c.remove(0)  # x dies with it (no retries); r has no target left
    assert {(f.task_id, f.error) for f in cmds} == {("x", "EngineError"), ("r", IMPOSSIBLE)}
    assert "is registered any more" in [f for f in cmds if f.task_id == "r"][0].message


def test_follow_outside_the_targets_is_impossible():
    c = Core(engines=2)
    assert c.run("a") == 0
    c.done("a", 0)
    (cmd,) = c.submit("b", follow="a", targets=[1])
    assert cmd.error == IMPOSSIBLE and "engine 0, which is not among its targets (1)" in cmd.message
    # the same when the follow dependency finishes later
    assert c.run("p") == 1  # LRU: engine 1
    assert c.submit("q", follow="p", targets=[0]) == []
    cmds = c.done("p", 1)
    assert cmds[0] == Deliver("p") and cmds[1].task_id == "q" and cmds[1].error == IMPOSSIBLE


def test_follow_any_chooses_among_the_targets():
    c = Core(engines=3)
    assert c.run("a") == 0
    assert c.run("b") == 1
    c.done("a", 0)
    c.done("b", 1)
    assert c.submit("f", follow=dep("a", "b", all=False), targets=[1, 2]) == [Assign("f", 1)]
    (cmd,) = c.submit("g", follow=dep("a", "b", all=False), targets=[2])
    assert cmd.error == IMPOSSIBLE and "not among its targets (2)" in cmd.message


def test_retries_stay_within_the_targets():
    c = Core(engines=3)
    assert c.submit("t", targets=[1, 2], retries=3) == [Assign("t", 1)]
    assert c.done("t", 1, ok=False) == [Assign("t", 2)]  # an untried target first
    # every target tried: any target will do (here the one just freed), never engine 0
    assert c.done("t", 2, ok=False) == [Assign("t", 2)]
    assert c.remove(2) == [Assign("t", 1)]  # died while running: retried on the other
    assert c.done("t", 1) == [Deliver("t")]


def test_refused_by_every_target_is_impossible_though_other_engines_exist():
    c = Core(engines=3)
    assert c.submit("t", targets=[0, 1]) == [Assign("t", 0)]
    assert c.unmet("t", 0, "no numpy") == [Assign("t", 1)]
    (cmd,) = c.unmet("t", 1, "no numpy")
    assert cmd.error == IMPOSSIBLE and "refused by every engine it may run on" in cmd.message
    assert "no numpy" in cmd.message


def test_a_target_that_registers_later_takes_the_task():
    c = Core(engines=1)
    assert c.run("x") == 0
    assert c.submit("t", targets=[0, 1]) == []  # engine 0 busy, engine 1 not there yet
    assert c.add(1) == [Assign("t", 1)]
