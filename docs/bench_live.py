"""Live output (issue 15 item 5): how soon it shows, and what watching costs the cluster.

    python docs/bench_live.py [--rounds 3] [--tasks 3000]

1. Latency: a task prints a line every 0.1 s; ``display_outputs()`` right after
   ``apply_async``.  Printed: seconds from the task's first line (the engine's clock, same
   machine) to its arrival in the client's stdout, and reports received per second.
2. Cost while in use: no-op ``map_sync`` throughput on a 3-engine cluster while one engine
   runs a chatty task (a 1 KB line per ms), unwatched vs watched (``display_outputs()`` on a
   thread), alternating, ``--rounds`` pairs.  The ratio watched/unwatched is printed.

Figures on a shared machine are noisy: say the load (``uptime``) next to them.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time

import ipylb


def ticker(n: int, pause: float) -> None:
    import time

    for _ in range(n):
        print(f"{time.time():.4f}", flush=True)
        time.sleep(pause)


def chatter(stop_after: float) -> int:
    import time

    end = time.monotonic() + stop_after
    i = 0
    while time.monotonic() < end:
        print("x" * 1000, flush=True)
        i += 1
        time.sleep(0.001)
    return i


class _Arrivals:
    def __init__(self) -> None:
        self.got: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.got.append((time.time(), text))
        return len(text)

    def flush(self) -> None:
        pass


def latency(view: ipylb.LoadBalancedView, runs: int = 3) -> None:
    for _ in range(runs):
        ar = view.apply_async(ticker, 15, 0.1)
        sink = _Arrivals()
        with contextlib.redirect_stdout(sink):
            ar.display_outputs()
        live = [(t, text) for t, text in sink.got[:-1]]  # the last write: after the end
        first_line = float(ar.stdout.split()[0])
        if not live:
            print("latency: no live report (the task ended first)")
            continue
        span = live[-1][0] - live[0][0]
        print(f"latency: first output {live[0][0] - first_line:.2f} s after the task's first "
              f"line; {len(live)} reports in {span:.2f} s")


def throughput(view: ipylb.LoadBalancedView, tasks: int) -> float:
    t = time.perf_counter()
    view.map_sync(abs, range(tasks))
    return tasks / (time.perf_counter() - t)


def cost(rc: ipylb.Client, rounds: int, tasks: int) -> None:
    noisy = rc.load_balanced_view(targets=[2])
    work = rc.load_balanced_view(targets=[0, 1])
    throughput(work, tasks)  # warm-up, not counted
    figures: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for watched in ((False, True) if r % 2 == 0 else (True, False)):
            ar = noisy.apply_async(chatter, 60.0)
            follower = None
            if watched:
                follower = threading.Thread(target=_follow_quietly, args=(ar,), daemon=True)
                follower.start()
            time.sleep(0.5)  # (both arms: the chatty task under way, the first reports sent)
            figures[watched].append(throughput(work, tasks))
            rc.interrupt([2])
            ar.wait(30)
            if follower is not None:
                follower.join(30)
    ratios = [w / u for u, w in zip(figures[False], figures[True])]
    print(f"no-op map_sync of {tasks} on 2 engines, third engine printing 1 MB/s: "
          f"unwatched {statistics.median(figures[False]):.0f}/s, watched "
          f"{statistics.median(figures[True]):.0f}/s, watched/unwatched median "
          f"{statistics.median(ratios):.3f} (pairs {[round(x, 3) for x in ratios]})")


def _follow_quietly(ar: ipylb.AsyncResult) -> None:
    # (redirect_stdout is process-wide: the main thread prints nothing meanwhile)
    with contextlib.redirect_stdout(_Arrivals()), contextlib.redirect_stderr(_Arrivals()):
        ar.display_outputs()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=3000)
    args = p.parse_args()
    with ipylb.Client(engines=3) as rc:
        rc.wait_for_engines(3, timeout=120)
        latency(rc.load_balanced_view(targets=[0]))
        cost(rc, args.rounds, args.tasks)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
