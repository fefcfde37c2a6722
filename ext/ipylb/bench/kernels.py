"""``ipylb bench --kernels N``: N real engine kernels start, register and run a map.

Each round starts a fresh cluster of N engine kernels (``ipylb.Client(engines=N)``: the
controller starts them through jupyter_client) and reports: seconds from the call until
all N have registered, tasks/s of a ``map`` of ``tasks`` no-ops at chunksize 1, and the
controller's RSS and CPU seconds afterwards (psutil).  Figures are medians over rounds.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable

from .workloads import noop_n


def measure(n: int, tasks: int) -> dict[str, float]:
    """One fresh cluster of ``n`` engine kernels: its figures (see the module's doc)."""
    import psutil

    import ipylb

    t0 = time.perf_counter()
    with warnings.catch_warnings():  # more engines than cores is the point here
        warnings.simplefilter("ignore", RuntimeWarning)
        rc = ipylb.Client(engines=n)
    try:
        started = time.perf_counter() - t0
        if len(rc.ids) != n:
            raise RuntimeError(f"{len(rc.ids)} of {n} engines registered")
        ctl = psutil.Process(rc.cluster_info["pid"])
        startup_cpu = sum(ctl.cpu_times()[:2])
        view = rc.load_balanced_view()
        t = time.perf_counter()
        out = view.map_sync(noop_n, range(tasks))
        rate = tasks / (time.perf_counter() - t)
        if out != [None] * tasks:
            raise RuntimeError("the map's results are not the no-op's None")
        return {"startup_s": started, "map_tasks_per_s": rate,
                "controller_rss_MB": ctl.memory_info().rss / 1e6,
                "controller_startup_cpu_s": startup_cpu}
    finally:
        rc.shutdown()


def main(rounds: int, n: int, tasks: int = 8000, out: Callable[[str], None] = print) -> dict[str, float]:
    """Run ``rounds`` rounds; print each and the medians; return the medians."""
    figs = []
    for r in range(rounds):
        fig = measure(n, tasks)
        figs.append(fig)
        out(f"round {r + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in fig.items()))
    medians = {k: statistics.median(f[k] for f in figs) for k in figs[0]}
    out(f"{n} engine kernels, {tasks}-task map, median of {rounds} round(s) "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    for k, v in medians.items():
        out(f"  {k:<26}{v:.4g}")
    return medians
