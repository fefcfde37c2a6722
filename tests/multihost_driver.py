"""Run inside namespace A by tests/test_multihost.py: a client of the controller in A,
whose engines run in namespace B.  Prints one JSON object with what it saw; the test
asserts on it.  ``bench`` instead prints latency and map throughput (bench/farm.py's
workloads, the same code ``ipylb bench`` runs)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator

import ipylb
import numpy as np


def victim(path: str) -> int:
    """The first run marks ``path`` with its pid and hangs (to be killed); a retry returns."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return os.getpid()
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(120)
    return -1


@contextlib.contextmanager
def longest_request(rc: ipylb.Client) -> Iterator[list[float]]:
    """Ask the controller for its queue status every 0.05 s while the block runs; the list
    of how long each request took (round trips, seconds)."""
    stalls, done = [0.0], threading.Event()

    def ask() -> None:
        while not done.is_set():
            t = time.monotonic()
            rc.queue_status(timeout=60)
            stalls.append(time.monotonic() - t)
            done.wait(0.05)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        yield stalls
    finally:
        done.set()
        asker.join()


def scenario(path: str, mark: str, restarted: bool = False) -> dict:
    out: dict = {}
    with ipylb.Client(path) as rc:
        rc.wait_for_engines(2, 60)
        info = rc.engine_info()
        out["engines"] = {str(k): {"heartbeat": v["heartbeat"], "pid": v["pid"],
                                   "shm_domain": v.get("shm_domain")} for k, v in info.items()}
        # what the dashboard and `ipylb top` show as each engine's host
        out["monitor_hosts"] = [e["host"] for e in rc.activity()["engines"].values()]
        v = rc.load_balanced_view()
        out["map"] = v.map_sync(lambda x: x * x, range(32))
        a = v.apply_async(os.getpid)
        with v.temp_flags(follow=[a]):
            follower = v.apply_async(os.getpid)
        with v.temp_flags(after=[a]):
            later = v.apply_async(time.time)
        out["follow_same_engine"] = follower.get(60) == a.get(60)
        out["after_started_after"] = later.get(60) >= a.metadata["completed"].timestamp()
        arr = np.random.default_rng(1).random(1 << 20)  # 8 MB of float64
        back = v.apply_sync(lambda x: x[::-1] * 2, arr)
        out["payload_ok"] = back.nbytes == arr.nbytes and bool((back == arr[::-1] * 2).all())
        with v.temp_flags(retries=1):
            ar = v.apply_async(victim, mark)
        deadline = time.monotonic() + 60
        while not os.path.exists(mark) or not open(mark).read():
            assert time.monotonic() < deadline, "the victim task never started"
            time.sleep(0.05)
        killed = int(open(mark).read())
        # While the remote engine is found dead and restarted, how long the controller
        # keeps a request waiting at most (its loop must not wait for a remote restart).
        with longest_request(rc) as stalls:
            os.kill(killed, 9)
            t0 = time.monotonic()
            out["retried_on"] = ar.get(60)
            out["noticed_s"] = time.monotonic() - t0
            if restarted:  # the controller's own engines: wait until its restart is over
                rc.wait_for_engines(2, 60)
        out["longest_request_s"] = max(stalls)
        if restarted:  # `ipylb engine add` over the same provisioner: nor for a remote start
            with longest_request(rc) as stalls:
                rc.add_engines(1)
                rc.wait_for_engines(3, 60)
            out["longest_request_adding_s"] = max(stalls)
        out["killed"] = killed
        out["ids_after"] = rc.ids
    return out


def bench(path: str, engines: int) -> dict:
    from ipylb.bench.farm import latency, map_

    with ipylb.Client(path) as rc:
        rc.wait_for_engines(engines, 60)
        v = rc.load_balanced_view()
        return {**latency(v, 300), **map_(v, 5000)}


if __name__ == "__main__":
    if sys.argv[1] == "bench":
        print(json.dumps(bench(sys.argv[2], int(sys.argv[3]))))
    else:
        print(json.dumps(scenario(sys.argv[1], sys.argv[2], sys.argv[3:] == ["restarted"])))
