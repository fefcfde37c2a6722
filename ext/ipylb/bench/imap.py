"""imap against map_async over the same no-op items: client peak memory and throughput.

    python -m ipylb.bench.imap --items 1000000 [--engines 2] [--scheme leastload --hwm auto]
        [--rounds 1] [--modes imap,map_async]

Each measurement runs in a fresh client process (so its peak RSS, ``ru_maxrss``, is
its own) against a fresh standalone cluster (so the controller's records start
empty); the modes alternate round by round, and medians are printed.  The controller's
RSS is read (psutil) when the run ends.  On a shared machine the figures are noisy:
compare the two modes of one invocation, not runs made at different times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from ..core.pipeline import DEFAULT_HWM, parse_hwm

PROFILE = f"bench-imap-{os.getpid()}"


def child(mode: str, items: int, profile: str) -> None:
    """One measurement in this process: consume ``items`` no-op results via ``mode``."""
    import psutil

    import ipylb
    from ipylb.bench.workloads import noop_n

    rc = ipylb.Client(profile=profile)
    view = rc.load_balanced_view()
    list(view.imap(noop_n, range(200)))  # warm: engines have the function, sockets are up
    t0 = time.perf_counter()
    n = 0
    if mode == "imap":
        for _ in view.imap(noop_n, range(items)):
            n += 1
    else:
        for _ in view.map_async(noop_n, range(items)):
            n += 1
    seconds = time.perf_counter() - t0
    controller = psutil.Process(rc.cluster_info["pid"]).memory_info().rss
    rc.close()
    print(json.dumps({
        "mode": mode, "items": n, "seconds": seconds, "rate": n / seconds,
        "client_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "controller_mb": controller / 2**20,
    }))


def _ipylb(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "ipylb", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ipylb {' '.join(args)} failed: {done.stderr.strip()}")


def measure(mode: str, items: int, engines: int, scheme: str, hwm: int | str) -> dict:
    """Start a cluster, run one child measurement against it, stop the cluster."""
    _ipylb("cluster", "start", "-n", str(engines), "--scheme", scheme, "--hwm", str(hwm),
           "--profile", PROFILE, "--daemon")
    try:
        done = subprocess.run([sys.executable, "-m", "ipylb.bench.imap", "--child", mode,
                               "--items", str(items), "--profile", PROFILE],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the {mode} run failed: {done.stderr.strip()[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)  # kept even if stopping the cluster fails
    finally:
        _ipylb("cluster", "stop", "--profile", PROFILE)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ipylb.bench.imap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="items per run (default 1000000)")
    p.add_argument("--engines", type=int, default=2, help="engines (default 2)")
    p.add_argument("--scheme", default="leastload", help="cluster scheme (default leastload)")
    p.add_argument("--hwm", type=parse_hwm, default=DEFAULT_HWM,
                   help=f"cluster hwm (default {DEFAULT_HWM})")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds (default 1)")
    p.add_argument("--modes", default="imap,map_async", help="default imap,map_async")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--profile", default=PROFILE, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.items, args.profile)
        return
    rows: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for mode in args.modes.split(","):
            row = measure(mode, args.items, args.engines, args.scheme, args.hwm)
            rows.setdefault(mode, []).append(row)
            print(f"round {r + 1} {mode:9} {row['items']:>9} items  {row['rate']:>8.0f} tasks/s  "
                  f"client peak {row['client_peak_mb']:>7.1f} MB  "
                  f"controller {row['controller_mb']:>7.1f} MB", flush=True)
    print(f"medians over {args.rounds} round(s), {args.items} no-op items, {args.engines} engines, "
          f"scheme {args.scheme}, hwm {args.hwm}:")
    for mode, rs in rows.items():
        med = {k: statistics.median(x[k] for x in rs)
               for k in ("rate", "client_peak_mb", "controller_mb")}
        print(f"  {mode:9} {med['rate']:>8.0f} tasks/s  client peak {med['client_peak_mb']:>7.1f} MB"
              f"  controller {med['controller_mb']:>7.1f} MB")


if __name__ == "__main__":
    main()
