"""``ipylb bench``: the task farm's core costs, side by side with ipyparallel and a bare pool.

Each round starts a fresh two-engine cluster of each kind in this process tree
(and a ``concurrent.futures.ProcessPoolExecutor`` with as many workers), runs the
same workloads on each, and shuts it down; rounds alternate between them so
drift on a noisy machine hits all alike.  Figures are medians over the rounds;
ratios compare ipylb's median with each reference's.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .workloads import echo, noop, noop_n

MB = 1024 * 1024


class Farm:
    """One kind of cluster, seen through the API both projects share."""

    name = "?"
    # Workloads this farm cannot run (e.g. dependencies on a bare pool).
    skips: frozenset[str] = frozenset()

    def start(self, n: int) -> Any: ...
    # Stop the cluster and drop the client (or pool): a stopped farm held every result and
    # metadata of its round (ipyparallel's rc.results), hundreds of MB after a few rounds,
    # which made each full garbage collection of the bench process take seconds under load,
    # GIL held, inside the next farm's timed workloads (and starved ipylb's client: stall.md).
    def stop(self) -> None: ...
    def view(self) -> Any: ...


class Ipylb(Farm):
    name = "ipylb"

    def __init__(self, scheme: str = "leastload", hwm: int | str | None = None) -> None:
        self.scheme, self.hwm = scheme, hwm

    def start(self, n: int) -> None:
        import ipylb

        self.rc = ipylb.Client(engines=n, scheme=self.scheme, hwm=self.hwm)

    def stop(self) -> None:
        self.rc.shutdown()
        del self.rc

    def view(self) -> Any:
        return self.rc.load_balanced_view()


class IpylbStandalone(Ipylb):
    """ipylb through ``ipylb cluster start --daemon`` and ``Client(profile=...)``."""

    name = "ipylb standalone"

    def start(self, n: int) -> None:
        import os
        import subprocess
        import sys

        import ipylb

        self.profile = f"bench-{os.getpid()}"
        cmd = [sys.executable, "-m", "ipylb.cli", "cluster", "start", "-n", str(n), "--daemon",
               "--profile", self.profile, "--scheme", self.scheme]
        subprocess.run(cmd, check=True, capture_output=True)
        self.rc = ipylb.Client(profile=self.profile)
        self.rc.wait_for_engines(n, 60)

    def stop(self) -> None:
        from ipylb import connection

        self.rc.stop_cluster()
        self.rc.close()
        del self.rc
        connection.log_file(self.profile).unlink(missing_ok=True)  # a benchmark's, not a user's


class Ipyparallel(Farm):
    name = "ipyparallel"

    def start(self, n: int) -> None:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(n=n, log_level=40)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(n, timeout=120)

    def stop(self) -> None:
        self.rc.close()
        self.cluster.stop_cluster_sync()
        del self.rc, self.cluster

    def view(self) -> Any:
        return self.rc.load_balanced_view()


class _Pending:
    """What ``apply_async``/``map_async`` return on the pool: ``get()`` waits for the value."""

    __slots__ = ("get",)

    def __init__(self, get: Callable[[], Any]) -> None:
        self.get = get


class _PoolView:
    """``apply_sync``/``apply_async``/``map_async`` over a ProcessPoolExecutor."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def apply_sync(self, f: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(f, *args).result()

    def apply_async(self, f: Callable[..., Any], *args: Any) -> _Pending:
        return _Pending(self.pool.submit(f, *args).result)

    def map_async(self, f: Callable[..., Any], seq: Any, chunksize: int = 1) -> _Pending:
        it = self.pool.map(f, seq, chunksize=chunksize)  # submits every chunk now, like map_async
        return _Pending(lambda: list(it))


