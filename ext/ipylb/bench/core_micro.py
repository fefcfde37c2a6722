"""Micro benchmark of the pure scheduler core: is its cost flat in queued tasks and engines?

For each engine count E and task count N it submits N tasks up front (a mix of
plain tasks and tasks ``after`` one or two earlier tasks within a window), so the
core holds N waiting/ready tasks, then plays E engines that finish whatever they
were assigned, oldest first, until every task is delivered.  It prints events per
second for the submission phase, the completion phase and overall: if scheduling
cost grew with the queue or the engines, the cost per event would grow along a
row or down a column.  Then, per scheme, the cost of one plain TaskSubmitted +
TaskDone pair with every engine but one busy (the free one anywhere in LRU
order: where a scan over engines would show).  Times are this process's CPU time
(``time.process_time``), so a machine shared with other jobs skews them less.  Each cell is
timed three ways: with CPython's default GC, under the controller process's GC policy
(:mod:`ipylb.controller.gcpolicy`: the survivors of each full collection are frozen, so
full collections stop walking every queued task's records; what a controller runs with),
and with the GC paused (the core's own cost).  The GC-paused
figure is also split into user and kernel (sys) time, with the minor page faults per
event: a queue of a million tasks keeps ~280 bytes each (half of them with dependencies), and the kernel's first touches of
that memory are a cost that grows with the queue while the core's own steps do not
(tests/core/test_scale.py counts them).

Run: ``ipylb bench --core`` or ``python -m ipylb.bench.core_micro [--engines 4,64,1000]
[--sizes 1000,10000,100000,1000000]``.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import time
from collections import deque
from collections.abc import Sequence

from ipylb.controller.gcpolicy import GCPolicy
from ipylb.core.events import Assign, DepSpec, EngineAdded, TaskDone, TaskSubmitted
from ipylb.core.scheduler import Scheduler
from ipylb.core.schemes import SCHEMES


def _workload(n: int, seed: int, window: int = 50) -> list[TaskSubmitted]:
    """N submissions: about half plain, the rest after 1 or 2 of the last ``window`` tasks."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        tid = f"t{i}"
        r = rng.random()
        if i == 0 or r < 0.5:
            events.append(TaskSubmitted(tid, 0.0))
            continue
        lo = max(0, i - window)
        k = 1 if r < 0.75 else 2
        ids = frozenset(f"t{rng.randrange(lo, i)}" for _ in range(k))
        events.append(TaskSubmitted(tid, 0.0, after=DepSpec(ids)))
    return events


def run_dag(n: int, engines: int = 4, seed: int = 0,
            usage: dict[str, float] | None = None) -> tuple[float, float, int]:
    """Submit n tasks, then complete them all; (submit s, complete s, events).  ``usage``,
    if given, gets the timed phases' ``user`` and ``sys`` CPU seconds and ``faults`` (minor
    page faults: first touches of new memory, which the kernel's time pays for)."""
    core = Scheduler(seed=seed)
    handle = core.handle
    running: deque[tuple[str, int]] = deque()
    for e in range(engines):
        handle(EngineAdded(e, 0.0))
    subs = _workload(n, seed)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.process_time()
    for ev in subs:
        for c in handle(ev):
            if c.__class__ is Assign:
                running.append((c.task_id, c.engine_id))
    t1 = time.process_time()
    done = 0
    while running:
        tid, eid = running.popleft()
        for c in handle(TaskDone(tid, eid, True, 1.0)):
            if c.__class__ is Assign:
                running.append((c.task_id, c.engine_id))
        done += 1
    t2 = time.process_time()
    if usage is not None:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        usage.update(user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime,
                     faults=r1.ru_minflt - r0.ru_minflt)
    if done != n:
        raise RuntimeError(f"only {done} of {n} tasks completed")
    return t1 - t0, t2 - t1, n + done


def best_of(n: int, engines: int, runs: int, collect: bool | str,
            usage: dict[str, float] | None = None) -> tuple[float, float, int]:
    """The fastest of ``runs`` runs of :func:`run_dag` with CPython's cyclic GC as
    ``collect`` says: True, on with CPython's default policy; False, paused; ``"controller"``,
    on under the controller process's policy (:class:`ipylb.controller.gcpolicy.GCPolicy`:
    survivors of each full collection frozen).  ``usage``: the fastest run's, as
    :func:`run_dag` fills it.

    Pausing the GC separates the core's own cost from the collector's, which under the
    default policy grows with the number of live objects (here every task record is kept).
    """
    best = None
    for _ in range(runs):
        gc.collect()
        if not collect:
            gc.disable()
        policy = GCPolicy().install() if collect == "controller" else None
        mine: dict[str, float] = {}
        try:
            r = run_dag(n, engines, usage=mine)
        finally:
            gc.enable()
            if policy is not None:
                policy.uninstall()
        if best is None or r[0] + r[1] < best[0] + best[1]:
            best = r
            if usage is not None:
                usage.update(mine)
    return best  # type: ignore[return-value]


