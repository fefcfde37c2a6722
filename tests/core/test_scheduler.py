"""Unit tests of the scheduler core, one rule at a time, on the returned commands."""

from __future__ import annotations

import pytest
from corekit import Core, dep
from ipylb.core.events import (
    ABORTED,
    ENGINE_ERROR,
    IMPOSSIBLE,
    INVALID,
    TIMEOUT,
    Assign,
    Cancel,
    Deliver,
    EngineAdded,
    EngineRemoved,
    Fail,
    TaskDone,
    TaskSubmitted,
    Tick,
)
from ipylb.core.scheduler import Scheduler


def fail_of(cmds, tid):
    (f,) = [c for c in cmds if isinstance(c, Fail) and c.task_id == tid]
    return f


# --------------------------------------------------------------------------- construction


def test_unknown_scheme_and_pure_are_value_errors():
    with pytest.raises(ValueError, match="unknown scheme"):
        Scheduler(scheme="nope")
    with pytest.raises(ValueError):
        Scheduler(scheme="pure")
    with pytest.raises(ValueError, match="hwm"):
        Scheduler(hwm=-1)


def test_non_events_are_type_errors():
    with pytest.raises(TypeError):
        Scheduler().handle("hello")


# --------------------------------------------------------------------------- plain tasks


def test_plain_task_is_assigned_then_delivered():
    c = Core()
    assert c.submit("a") == [Assign("a", 0)]
    assert c.state("a") == "assigned"
    assert c.done("a", 0) == [Deliver("a")]
    assert c.state("a") == "done"


def test_failed_task_without_retries_is_delivered():
    c = Core()
    c.submit("a")
    assert c.done("a", 0, ok=False) == [Deliver("a")]
    assert c.state("a") == "done"


def test_tasks_wait_for_a_free_engine_and_run_oldest_first():
    c = Core(engines=1)
    assert c.submit("a") == [Assign("a", 0)]
    assert c.submit("b") == []
    assert c.submit("c") == []
    assert c.state("b") == "ready"
    assert c.s.queue_status()["unassigned"] == 2
    assert c.done("a", 0) == [Deliver("a"), Assign("b", 0)]
    assert c.done("b", 0) == [Deliver("b"), Assign("c", 0)]


def test_engine_of_names_the_engine_while_assigned_only():
    c = Core(engines=1)
    c.submit("a")
    c.submit("b")
    assert (c.s.engine_of("a"), c.s.engine_of("b"), c.s.engine_of("nope")) == (0, None, None)
    c.done("a", 0)
    assert (c.s.engine_of("a"), c.s.engine_of("b")) == (None, 0)
    c.remove(0)
    assert c.s.engine_of("b") is None


def test_tasks_submitted_before_any_engine_run_when_one_registers():
    c = Core(engines=0, hwm=2)
    for t in "abc":
        assert c.submit(t) == []
    # an engine can receive several tasks in one call
    assert c.add(7) == [Assign("a", 7), Assign("b", 7)]
    assert c.done("a", 7) == [Deliver("a"), Assign("c", 7)]


def test_duplicate_submission_raises_and_changes_nothing():
    c = Core()
    c.submit("a")
    with pytest.raises(ValueError, match="already submitted"):
        c.submit("a")
    assert c.state("a") == "assigned"
    assert c.done("a", 0) == [Deliver("a")]


def test_duplicate_engine_raises():
    c = Core()
    with pytest.raises(ValueError, match="already registered"):
        c.add(0)


def test_stale_results_are_ignored():
    c = Core()
    c.submit("a")
    assert c.done("a", 1) == []  # not on engine 1
    assert c.done("nope", 0) == []
    assert c.unmet("a", 1) == []
    assert c.done("a", 0) == [Deliver("a")]
    assert c.done("a", 0) == []  # already delivered


def test_negative_timeout_raises_and_changes_nothing():
    c = Core()
    with pytest.raises(ValueError, match="negative timeout"):
        c.submit("a", timeout=-1)
    assert c.state("a") is None
    assert c.s.queue_status()["unassigned"] == 0


# --------------------------------------------------------------------------- schemes


def test_leastload_with_hwm1_goes_round_robin_by_lru():
    c = Core(engines=3)
    assert [c.run(t) for t in "abc"] == [0, 1, 2]
    for t, e in zip("abc", (0, 1, 2), strict=True):
        c.done(t, e)
    assert [c.run(t) for t in "def"] == [0, 1, 2]


def test_lru_counts_assignments_not_completions():
    c = Core(engines=2, scheme="lru")
    assert c.run("a") == 0
    assert c.run("b") == 1
    c.done("b", 1)
    c.done("a", 0)
    assert c.run("c") == 0  # engine 0 got its task longest ago


def test_new_engine_counts_as_least_recently_used():
    c = Core(engines=2)
    c.run("a")
    c.done("a", 0)
    c.add(5)
    assert c.run("b") == 1  # never used, registered first
    assert c.run("c") == 5
    assert c.run("d") == 0


def test_leastload_with_no_hwm_picks_the_engine_with_fewest_outstanding():
    c = Core(engines=3, hwm=0)
    engines = [c.run(t) for t in "abcdef"]
    assert engines == [0, 1, 2, 0, 1, 2]
    c.done("b", 1)
    c.done("e", 1)
    assert c.run("g") == 1
    assert c.s.engines == {0: 2, 1: 1, 2: 2}


