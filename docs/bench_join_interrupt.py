"""How long a walltime takes to stop a task on an engine of ``ipylb engine join``.

``python docs/bench_join_interrupt.py [--rounds 5]``: a standalone cluster with no engines
of its own (``ipylb cluster start -n 0 --daemon``, plain then ``--curve``), one engine from
``ipylb engine join`` (which relays the controller's interrupts to its KernelManager), and
``rounds`` tasks of ``time.sleep(60)`` with ``walltime=1``: prints the seconds from
submission to ``WalltimeExceeded`` (1 s plus the interrupt's path; the 5 s grace and a stop
of the engine if the interrupt does not arrive).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import ipylb
from ipylb.error import WalltimeExceeded


def sleep_long() -> None:
    import time

    time.sleep(60)


def measure(curve: bool, rounds: int) -> list[float]:
    """Seconds to WalltimeExceeded for ``rounds`` tasks of walltime 1 on a joined engine."""
    profile = "join-interrupt-curve" if curve else "join-interrupt"
    subprocess.run(["ipylb", "cluster", "start", "-n", "0", "--daemon", "--profile", profile,
                    *(["--curve"] if curve else [])], check=True, capture_output=True)
    join = subprocess.Popen(["ipylb", "engine", "join", "--profile", profile],
                            stderr=subprocess.DEVNULL)
    try:
        with ipylb.Client(profile=profile) as rc:
            rc.wait_for_engines(1, 120)
            view = rc.load_balanced_view()
            took = []
            for _ in range(rounds):
                t0 = time.monotonic()
                with view.temp_flags(walltime=1):
                    ar = view.apply_async(sleep_long)
                try:
                    ar.get(30)
                except WalltimeExceeded as e:
                    if "restarted" in str(e):
                        raise RuntimeError(f"not interrupted: {e}") from None
                took.append(time.monotonic() - t0)
            return took
    finally:
        subprocess.run(["ipylb", "cluster", "stop", "--profile", profile], capture_output=True)
        join.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="tasks per mode (default 5)")
    args = p.parse_args()
    for curve in (False, True):
        took = measure(curve, args.rounds)
        print(f"{'--curve' if curve else 'plain'}: walltime 1 s -> WalltimeExceeded after "
              f"{', '.join(f'{t:.2f}' for t in took)} s (median {statistics.median(took):.2f})")


if __name__ == "__main__":
    main()