def pair_cost(repeats: int = 200_000, engines: int = 4, scheme: str = "leastload",
              busy: bool = False) -> float:
    """Microseconds for one plain TaskSubmitted + TaskDone; with ``busy``, every engine but
    one runs a task that never ends, and the free one is half way along the LRU order."""
    core = Scheduler(scheme=scheme, seed=1)
    handle = core.handle
    for e in range(engines):
        handle(EngineAdded(e, 0.0))
    if busy:
        # Tasks for every engine; finish the one of the middle engine, so that the only free
        # engine sits among busy ones in LRU order.
        held = [handle(TaskSubmitted(f"busy{i}", 0.0))[0] for i in range(engines)]
        mid = held[engines // 2]
        handle(TaskDone(mid.task_id, mid.engine_id, True, 0.0))
    subs = [TaskSubmitted(f"p{i}", 0.0) for i in range(repeats)]
    t0 = time.process_time()
    for ev in subs:
        a = handle(ev)[0]
        handle(TaskDone(a.task_id, a.engine_id, True, 0.0))
    return (time.process_time() - t0) / repeats * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    """Print the events/second table per engine count and the pair cost per scheme."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated task counts")
    p.add_argument("--engines", default="4,64,1000", help="comma-separated engine counts")
    p.add_argument("--repeats", type=int, default=100_000, help="pairs for each pair cost")
    p.add_argument("--runs", type=int, default=3,
                   help="best of this many runs per size (one above 10,000 tasks)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    counts = [int(s) for s in args.engines.split(",") if s]
    print("ipylb core micro benchmark: hwm=1, leastload; N tasks queued up front "
          "(half plain, half after 1-2 recent tasks), then completed by E engines")
    print(f"{'E':>5} {'N tasks':>9} {'submit ev/s':>12} {'complete ev/s':>14} {'overall ev/s':>13}"
          f" {'µs/event':>9} {'controller GC':>14} {'GC paused':>10} {'(user':>6} {'sys)':>5}"
          f" {'faults/ev':>9}")
    run_dag(2_000, counts[0])  # warm up (first-call costs, allocator)
    per_event, per_user, per_default, per_policy = [], [], [], []
    for engines in counts:
        for n in sizes:
            runs = max(1, args.runs if n <= 10_000 else 1)
            ts, tc, events = best_of(n, engines, runs, collect=True)
            per_default.append((ts + tc) / events * 1e6)
            tsp, tcp, _ = best_of(n, engines, runs, collect="controller")
            per_policy.append((tsp + tcp) / events * 1e6)
            use: dict[str, float] = {}
            ts2, tc2, _ = best_of(n, engines, runs, collect=False, usage=use)
            us = (ts2 + tc2) / events * 1e6
            per_event.append(us)
            per_user.append(use["user"] / events * 1e6)
            print(f"{engines:>5} {n:>9,} {n / ts:>12,.0f} {n / tc:>14,.0f} {events / (ts + tc):>13,.0f}"
                  f" {per_default[-1]:>9.2f} {per_policy[-1]:>14.2f} {us:>10.2f} {per_user[-1]:>6.2f}"
                  f" {use['sys'] / events * 1e6:>5.2f} {use['faults'] / events:>9.3f}")
    print("µs/event is with CPython's default GC (the ev/s columns are its); controller GC: "
          "under the controller's policy (survivors of full collections frozen, "
          "ipylb.controller.gcpolicy)")
    for label, col in (("default GC", per_default), ("controller's GC policy", per_policy)):
        print(f"µs/event with the {label}, slowest / fastest: {max(col) / min(col):.2f}")
    print(f"µs/event with the GC paused, slowest / fastest: {max(per_event) / min(per_event):.2f}"
          f" (user CPU alone: {max(per_user) / min(per_user):.2f}; the rest is the kernel's, "
          "mostly first touches of the memory a growing queue takes)")
    print("plain TaskSubmitted + TaskDone pair, every engine but one busy (best of 3), µs:")
    print(f"{'scheme':<12}" + "".join(f"{f'E={e}':>9}" for e in counts) + f"{'slowest/fastest':>17}")
    for scheme in SCHEMES:
        row = [min(pair_cost(args.repeats // 3, e, scheme, busy=True) for _ in range(3)) for e in counts]
        print(f"{scheme:<12}" + "".join(f"{us:>9.2f}" for us in row) + f"{max(row) / min(row):>17.2f}")


if __name__ == "__main__":
    main()
