"""``ipylb bench --schemes``: the specification's missing performance comparison.

For each scheme: a heterogeneous workload (200 sleeping tasks, log-normal durations
with mean 50 ms, seeded), reported as makespan over its lower bound
max(total / engines, longest task); and a no-op throughput run.  ipyparallel's
leastload and pure run beside ours as the reference.  Prints a table and writes a
PNG chart.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any

from ..core.pipeline import DEFAULT_HWM
from .farm import Farm, Ipylb, Ipyparallel, quiet
from .workloads import noop, sleep

SCHEMES = ["lru", "plainrandom", "twobin", "leastload", "weighted", "pure"]


def durations(n: int = 200, mean: float = 0.05, sigma: float = 1.0, seed: int = 3) -> list[float]:
    """Log-normal task durations with the given mean."""
    rng = random.Random(seed)
    mu = math.log(mean) - sigma**2 / 2
    return [rng.lognormvariate(mu, sigma) for _ in range(n)]


def makespan_ratio(view: Any, engines: int, tasks: list[float]) -> float:
    t0 = time.perf_counter()
    view.map_async(sleep, tasks).get()
    makespan = time.perf_counter() - t0
    return makespan / max(sum(tasks) / engines, max(tasks))


def throughput(view: Any, n: int = 5000) -> float:
    t0 = time.perf_counter()
    ars = [view.apply_async(noop) for _ in range(n)]
    for ar in ars:
        ar.get()
    return n / (time.perf_counter() - t0)


class IpyparallelScheme(Ipyparallel):
    """ipyparallel with a chosen task scheduler scheme."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.name = f"ipyparallel {scheme}"

    def start(self, n: int) -> None:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(
            n=n, log_level=40, controller_args=[f"--TaskScheduler.scheme_name={self.scheme}"]
        )
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(n, timeout=120)


def measure(farm: Farm, engines: int, tasks: list[float]) -> tuple[float, float]:
    farm.start(engines)
    try:
        view = farm.view()
        view.apply_sync(noop)
        return makespan_ratio(view, engines, tasks), throughput(view)
    finally:
        farm.stop()


def main(rounds: int = 3, engines: int = 2, reference: bool = True, chart: str = "schemes.png",
         hwms: list[int | str] | None = None) -> None:
    """Run every scheme ``rounds`` times; print medians; write the chart.  ``hwms``: leastload
    runs once per value (default: the clusters' default hwm), side by side in the same
    rounds; the other schemes run at the default hwm (pure at 0)."""
    tasks = durations()
    farms: list[Farm] = []
    for s in SCHEMES:
        if s == "leastload":
            for h in hwms or [DEFAULT_HWM]:
                f = Ipylb(scheme=s, hwm=h)
                f.name = f"ipylb {s}" + ("" if hwms is None or hwms == [DEFAULT_HWM]
                                         else f" hwm={h}")
                farms.append(f)
        else:  # pure as it is meant to be used for throughput: with no pipeline limit (hwm=0)
            f = Ipylb(scheme=s, hwm=0 if s == "pure" else None)
            f.name = f"ipylb {s}"
            farms.append(f)
    if reference:
        farms += [IpyparallelScheme("leastload"), IpyparallelScheme("pure")]
    results: dict[str, list[tuple[float, float]]] = {f.name: [] for f in farms}
    with quiet():
        for r in range(rounds):
            for farm in farms:
                for attempt in range(3):
                    try:
                        ratio, tps = measure(farm, engines, tasks)
                        break
                    except RuntimeError as e:  # ipyparallel's pure scheduler gives up when an
                        print(f"{farm.name}: {e} (attempt {attempt + 1})")  # engine unregisters
                else:
                    continue
                results[farm.name].append((ratio, tps))
                print(f"round {r + 1}/{rounds} {farm.name}: makespan/bound {ratio:.3f}, noop {tps:.0f} tasks/s")
    rows = {name: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
            for name, v in results.items() if v}
    print(f"\n{'scheme (median of ' + str(rounds) + ')':<26}{'makespan/bound':>16}{'noop tasks/s':>14}")
    for name, (ratio, tps) in rows.items():
        print(f"{name:<26}{ratio:>16.3f}{tps:>14.0f}")
    print(f"\nheterogeneous workload: {len(tasks)} tasks, mean {statistics.mean(tasks) * 1e3:.1f} ms, "
          f"longest {max(tasks) * 1e3:.0f} ms, {engines} engines; bound {max(sum(tasks) / engines, max(tasks)):.2f} s")
    if chart:
        _chart(rows, chart)
        print(f"chart written to {chart}")


def _chart(rows: dict[str, tuple[float, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colors = ["#d62728" if n.startswith("ipyparallel") else "#1f77b4" for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(names, [rows[n][0] for n in names], color=colors)
    a.axvline(1.0, color="k", lw=0.8)
    a.set_xlabel("makespan / lower bound (lower is better)")
    a.set_xlim(left=0.9)
    b.barh(names, [rows[n][1] for n in names], color=colors)
    b.set_xlabel("no-op tasks/s (higher is better)")
    b.set_yticklabels([])
    fig.suptitle("ipylb schemes (blue) vs ipyparallel (red), 2 engines")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