@pytest.mark.parametrize("scheme", ["lru", "plainrandom", "twobin", "leastload", "weighted"])
def test_every_scheme_respects_follow_and_hwm(scheme):
    c = Core(engines=4, scheme=scheme, hwm=2, seed=5)
    where = c.run("a")
    c.done("a", where)
    for i in range(6):
        cmds = c.submit(f"f{i}", follow="a")
        assert all(x.engine_id == where for x in cmds if isinstance(x, Assign))
    assert c.s.engines[where] == 2  # hwm
    assert c.s.queue_status()["unassigned"] == 4


@pytest.mark.parametrize("scheme", ["plainrandom", "twobin", "weighted"])
def test_random_schemes_are_reproducible_from_the_seed(scheme):
    def run(seed):
        c = Core(engines=5, scheme=scheme, hwm=0, seed=seed)
        return [c.run(f"t{i}") for i in range(30)]

    assert run(11) == run(11)
    assert len(set(run(11))) > 1


# --------------------------------------------------------------------------- hwm, queue_status


def test_hwm_queues_behind_the_running_task():
    c = Core(engines=1, hwm=2)
    assert c.submit("a") == [Assign("a", 0)]
    assert c.submit("b") == [Assign("b", 0)]
    assert c.submit("c") == []
    assert c.s.queue_status() == {0: {"queue": 1, "completed": 0, "tasks": 1}, "unassigned": 1}
    assert c.done("a", 0) == [Deliver("a"), Assign("c", 0)]
    assert c.s.queue_status() == {0: {"queue": 1, "completed": 1, "tasks": 1}, "unassigned": 0}


def test_queue_status_counts_waiting_tasks_as_unassigned():
    c = Core(engines=2)
    c.submit("a")
    c.submit("b", after="a")
    assert c.s.queue_status() == {
        0: {"queue": 0, "completed": 0, "tasks": 1},
        1: {"queue": 0, "completed": 0, "tasks": 0},
        "unassigned": 1,
    }


# --------------------------------------------------------------------------- after


def test_after_waits_for_its_dependency_then_runs():
    c = Core()
    c.submit("a")
    assert c.submit("b", after="a") == []
    assert c.state("b") == "waiting"
    # the freed engine goes to the oldest ready task: b
    assert c.done("a", 0) == [Deliver("a"), Assign("b", 0)]


def test_finished_dependencies_count_at_once():
    c = Core()
    c.submit("a")
    c.done("a", 0)
    assert c.submit("b", after="a") == [Assign("b", 1)]


def test_after_all_waits_for_every_dependency():
    c = Core(engines=3)
    c.run("a")
    c.run("b")
    assert c.submit("c", after=["a", "b"]) == []
    assert c.done("a", 0) == [Deliver("a")]
    assert c.done("b", 1) == [Deliver("b"), Assign("c", 1)]


def test_after_any_runs_after_the_first_success():
    c = Core(engines=3)
    c.run("a")
    c.run("b")
    assert c.submit("c", after=dep("a", "b", all=False)) == []
    assert c.done("b", 1) == [Deliver("b"), Assign("c", 1)]


def test_after_any_waits_while_some_dependency_may_still_succeed():
    c = Core(engines=3)
    c.run("a")
    c.run("b")
    c.submit("c", after=dep("a", "b", all=False))
    assert c.done("a", 0, ok=False) == [Deliver("a")]
    assert c.state("c") == "waiting"
    assert c.done("b", 1) == [Deliver("b"), Assign("c", 1)]


def test_after_failure_only_runs_cleanup_when_the_dependency_failed():
    c = Core()
    c.run("a")
    c.submit("cleanup", after=dep("a", success=False, failure=True))
    assert c.done("a", 0, ok=False) == [Deliver("a"), Assign("cleanup", 0)]


def test_after_success_and_failure_runs_either_way():
    c = Core(engines=3)
    c.run("a")
    c.run("b")
    c.submit("c", after=dep("a", "b", success=True, failure=True))
    c.done("a", 0, ok=False)
    assert c.done("b", 1) == [Deliver("b"), Assign("c", 1)]


def test_unknown_dependency_is_invalid_and_names_the_ids():
    c = Core()
    c.run("a")
    (f,) = c.submit("b", after=["a", "ghost", "phantom"])
    assert f.error == INVALID and f.task_id == "b"
    assert "ghost" in f.message and "phantom" in f.message and "a," not in f.message
    assert c.state("b") == "failed"
    # the failed task is known: a later task on it sees a failed dependency
    (g,) = c.submit("c", after="b")
    assert g.error == IMPOSSIBLE


def test_a_task_cannot_depend_on_itself():
    c = Core()
    (f,) = c.submit("a", after="a")
    assert f.error == INVALID


def test_empty_dependencies_are_no_dependencies():
    c = Core()
    assert c.submit("a", after=[], follow=[]) == [Assign("a", 0)]


# --------------------------------------------------------------------------- impossible


