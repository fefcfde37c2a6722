"""``ipylb demo``: the specification's examples on a private cluster of local engines."""

from __future__ import annotations

import argparse
import time

import ipylb

from .cli import HelpFormatter


def _sleep_and_return(x: float) -> float:
    import time

    time.sleep(x)
    return x


def parser() -> argparse.ArgumentParser:
    """``ipylb demo``'s options (each help line ends with its default)."""
    p = argparse.ArgumentParser(prog="ipylb demo", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("-n", "--engines", type=int, default=4, help="engine kernels to start")
    return p


def main(argv: list[str] | None = None) -> None:
    """Start engines, run the task interface's examples, print what happens."""
    args = parser().parse_args(argv)

    t0 = time.perf_counter()
    with ipylb.Client(engines=args.engines) as rc:
        print(f"started {len(rc.ids)} engine kernels in {time.perf_counter() - t0:.2f} s: ids {rc.ids}")
        lview = rc.load_balanced_view()
        lview.block = True

        serial_result = list(map(lambda x: x**10, range(32)))
        parallel_result = lview.map(lambda x: x**10, range(32))
        print("parallel map == serial map:", serial_result == parallel_result)

        @lview.parallel()
        def f(x):
            return 10.0 * x**4

        print("@parallel f.map(range(8)):", f.map(range(8)))

        print("iterating a map as results arrive (ordered=False):")
        durations = [0.6, 0.1, 0.4, 0.2, 0.3, 0.05]
        amr = lview.map_async(_sleep_and_return, durations, ordered=False)
        t1 = time.perf_counter()
        for x in amr:
            print(f"  +{time.perf_counter() - t1:.2f} s: a task that slept {x} s")

        ar1 = lview.apply_async(pow, 2, 10)
        with lview.temp_flags(after=[ar1]):
            ar2 = lview.apply_async(lambda: "ran after ar1")
        print("after=ar1:", ar1.get(), "then", repr(ar2.get()))

        with lview.temp_flags(block=False):
            ars = [lview.apply_async(pow, 3, i) for i in range(1000)]
        t2 = time.perf_counter()
        rc.wait(ars)
        print(f"1,000 small tasks in {time.perf_counter() - t2:.3f} s; queue status {rc.queue_status()}")
    print("cluster stopped")