class ProcessPool(Farm):
    """``concurrent.futures.ProcessPoolExecutor``: no controller, no dependencies, no MAC.

    The floor a task farm on one machine is measured against (issue 14).  Workers
    start with the platform's default start method, and are warmed by the startup
    task like the engines of the other farms.
    """

    name = "ProcessPool"
    skips = frozenset({"dag"})

    def start(self, n: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(n)
        # Start every worker before timing (the pool spawns them on demand otherwise).
        list(self.pool.map(noop_n, range(4 * n)))

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        del self.pool

    def view(self) -> Any:
        return _PoolView(self.pool)


# -- workloads (each returns {metric: value}) -----------------------------------------


def startup(farm: Farm, engines: int) -> dict[str, float]:
    t0 = time.perf_counter()
    farm.start(engines)
    view = farm.view()
    view.apply_sync(noop)  # ready means: runs a task
    return {"startup_s": time.perf_counter() - t0}


def latency(view: Any, n: int = 500) -> dict[str, float]:
    for _ in range(20):
        view.apply_sync(noop)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        view.apply_sync(noop)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"latency_p50_ms": 1e3 * samples[n // 2], "latency_p99_ms": 1e3 * samples[int(n * 0.99)]}


def submit(view: Any, n: int = 5000) -> dict[str, float]:
    t0 = time.perf_counter()
    ars = [view.apply_async(noop) for _ in range(n)]
    for ar in ars:
        ar.get()
    return {"submit_tasks_per_s": n / (time.perf_counter() - t0)}


def map_(view: Any, n: int = 20000) -> dict[str, float]:
    t0 = time.perf_counter()
    out = view.map_async(echo, range(n), chunksize=1).get()
    assert len(out) == n
    return {"map_tasks_per_s": n / (time.perf_counter() - t0)}


def payload(view: Any, mb: int = 8, n: int = 10) -> dict[str, float]:
    arr = np.ones(mb * MB, dtype="u1")
    for _ in range(3):  # the first few touch new memory in every process: warm up
        view.apply_sync(echo, arr)
    t0 = time.perf_counter()
    for _ in range(n):
        out = view.apply_sync(echo, arr)
    assert out.nbytes == arr.nbytes
    # MB of array per round trip (the array goes there and back).
    return {"payload_MB_per_s": n * mb / (time.perf_counter() - t0)}


def dag(view: Any, n: int = 1000, window: int = 32, seed: int = 7) -> dict[str, float]:
    """n tasks, each ``after`` 1 to 3 earlier ones within ``window`` (seeded): a shallow DAG."""
    import random

    rng = random.Random(seed)
    t0 = time.perf_counter()
    ars: list[Any] = []
    for i in range(n):
        if i:
            lo = max(0, i - window)
            deps = rng.sample(ars[lo:i], min(i - lo, rng.randint(1, 3)))
            with view.temp_flags(after=deps):
                ars.append(view.apply_async(noop))
        else:
            ars.append(view.apply_async(noop))
    for ar in ars:
        ar.get()
    return {"dag_tasks_per_s": n / (time.perf_counter() - t0)}


WORKLOADS: dict[str, Callable[[Any], dict[str, float]]] = {
    "latency": latency, "submit": submit, "map": map_, "payload": payload, "dag": dag,
}

# Which direction is better, for the ratio column.
HIGHER_IS_BETTER = {"submit_tasks_per_s", "map_tasks_per_s", "payload_MB_per_s", "dag_tasks_per_s"}


def run_round(farm: Farm, engines: int, workloads: list[str]) -> dict[str, float]:
    figures = startup(farm, engines)
    try:
        view = farm.view()
        for name in workloads:
            if name in farm.skips:
                continue
            gc.collect()
            figures.update(WORKLOADS[name](view))
    finally:
        farm.stop()
    return figures


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    yield


def compare(farms: list[Farm], rounds: int, engines: int, workloads: list[str],
            out: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Run ``rounds`` alternating rounds; print and return the median figures per farm."""
    samples: dict[str, dict[str, list[float]]] = {f.name: {} for f in farms}
    with quiet():
        for r in range(rounds):
            for farm in farms:
                figs = run_round(farm, engines, workloads)
                out(f"round {r + 1}/{rounds} {farm.name}: " +
                    ", ".join(f"{k}={v:.4g}" for k, v in figs.items()))
                for k, v in figs.items():
                    samples[farm.name].setdefault(k, []).append(v)
    medians = {name: {k: statistics.median(v) for k, v in figs.items()} for name, figs in samples.items()}
    out("")
    names = [f.name for f in farms]
    metrics = list(dict.fromkeys(m for n in names for m in medians[n]))
    w = max(14, *(len(n) + 2 for n in names))
    refs = names[1:]
    header = f"{'metric (median of ' + str(rounds) + ')':<28}" + "".join(f"{n:>{w}}" for n in names)
    header += "".join(f"{'/' + r:>{max(10, len(r) + 3)}}" for r in refs)
    if refs:
        header += "  better"
    out(header)
    for m in metrics:
        row = f"{m:<28}" + "".join(f"{medians[n].get(m, float('nan')):>{w}.4g}" for n in names)
        a = medians[names[0]].get(m)
        for r in refs:
            b = medians[r].get(m)
            cell = "-" if a is None or b is None else f"{a / b if b else float('inf'):.2f}"
            row += f"{cell:>{max(10, len(r) + 3)}}"
        if refs:
            row += f"  ({'higher' if m in HIGHER_IS_BETTER else 'lower'})"
        out(row)
    return medians