def test_after_all_success_fails_when_a_dependency_failed():
    c = Core()
    c.run("a")
    c.submit("b", after="a")
    cmds = c.done("a", 0, ok=False)
    assert cmds[0] == Deliver("a")
    f = fail_of(cmds, "b")
    assert f.error == IMPOSSIBLE
    assert f.message.startswith("task b cannot run: its after dependency a failed on engine 0")
    assert "all=True, success=True, failure=False" in f.message


def test_impossible_is_detected_at_submission():
    c = Core()
    c.run("a")
    c.done("a", 0, ok=False)
    (f,) = c.submit("b", after="a")
    assert f.error == IMPOSSIBLE and "a failed" in f.message


def test_after_any_fails_only_when_every_dependency_failed():
    c = Core(engines=3)
    c.run("a")
    c.run("b")
    c.submit("c", after=dep("a", "b", all=False))
    assert c.done("a", 0, ok=False) == [Deliver("a")]
    cmds = c.done("b", 1, ok=False)
    f = fail_of(cmds, "c")
    assert f.error == IMPOSSIBLE
    assert "none of its after dependencies did succeed" in f.message


def test_failure_only_dependency_is_impossible_once_it_succeeded():
    c = Core()
    c.run("a")
    c.submit("b", after=dep("a", success=False, failure=True))
    f = fail_of(c.done("a", 0), "b")
    assert f.error == IMPOSSIBLE and "a succeeded on engine 0" in f.message
    assert "needs every one to fail" in f.message


def test_success_and_failure_dependency_is_never_impossible():
    c = Core()
    c.run("a")
    c.submit("b", after=dep("a", success=True, failure=True))
    assert c.done("a", 0, ok=False) == [Deliver("a"), Assign("b", 0)]


def test_impossibility_cascades_down_a_chain_in_one_call():
    c = Core()
    c.run("A")
    c.submit("B", after="A")
    c.submit("C", after="B")
    c.submit("D", after=dep("C", success=False, failure=True))  # cleanup: runs
    cmds = c.done("A", 0, ok=False)
    assert [type(x).__name__ for x in cmds] == ["Deliver", "Fail", "Fail", "Assign"]
    fb, fc = fail_of(cmds, "B"), fail_of(cmds, "C")
    assert fb.error == fc.error == IMPOSSIBLE
    assert fc.message.startswith(
        "task C cannot run: its after dependency B failed "
        "(B was impossible because its after dependency A failed on engine 0)"
    )
    assert cmds[-1] == Assign("D", 0)


def test_a_very_long_cascade_neither_recurses_nor_grows_messages_without_bound():
    c = Core(validate=False)
    c.run("t0")
    n = 3000
    for i in range(1, n):
        c.submit(f"t{i}", after=f"t{i - 1}")
    cmds = c.done("t0", 0, ok=False)
    fails = [x for x in cmds if isinstance(x, Fail)]
    assert len(fails) == n - 1
    assert all(f.error == IMPOSSIBLE for f in fails)
    last = fails[-1].message
    assert len(last) < 2000
    assert "t0 failed on engine 0" in last  # the root cause survives
    assert f"t{n - 2}" in last


def test_scheduler_failed_tasks_count_as_failed_dependencies():
    c = Core()
    c.run("a")
    c.submit("b", after="a")  # waiting
    c.submit("cleanup", after=dep("b", success=False, failure=True))
    cmds = c.abort("b")
    assert fail_of(cmds, "b").error == ABORTED
    assert Assign("cleanup", 1) in cmds


# --------------------------------------------------------------------------- follow


def test_follow_runs_where_its_dependency_ran_even_if_busy():
    c = Core()
    c.run("a")  # engine 0
    c.done("a", 0)
    c.run("x")  # engine 1 (never used: least recently used)
    c.run("y")  # engine 0 now busy
    assert c.submit("f", follow="a") == []
    assert c.state("f") == "ready"
    assert c.done("x", 1) == [Deliver("x")]  # engine 1 is free but not eligible
    assert c.done("y", 0) == [Deliver("y"), Assign("f", 0)]


def test_follow_is_also_a_when():
    c = Core()
    c.run("a")
    assert c.submit("f", follow="a") == []
    assert c.state("f") == "waiting"
    assert c.done("a", 0) == [Deliver("a"), Assign("f", 0)]


def test_follow_all_on_two_engines_is_impossible():
    c = Core()
    c.run("a")
    c.run("b")
    c.submit("f", follow=["a", "b"])
    c.done("a", 0)
    f = fail_of(c.done("b", 1), "f")
    assert f.error == IMPOSSIBLE
    assert "ran on different engines" in f.message
    assert "a on engine 0" in f.message and "b on engine 1" in f.message


def test_follow_all_on_one_engine_runs_there():
    c = Core()
    c.run("a")
    c.done("a", 0)
    c.run("x")  # engine 1
    c.run("b")  # engine 0
    c.done("b", 0)
    assert c.submit("f", follow=["a", "b"]) == [Assign("f", 0)]


def test_follow_any_runs_on_any_engine_where_a_dependency_ran():
    c = Core(engines=3)
    c.run("a")  # 0
    c.run("b")  # 1
    c.run("x")  # 2
    c.done("b", 1)
    assert c.submit("f", follow=dep("a", "b", all=False)) == [Assign("f", 1)]


