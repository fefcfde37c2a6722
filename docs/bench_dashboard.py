"""Does an open dashboard slow the task path?  ``python docs/bench_dashboard.py``

Runs ``ipylb bench``'s submit and map workloads on one two-engine cluster,
alternating rounds without and with dashboards polling (the order flips each
round so drift hits both alike), and prints the medians and the ratio; and what
one refresh costs, which bounds the overhead whatever the noise.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import ipylb
from ipylb.bench.farm import map_, submit
from ipylb.dashboard import INTERVAL_S, Dashboard


def main() -> None:
    """Measure and print throughput with and without dashboards."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dashboards", type=int, default=1, help="how many panels poll at once")
    p.add_argument("--interval", type=float, default=INTERVAL_S, help="seconds between polls")
    args = p.parse_args()
    figures: dict[str, dict[str, list[float]]] = {"without": {}, "with": {}}
    with ipylb.Client(engines=2) as rc:
        view = rc.load_balanced_view()
        submit(view, 500)  # warm up
        refresh_ms = cost_of_a_refresh(rc)
        for r in range(args.rounds):
            modes = ["without", "with"] if r % 2 == 0 else ["with", "without"]
            for mode in modes:
                dashes = [Dashboard(rc, args.interval) for _ in range(args.dashboards)
                          ] if mode == "with" else []
                gc.collect()
                for workload in (submit, map_):
                    for k, v in workload(view).items():
                        figures[mode].setdefault(k, []).append(v)
                for d in dashes:
                    d.close()
                print(f"round {r + 1} {mode:>7} dashboard: " + ", ".join(
                    f"{k}={v[-1]:.0f}" for k, v in figures[mode].items()))
    print(f"\none refresh (a queue_status round trip and re-rendering) costs {refresh_ms:.2f} ms "
          f"of wall time: {100 * refresh_ms / 1e3 / args.interval * args.dashboards:.2f}% of "
          "one core at this polling rate")
    print(f"medians of {args.rounds} rounds ({args.dashboards} dashboard(s) polling every "
          f"{args.interval} s):")
    for k in figures["without"]:
        a, b = statistics.median(figures["without"][k]), statistics.median(figures["with"][k])
        print(f"  {k:<20} without {a:8.0f}   with {b:8.0f}   ratio {b / a:.3f}")


def cost_of_a_refresh(rc: ipylb.Client, n: int = 200) -> float:
    """Milliseconds one dashboard refresh takes (its thread stopped, so only ours run)."""
    dash = Dashboard(rc)
    dash.close()
    t0 = time.perf_counter()
    for _ in range(n):
        dash.refresh()
    return 1e3 * (time.perf_counter() - t0) / n


if __name__ == "__main__":
    main()
