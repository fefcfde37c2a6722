"""Does an open dashboard slow the task path?  ``python docs/bench_dashboard.py``

Runs ``ipylb bench``'s submit and map workloads on one two-engine cluster, in
pairs of runs without and with dashboards polling (the order flips each round),
and prints the median of the per-pair ratios: adjacent runs share whatever else
the machine is doing, so the ratio of a pair is steadier than either figure.  It
also prints what one refresh costs, which bounds the overhead whatever the noise.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import ipylb
from ipylb.bench.farm import map_, submit
from ipylb.dashboard import INTERVAL_S, Dashboard


def cost_of_a_refresh(rc: ipylb.Client, n: int = 200) -> tuple[float, float, int]:
    """Milliseconds one dashboard refresh takes on average (its thread stopped, so only
    ours run; the task stream is redrawn every STREAM_EVERY refreshes), what one redraw
    of the stream costs alone, and how many task bars it drew."""
    dash = Dashboard(rc)
    dash.close()
    t0 = time.perf_counter()
    for _ in range(n):
        dash.refresh()
    mean = 1e3 * (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(20):
        dash._draw_stream(time.time())
    return mean, 1e3 * (time.perf_counter() - t0) / 20, len(dash._bars)


def run(view: ipylb.LoadBalancedView, rc: ipylb.Client, dashboards: int, interval: float,
        tasks: int) -> dict[str, float]:
    """One measurement of both workloads with ``dashboards`` panels polling."""
    dashes = [Dashboard(rc, interval) for _ in range(dashboards)]
    gc.collect()
    try:
        return {**submit(view, tasks), **map_(view, tasks)}
    finally:
        for d in dashes:
            d.close()


def main() -> None:
    """Measure and print throughput with and without dashboards."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tasks", type=int, default=4000, help="tasks per workload and run")
    p.add_argument("--dashboards", type=int, default=1, help="how many panels poll at once")
    p.add_argument("--interval", type=float, default=INTERVAL_S, help="seconds between polls")
    args = p.parse_args()
    ratios: dict[str, list[float]] = {}
    figures: dict[str, dict[str, list[float]]] = {"without": {}, "with": {}}
    with ipylb.Client(engines=2) as rc:
        view = rc.load_balanced_view()
        submit(view, 500)  # warm up
        refresh_ms, stream_ms, nbars = cost_of_a_refresh(rc)
        for r in range(args.rounds):
            modes = ["without", "with"] if r % 2 == 0 else ["with", "without"]
            pair = {m: run(view, rc, args.dashboards if m == "with" else 0, args.interval,
                           args.tasks) for m in modes}
            for k in pair["with"]:
                ratios.setdefault(k, []).append(pair["with"][k] / pair["without"][k])
                for m in modes:
                    figures[m].setdefault(k, []).append(pair[m][k])
            print(f"round {r + 1:2d}: " + "; ".join(
                f"{k} without {pair['without'][k]:.0f}, with {pair['with'][k]:.0f}" for k in pair["with"]))
    share = 100 * refresh_ms / 1e3 / args.interval * args.dashboards
    print(f"\none refresh (an activity round trip and re-rendering) takes {refresh_ms:.2f} ms "
          f"on average: {share:.2f}% of one core for {args.dashboards} panel(s) polling every "
          f"{args.interval} s; a redraw of the task stream ({nbars} bars) alone {stream_ms:.1f} ms")
    print(f"{args.rounds} pairs of runs, {args.tasks} tasks per workload:")
    for k, rs in ratios.items():
        print(f"  {k:<20} median without {statistics.median(figures['without'][k]):6.0f}, "
              f"with {statistics.median(figures['with'][k]):6.0f}; "
              f"median ratio with/without {statistics.median(rs):.3f}")


if __name__ == "__main__":
    main()