def test_follow_any_ready_task_gains_an_engine_when_another_dependency_lands():
    c = Core(engines=3)
    c.run("a")  # 0
    c.run("b")  # 1
    c.run("x")  # 2
    c.done("a", 0)
    c.run("y")  # 0 busy again
    assert c.submit("f", follow=dep("a", "b", all=False)) == []
    assert c.state("f") == "ready"
    assert c.done("b", 1) == [Deliver("b"), Assign("f", 1)]


def test_follow_of_a_task_failed_by_the_scheduler_is_impossible():
    c = Core()
    c.run("a")
    c.submit("b", after="a")
    c.submit("f", follow=dep("b", success=False, failure=True))
    cmds = c.abort("b")
    f = fail_of(cmds, "f")
    assert f.error == IMPOSSIBLE and "without running on an engine" in f.message


def test_follow_failure_runs_where_the_dependency_failed():
    c = Core()
    c.run("a")
    c.submit("f", follow=dep("a", success=False, failure=True))
    assert c.done("a", 0, ok=False) == [Deliver("a"), Assign("f", 0)]


def test_follow_to_a_dead_engine_is_impossible_at_removal():
    c = Core()
    c.run("a")
    c.done("a", 0)
    c.run("x")  # 1
    c.run("y")  # 0
    c.submit("f", follow="a")
    c.submit("g", after="f")
    cmds = c.remove(0)
    assert fail_of(cmds, "y").error == ENGINE_ERROR
    f = fail_of(cmds, "f")
    assert f.error == IMPOSSIBLE and "engine 0, which is gone" in f.message
    assert fail_of(cmds, "g").error == IMPOSSIBLE  # cascade


def test_follow_to_a_dead_engine_is_impossible_at_submission():
    c = Core()
    c.run("a")
    c.done("a", 0)
    c.remove(0)
    (f,) = c.submit("f", follow="a")
    assert f.error == IMPOSSIBLE and "gone" in f.message


def test_waiting_follow_all_fails_as_soon_as_its_pinned_engine_dies():
    c = Core(engines=3)
    c.run("a")  # 0
    c.run("b")  # 1
    c.done("a", 0)
    c.submit("f", follow=["a", "b"])  # b still running
    cmds = c.remove(0)
    assert fail_of(cmds, "f").error == IMPOSSIBLE


def test_follow_any_waits_while_a_pending_dependency_may_still_land_on_a_live_engine():
    c = Core(engines=3)
    c.run("a")  # 0
    c.run("b")  # 1
    c.run("x")  # 2
    c.done("a", 0)
    c.run("y")  # 0 busy again
    c.submit("f", follow=dep("a", "b", all=False))
    assert c.state("f") == "ready"  # a counts, on engine 0, which is busy
    cmds = c.remove(0)
    assert [x.task_id for x in cmds] == ["y"]  # f is not impossible: b may run on 1
    assert c.state("f") == "ready"
    assert c.done("b", 1) == [Deliver("b"), Assign("f", 1)]


def test_follow_any_counts_dependencies_finishing_after_it_was_assigned():
    c = Core(engines=1, hwm=3)
    c.run("a")
    c.run("b")
    c.run("c")
    c.submit("f", follow=dep("a", "b", all=False))
    assert c.done("a", 0) == [Deliver("a"), Assign("f", 0)]  # queue: b, c, f
    c.done("b", 0)  # f is assigned, but must still learn where b ran
    cmds = c.remove(0)  # c was running; f was queued behind and comes back
    assert fail_of(cmds, "c").error == ENGINE_ERROR
    f = fail_of(cmds, "f")
    assert f.error == IMPOSSIBLE and "unavailable" in f.message


def test_follow_any_whose_only_located_engine_is_gone_keeps_waiting():
    c = Core(engines=2)
    c.run("a")  # 0
    c.run("b")  # 1
    c.done("a", 0)
    c.remove(0)
    assert c.submit("f", follow=dep("a", "b", all=False)) == []
    assert c.state("f") == "waiting"  # not ready: nowhere to run until b lands
    assert c.done("b", 1) == [Deliver("b"), Assign("f", 1)]


def test_follow_any_all_engines_gone_is_impossible():
    c = Core(engines=3)
    c.run("a")  # 0
    c.run("b")  # 1
    c.run("x")  # 2
    c.done("a", 0)
    c.run("y")  # 0 busy
    c.submit("f", follow=dep("a", "b", all=False))
    assert c.state("f") == "ready"  # a counts on 0, which is busy
    assert c.remove(0)[0] == Fail("y", ENGINE_ERROR, "task y was running on engine 0 when the engine "
                                  "died: killed by signal 9", 0)
    assert c.state("f") == "ready"  # b may still land on a live engine
    cmds = c.remove(1)
    f = fail_of(cmds, "f")
    assert f.error == IMPOSSIBLE  # b failed by the scheduler: ran nowhere; a's engine gone


# --------------------------------------------------------------------------- timeout


