"""The core's cost per event does not grow with engines or queued tasks, asserted by
structure rather than by timing: the number of Python lines and calls an event runs
(``sys.settrace``) is the same whether the scheduler holds a few engines or a thousand,
a few queued tasks or tens of thousands.  Work done in C (dict probes, ``heapq``) is
not counted: it is O(1) or O(log n) by construction, which the lines around it show.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ipylb.core.events import DepSpec, EngineAdded, TaskDone, TaskSubmitted
from ipylb.core.scheduler import Scheduler


def steps(fn: Callable[[], Any]) -> int:
    """Python lines plus calls executed by ``fn()`` (its own frame excluded)."""
    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def core_with(engines: int, hwm: int = 1, scheme: str = "leastload") -> Scheduler:
    s = Scheduler(scheme=scheme, hwm=hwm, seed=0)
    for e in range(engines):
        s.handle(EngineAdded(e, 0.0))
    return s


def test_registering_an_engine_does_not_walk_the_engines_already_there():
    few, many = core_with(10), core_with(1000)
    for s in (few, many):  # some used, some not: the LRU order has both kinds
        for i in range(5):
            s.handle(TaskSubmitted(f"t{i}", 0.0))
    cost = [steps(lambda s=s, n=n: s.handle(EngineAdded(n, 0.0))) for s, n in ((few, 10), (many, 1000))]
    assert cost[0] == cost[1]
    # the newcomer still counts as least recently used: after the engines never used (5-9),
    # before those that ran a task (0-4)
    got = [few.handle(TaskSubmitted(f"n{i}", 0.0))[0].engine_id for i in range(6)]
    assert got == [5, 6, 7, 8, 9, 10]


def pair_steps(s: Scheduler, tag: str, busy_engine: int) -> int:
    """Lines run by one plain submission then one completion on a cluster whose engines are
    all busy: the submission is queued, the completion hands the engine the oldest task."""
    running = next(iter(s._engines[busy_engine].queue)).id  # the task it runs now

    def pair() -> None:
        s.handle(TaskSubmitted(tag, 0.0))
        s.handle(TaskDone(running, busy_engine, True, 0.0))

    return steps(pair)


def test_a_queued_submission_and_a_completion_cost_the_same_at_any_queue_length():
    costs = []
    for queued in (10, 20_000):
        s = core_with(4)
        for i in range(4 + queued):  # 4 running, the rest queued
            s.handle(TaskSubmitted(f"q{i}", 0.0))
        assert s.queue_status()["unassigned"] == queued
        costs.append(pair_steps(s, "probe", 0))
    assert costs[0] == costs[1]


def test_dependent_tasks_cost_the_same_at_any_queue_length():
    """A task after two others, submitted and then released by their completions, runs as
    many lines whether 10 or 20,000 other tasks wait."""
    costs = []
    for queued in (10, 20_000):
        s = core_with(2)
        s.handle(TaskSubmitted("a", 0.0))
        s.handle(TaskSubmitted("b", 0.0))
        for i in range(queued):
            s.handle(TaskSubmitted(f"q{i}", 0.0))

        def chain(s: Scheduler = s) -> None:
            s.handle(TaskSubmitted("c", 0.0, after=DepSpec(frozenset({"a", "b"}))))
            s.handle(TaskDone("a", 0, True, 0.0))
            s.handle(TaskDone("b", 1, True, 0.0))

        costs.append(steps(chain))
        assert s.task_state("c") == "ready"  # queued behind the older tasks, in order
    assert costs[0] == costs[1]


def test_pairs_with_free_engines_cost_the_same_with_4_or_1000_engines():
    """Submission to a free engine, then its completion, over many pairs (the free-engine
    heap's periodic rebuild is amortized over them): within 10% between 4 and 1,000."""
    per_pair = []
    n = 3000
    for engines in (4, 1000):
        s = core_with(engines)

        def pairs(s: Scheduler = s) -> None:
            for i in range(n):
                a = s.handle(TaskSubmitted(f"p{i}", 0.0))[0]
                s.handle(TaskDone(a.task_id, a.engine_id, True, 0.0))

        per_pair.append(steps(pairs) / n)
    assert per_pair[1] <= 1.1 * per_pair[0], per_pair


def test_a_queued_task_keeps_under_300_bytes():
    """Memory per queued task is what grows a million-task queue's per-event cost (page
    faults, cache misses: issue 14 item 5): the DAG of ``ipylb bench --core`` (half the
    tasks after one or two others) keeps 283 bytes a task on CPython 3.11 (358 before the
    records were slimmed: Extra's rare fields split off, Task 8 slots, 1-tuple dependents)."""
    import gc
    import tracemalloc

    from ipylb.bench.core_micro import _workload

    n = 20_000
    subs = _workload(n, 0)
    s = Scheduler(story_size=1000)  # the story log is bounded apart: not the queue's cost
    for e in range(4):
        s.handle(EngineAdded(e, 0.0))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for ev in subs:
            s.handle(ev)
        per_task = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert s.task_state(f"t{n - 1}") in ("waiting", "ready")
    assert per_task < 300, f"{per_task:.0f} bytes per queued task"


def test_a_task_many_depend_on_releases_each_of_them_once():
    """Dependents are a 1-tuple, then a list: the first, second and later ones all run."""
    s = core_with(1, hwm=0)
    s.handle(TaskSubmitted("root", 0.0))
    for i in range(5):
        s.handle(TaskSubmitted(f"d{i}", 0.0, after=DepSpec(frozenset({"root"}))))
    assert s.task_state("d0") == "waiting"
    out = s.handle(TaskDone("root", 0, True, 0.0, 1.0))
    assigned = sorted(c.task_id for c in out if c.__class__.__name__ == "Assign")
    assert assigned == [f"d{i}" for i in range(5)]