def test_timeout_fails_a_task_still_waiting_at_its_deadline():
    c = Core()
    c.run("a")
    c.submit("b", after="a", timeout=2.5)
    assert c.s.next_deadline() == 2.5
    assert c.tick(2.4) == []
    (f,) = c.tick(2.5)
    assert f.task_id == "b" and f.error == TIMEOUT
    assert "waited 2.5s (timeout 2.5s)" in f.message
    assert "after dependencies (a unfinished)" in f.message
    assert c.s.next_deadline() is None
    assert c.done("a", 0) == [Deliver("a")]  # nothing left to run


def test_timeout_of_a_task_waiting_for_a_free_engine():
    c = Core(engines=1)
    c.run("a")
    c.submit("b", timeout=1)
    (f,) = c.tick(3)
    assert f.error == TIMEOUT and "a free engine" in f.message and "waited 3s" in f.message


def test_timeout_never_limits_execution():
    c = Core()
    c.submit("a", timeout=1)
    assert c.state("a") == "assigned"
    assert c.s.next_deadline() is None  # the entry is stale: lazily dropped
    assert c.tick(100) == []
    assert c.done("a", 0) == [Deliver("a")]


def test_deadlines_expire_at_the_start_of_any_event():
    c = Core()
    c.run("a")
    c.submit("b", after="a", timeout=1)
    c.now = 5  # the shell's Tick was late: the next event still expires it first
    cmds = c.done("a", 0)
    assert cmds[0].error == TIMEOUT and cmds[0].task_id == "b"
    assert cmds[1:] == [Deliver("a")]


def test_next_deadline_is_the_earliest_live_one():
    c = Core(engines=0)
    c.submit("a", timeout=5)
    c.submit("b", timeout=3)
    c.submit("c", timeout=4)
    assert c.s.next_deadline() == 3
    c.abort("b")
    assert c.s.next_deadline() == 4
    assert [f.task_id for f in c.tick(4.5)] == ["c"]
    assert c.s.next_deadline() == 5


def test_zero_or_none_timeout_waits_forever():
    c = Core(engines=0)
    c.submit("a", timeout=0)
    c.submit("b", timeout=None)
    assert c.s.next_deadline() is None
    assert c.tick(1e9) == []


def test_timed_out_task_is_a_failed_dependency():
    c = Core()
    c.run("a")
    c.submit("b", after="a", timeout=1)
    c.submit("c", after="b")
    cmds = c.tick(2)
    assert [f.task_id for f in cmds] == ["b", "c"]
    assert cmds[1].error == IMPOSSIBLE and "b timed out" in cmds[1].message


def test_refused_task_keeps_its_deadline():
    c = Core()
    c.submit("a", timeout=10)  # 0
    c.run("b")  # 1
    c.now = 1
    assert c.unmet("a", 0) == []  # waits for engine 1
    assert c.s.next_deadline() == 10
    (f,) = c.tick(10)
    assert f.task_id == "a" and f.error == TIMEOUT


def test_retried_task_has_no_deadline_any_more():
    c = Core()
    c.submit("r", timeout=10, retries=1)  # 0
    c.run("y")  # 1
    c.submit("x")  # queued
    assert c.done("r", 0, ok=False) == [Assign("x", 0)]  # r prefers engine 1, busy
    assert c.state("r") == "ready"
    assert c.s.next_deadline() is None  # it ran once: the timeout no longer applies
    assert c.tick(20) == []
    assert c.done("y", 1) == [Deliver("y"), Assign("r", 1)]


# --------------------------------------------------------------------------- unmet


def test_unmet_sends_the_task_elsewhere():
    c = Core()
    c.run("a")  # 0
    assert c.unmet("a", 0) == [Assign("a", 1)]
    assert c.state("a") == "assigned"
    assert c.done("a", 1) == [Deliver("a")]


def test_refused_by_every_engine_is_impossible():
    c = Core()
    c.run("a")
    c.unmet("a", 0)
    (f,) = c.unmet("a", 1)
    assert f.error == IMPOSSIBLE
    assert f.message.startswith("task a cannot run: refused by all 2 engines (0, 1)")


def test_a_refused_task_waits_for_an_engine_that_has_not_refused_it():
    c = Core()
    c.run("a")  # 0
    c.run("b")  # 1
    assert c.unmet("a", 0) == []  # engine 0 is free but refused; engine 1 busy
    assert c.state("a") == "ready"
    assert c.submit("c") == [Assign("c", 0)]  # engine 0 takes other work
    assert c.done("b", 1) == [Deliver("b"), Assign("a", 1)]


def test_a_new_engine_is_a_fresh_candidate_for_a_refused_task():
    c = Core()
    c.run("a")  # 0
    c.run("b")  # 1
    c.unmet("a", 0)
    assert c.add(2) == [Assign("a", 2)]


def test_refusal_counts_only_registered_engines():
    c = Core(engines=1)
    c.run("a")
    assert c.unmet("a", 0)[0].error == IMPOSSIBLE  # the only engine refused
    c = Core(engines=2)
    c.run("a")
    c.unmet("a", 0)  # now on engine 1
    c.remove(1)  # a was running there: no retries -> EngineError, not impossible
    assert c.state("a") == "failed"


def test_engine_removal_can_leave_only_refusing_engines():
    c = Core(engines=3)
    c.run("a")  # 0
    c.run("b")  # 1
    c.run("c")  # 2
    c.unmet("a", 0)  # a waits: 1 and 2 busy, 0 refused
    cmds = c.remove(1)  # b dies (EngineError); 2 still a candidate
    assert [x.task_id for x in cmds] == ["b"]
    cmds = c.remove(2)
    assert fail_of(cmds, "a").error == IMPOSSIBLE
    assert "refused by all 1 engine (0)" in fail_of(cmds, "a").message


def test_the_last_refusal_is_named_in_the_failure():
    c = Core(engines=2)
    c.run("a")
    c.unmet("a", 0, "cannot import 'zmq' here")
    cmds = c.unmet("a", 1, "cannot import 'numpy' here")
    message = fail_of(cmds, "a").message
    assert "refused by all 2 engines" in message and "'numpy'" in message
    assert "'zmq'" not in message  # the last one only: they usually say the same


def test_refused_task_with_no_engine_left_waits_for_one():
    c = Core()
    c.run("a")  # 0
    c.run("b")  # 1
    assert c.unmet("b", 1) == []  # engine 0 busy
    assert c.remove(1) == []
    cmds = c.remove(0)
    assert [x.task_id for x in cmds] == ["a"]
    assert c.state("b") == "ready"  # no engine registered at all: wait for one
    assert c.add(2) == [Assign("b", 2)]


def test_follow_task_refused_by_its_only_engine_is_impossible():
    c = Core()
    c.run("a")
    c.done("a", 0)
    c.submit("f", follow="a")
    f = fail_of(c.unmet("f", 0), "f")
    assert f.error == IMPOSSIBLE and "refused by engine 0" in f.message


# --------------------------------------------------------------------------- retries


def test_failed_task_with_retries_goes_to_another_engine_without_delivery():
    c = Core()
    c.submit("a", retries=1)
    assert c.done("a", 0, ok=False) == [Assign("a", 1)]
    assert c.done("a", 1, ok=False) == [Deliver("a")]  # retries used up


def test_retry_waits_for_an_untried_engine_rather_than_a_failed_one():
    c = Core()
    c.submit("a", retries=1)  # 0
    c.run("b")  # 1
    assert c.done("a", 0, ok=False) == []  # 0 is free but was tried; 1 is busy
    assert c.done("b", 1) == [Deliver("b"), Assign("a", 1)]


def test_retries_outnumbering_engines_go_back_to_tried_engines():
    c = Core()
    c.submit("a", retries=3)
    assert c.done("a", 0, ok=False) == [Assign("a", 1)]
    # all tried: any will do, the freed engine included
    assert c.done("a", 1, ok=False) == [Assign("a", 1)]
    assert c.done("a", 1, ok=False) == [Assign("a", 1)]
    assert c.done("a", 1, ok=False) == [Deliver("a")]  # 3 retries used


def test_retry_succeeding_is_delivered():
    c = Core()
    c.submit("a", retries=2)
    c.done("a", 0, ok=False)
    assert c.done("a", 1) == [Deliver("a")]


def test_retry_waiting_for_an_untried_engine_takes_a_new_one():
    c = Core()
    c.submit("a", retries=5)  # 0
    c.run("x")  # 1
    assert c.done("a", 0, ok=False) == []  # waits for untried engine 1
    assert c.add(2) == [Assign("a", 2)]


def test_soft_exclusion_widens_when_the_untried_engines_leave():
    c = Core()
    c.submit("a", retries=5)  # 0
    c.run("x")  # 1
    c.done("a", 0, ok=False)
    cmds = c.remove(1)
    assert fail_of(cmds, "x").error == ENGINE_ERROR
    assert cmds[-1] == Assign("a", 0)  # only the engine it failed on is left


def test_retried_task_competes_for_the_freed_engine_by_age():
    c = Core(engines=1)
    c.submit("a", retries=1)
    c.submit("b")  # queued, younger than a
    assert c.done("a", 0, ok=False) == [Assign("a", 0)]


def test_engine_death_of_the_running_task_uses_a_retry():
    c = Core()
    c.submit("a", retries=1)  # 0
    assert c.remove(0) == [Assign("a", 1)]
    (f,) = c.remove(1)
    assert f == Fail("a", ENGINE_ERROR,
                     "task a was running on engine 1 when the engine died: killed by signal 9", 1)


def test_an_engine_that_leaves_between_tasks_has_its_whole_queue_requeued():
    """EngineRemoved(idle=True): the engine answered what it started and asked to be
    restarted (a task left it unfit to serve): the head of its queue never ran, so it is
    queued again like the rest, no retry used, no EngineError."""
    c = Core(engines=1, hwm=2)
    assert c.run("a") == 0
    assert c.run("b") == 0
    assert c(EngineRemoved(0, "a task used up its fds", c.now, idle=True)) == []
    assert c.state("a") == c.state("b") == "ready"
    assert c.add(1) == [Assign("a", 1), Assign("b", 1)]


def test_engine_death_requeues_tasks_queued_behind_without_using_retries():
    c = Core(engines=2, hwm=2)
    c.run("a")  # 0
    c.run("b")  # 1
    c.run("c")  # 0 (behind a)
    c.submit("d")  # 1 (behind b)
    cmds = c.remove(0)
    assert fail_of(cmds, "a").error == ENGINE_ERROR
    assert c.state("c") == "ready"  # engine 1 is full
    assert c.done("b", 1) == [Deliver("b"), Assign("c", 1)]
    # c kept its (zero) retries: its failure is delivered
    c.done("d", 1)
    assert c.done("c", 1, ok=False) == [Deliver("c")]


def test_queued_behind_task_keeps_its_retries():
    c = Core(engines=1, hwm=2)
    c.run("a")
    c.submit("b", retries=1)
    c.remove(0)
    c.add(1)
    assert c.state("b") == "assigned"
    # its one retry was not used by the death: this failure is retried
    assert c.done("b", 1, ok=False) == [Assign("b", 1)]
    assert c.done("b", 1, ok=False) == [Deliver("b")]


# --------------------------------------------------------------------------- abort


def test_abort_waiting_and_ready_tasks():
    c = Core(engines=1)
    c.run("a")
    c.submit("w", after="a")
    c.submit("r")
    assert c.abort("w") == [Fail("w", ABORTED, "task w was aborted before it ran", None)]
    assert c.abort("r") == [Fail("r", ABORTED, "task r was aborted before it ran", None)]
    assert c.done("a", 0) == [Deliver("a")]  # neither runs


def test_abort_queued_behind_cancels_on_the_engine_then_delivers_its_error():
    c = Core(engines=1, hwm=2)
    c.run("a")
    c.submit("b", retries=3)
    c.submit("d", after=dep("b", success=False, failure=True))
    c.submit("e", follow=dep("b", success=False, failure=True))
    assert c.abort("b") == [Cancel("b", 0)]
    assert c.abort("b") == []  # only once
    c.done("a", 0)
    cmds = c.done("b", 0, ok=False, skipped=True)  # the engine skipped it
    assert cmds[0] == Deliver("b")  # no retry for an aborted task
    assert Assign("d", 0) in cmds  # treated as failed
    assert fail_of(cmds, "e").error == IMPOSSIBLE  # it ran nowhere: nothing to follow
    assert c.s.queue_status()[0]["completed"] == 1  # a, not b: b never ran there


def test_a_cancel_that_comes_too_late_leaves_a_task_that_ran_and_failed_where_it_ran():
    """The Cancel crossed the task's start on the engine: it ran, and failed on its own."""
    c = Core(engines=1, hwm=2)
    c.run("a")
    c.submit("b")
    c.submit("e", follow=dep("b", success=False, failure=True))
    assert c.abort("b") == [Cancel("b", 0)]
    c.done("a", 0)
    assert c.done("b", 0, ok=False) == [Deliver("b"), Assign("e", 0)]  # it ran on engine 0
    assert c.s.queue_status()[0]["completed"] == 2


def test_abort_running_or_finished_does_nothing_but_is_logged():
    c = Core()
    c.run("a")
    c.run("b")
    c.done("b", 1)
    assert c.abort("a") == []
    assert c.abort("b") == []
    assert c.abort("unknown") == []
    assert any("already running" in str(x[3]) for x in c.s.story("a"))
    assert any("already finished" in str(x[3]) for x in c.s.story("b"))
    assert c.done("a", 0) == [Deliver("a")]


def test_aborted_task_queued_behind_a_dying_engine_fails_aborted():
    c = Core(engines=1, hwm=2)
    c.run("a")
    c.run("b")
    c.abort("b")
    cmds = c.remove(0)
    assert fail_of(cmds, "b").error == ABORTED
    assert fail_of(cmds, "a").error == ENGINE_ERROR


def test_aborted_then_refused_task_fails_aborted():
    c = Core(engines=1, hwm=2)
    c.run("a")
    c.run("b")
    c.abort("b")
    assert c.unmet("b", 0)[0].error == ABORTED


# --------------------------------------------------------------------------- forget


def test_forgotten_tasks_are_unknown():
    c = Core()
    c.run("a")
    c.done("a", 0)
    assert c.forget("a") == []
    assert c.state("a") is None
    (f,) = c.submit("b", after="a")
    assert f.error == INVALID and "a" in f.message


def test_forgetting_an_unfinished_task_is_ignored():
    c = Core()
    c.run("a")
    c.forget("a")
    assert c.state("a") == "assigned"
    assert c.done("a", 0) == [Deliver("a")]


def test_forgetting_a_finished_dependency_does_not_disturb_a_waiting_task():
    c = Core()
    c.run("a")
    c.run("b")
    c.submit("c", after=["a", "b"])
    c.done("a", 0)
    c.forget("a")
    assert c.done("b", 1) == [Deliver("b"), Assign("c", 1)]


# --------------------------------------------------------------------------- ordering


def test_freed_engine_takes_the_oldest_eligible_ready_task():
    c = Core(engines=1)
    c.run("a")
    c.submit("b")  # seq 2, ready
    c.submit("c")  # seq 3, ready
    c.submit("z", after="b")
    c.done("a", 0)  # b runs
    c.submit("d")  # seq 5
    assert c.done("b", 0) == [Deliver("b"), Assign("c", 0)]  # z became ready after c
    assert c.done("c", 0) == [Deliver("c"), Assign("z", 0)]  # z (seq 4) before d (seq 5)


def test_dependents_made_ready_wait_behind_older_ready_tasks():
    c = Core(engines=1)
    c.run("a")
    c.submit("b", after="a")
    c.submit("c")
    cmds = c.done("a", 0)
    assert cmds == [Deliver("a"), Assign("b", 0)]  # b is older than c


def test_follow_queue_and_global_queue_interleave_by_submission_order():
    c = Core(engines=2)
    c.run("a")  # 0
    c.done("a", 0)
    c.run("x")  # 1
    c.run("y")  # 0
    c.submit("p1")  # ready, global queue
    c.submit("f1", follow="a")  # ready, engine 0's queue
    c.submit("p2")
    assert c.done("y", 0) == [Deliver("y"), Assign("p1", 0)]
    assert c.done("p1", 0) == [Deliver("p1"), Assign("f1", 0)]
    assert c.done("x", 1) == [Deliver("x"), Assign("p2", 1)]


def test_deliver_and_fail_come_before_the_assignments_they_enable():
    c = Core()
    c.run("a")
    c.submit("b", after="a")
    c.submit("bad", after=dep("a", success=False, failure=True))
    cmds = c.done("a", 0)
    assert [type(x) for x in cmds] == [Deliver, Fail, Assign]
    assert cmds[2] == Assign("b", 0)


# --------------------------------------------------------------------------- introspection


def test_story_replays_one_tasks_transitions():
    c = Core()
    c.run("a")
    c.submit("b", after="a")
    c.done("a", 0)
    story = c.s.story("b")
    assert [(x[1], x[2]) for x in story] == [(None, "waiting"), ("waiting", "ready"),
                                            ("ready", "assigned")]
    assert story[-1][3] == 0  # the engine


def test_story_log_is_bounded():
    s = Scheduler(story_size=10)
    s.handle(EngineAdded(0, 0.0))
    for i in range(20):
        s.handle(TaskSubmitted(f"t{i}", 0.0))
        s.handle(TaskDone(f"t{i}", 0, True, 0.0))
    assert s.story("t0") == []
    assert len(s.story("t19")) == 2


def test_task_state_of_unknown_is_none():
    assert Scheduler().task_state("x") is None


def test_validate_catches_a_broken_invariant():
    c = Core()
    c.run("a")
    c.s._engines[0].load = 5  # corrupt it
    with pytest.raises(AssertionError, match="load"):
        c.s.validate()


def test_ticks_without_deadlines_do_nothing():
    s = Scheduler(validate=True)
    assert s.handle(Tick(1.0)) == []
    assert s.next_deadline() is None


# --------------------------------------------------------------------------- odd orders


def test_messages_list_a_few_ids_and_the_total():
    c = Core()
    ghosts = [f"g{i}" for i in range(9)]
    (f,) = c.submit("a", after=ghosts)
    assert f.error == INVALID and "g0, g1, g2, g3, g4, ... (9 in all)" in f.message


def test_a_result_out_of_fifo_order_is_accepted():
    c = Core(engines=1, hwm=2)
    c.run("a")
    c.run("b")
    c.submit("c")
    assert c.done("b", 0) == [Deliver("b"), Assign("c", 0)]  # b reported before a
    assert c.s.queue_status()[0]["queue"] == 1
    assert c.done("a", 0) == [Deliver("a")]


def test_removing_an_unknown_engine_is_ignored():
    c = Core()
    assert c.remove(42) == []
    assert c.s.engines == {0: 0, 1: 0}


def test_requeued_task_past_its_deadline_times_out():
    # The deadline bounds the wait until a task starts: one queued behind a task
    # on an engine that dies never started, so its deadline still holds.
    c = Core(engines=1, hwm=2)
    c.run("a")
    c.submit("b", timeout=1)  # assigned behind a in time
    assert c.tick(5) == []
    cmds = c.remove(0)
    assert fail_of(cmds, "a").error == ENGINE_ERROR
    assert fail_of(cmds, "b").error == TIMEOUT


def test_stale_entries_of_aborted_tasks_are_skipped():
    c = Core(engines=1)
    c.run("a")
    c.submit("q", after="a")
    c.submit("d", after=dep("q", success=False, failure=True))
    c.submit("p")  # queued
    cmds = c.abort("q")
    assert [x.task_id for x in cmds] == ["q"]
    assert c.state("d") == "ready"  # ready after p was queued, but older: queued apart
    c.abort("d")
    assert c.done("a", 0) == [Deliver("a"), Assign("p", 0)]


def test_tasks_freed_by_an_expiry_go_before_the_event_that_noticed_it():
    c = Core()
    c.run("a")  # 0
    c.run("x")  # 1
    c.done("a", 0)  # engine 0 idle
    c.run("y")  # 0 busy
    c.submit("t", after="x", timeout=1)
    c.submit("d", after=dep("t", success=False, failure=True))
    c.done("y", 0)  # engine 0 idle again
    c.now = 2  # t's deadline passed with no Tick; the next event is a submission
    cmds = c.submit("p")
    assert [type(x) for x in cmds] == [Fail, Assign]
    assert cmds[1] == Assign("d", 0)  # d (older, ready through t's expiry) first
    assert c.state("p") == "ready"
