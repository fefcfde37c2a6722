"""``python -m ipylb.bench.swarm``: one real controller, up to 1,000 engine identities.

A few processes speak the engine protocol the way an engine kernel does
(``ipylb.engine.taskchannel``): each identity is a DEALER of its own that registers
with its versions and a heartbeat url of its own (one Jupyter-style ROUTER echo per
process, bound at one ipc path per identity, served by ``zmq.proxy`` on a thread, as
ipykernel's heartbeat is), answers every task at once (one by one, or several in one
TASKS message when the cluster pipelines) with ``None`` without running it, and stops on
STOP; it serves no steal socket (the controller then answers its own steal requests
"too late": the tasks are answered anyway).  So the controller's costs per
engine (registration, heartbeats, placement, one socket each) are measured without 1,000
kernels.

Each round starts a fresh controller with no engines, lets ``--small`` (8) identities
and then ``--engines`` (1,000) register (alternating which goes first), and reports per
size: seconds from spawning the swarm to the last registration (and the controller's
CPU seconds over it), the controller's CPU %
while idle (its heartbeats to every engine: ``psutil``), tasks/s of a ``map`` of
``--tasks`` no-ops at chunksize 1 and the controller's CPU µs per task in it, the median round trip of one no-op at a time, and
the controller's RSS.  Figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import zmq

from .. import compat, connection, wire
from ..serialize import dumps

PROCESSES = 4  # swarm processes (at most one per 2 identities)


def serve(info: dict[str, Any], count: int, first: int) -> None:
    """Run ``count`` engine identities in this process until the controller stops them
    (or closes); prints ``registered`` once all have their engine ids.  The heartbeat
    channels' socket files live in a private temporary directory, removed at the end."""
    with tempfile.TemporaryDirectory(prefix="ipylb-swarm-") as tmp:
        _serve(info, count, first, f"ipc://{tmp}/hb")


def _serve(info: dict[str, Any], count: int, first: int, hb_base: str) -> None:
    ctx = zmq.Context.instance()
    hb = ctx.socket(zmq.ROUTER)
    hb.setsockopt(zmq.LINGER, 0)
    for i in range(first, first + count):
        hb.bind(f"{hb_base}-{i}")
    threading.Thread(target=zmq.proxy, args=(hb, hb), daemon=True).start()
    key, to = info["key"].encode(), info["controller_id"].encode()
    meta = {"connection_file": "", "pid": os.getpid(), "hostname": "swarm", "tag": "",
            "shm_domain": None, "versions": compat.versions()}
    poller = zmq.Poller()
    signers: dict[zmq.Socket, wire.Signer] = {}
    for i in range(first, first + count):
        ident = f"engine-swarm{os.getpid()}-{i}".encode()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, ident)
        sock.setsockopt(zmq.LINGER, 0)
        connection.secure(sock, info)
        sock.connect(info["engine_url"])
        signers[sock] = signer = wire.Signer(key, ident, to)
        wire.send(sock, signer.pack(wire.REGISTER, {**meta, "heartbeat": f"{hb_base}-{i}"}))
        poller.register(sock, zmq.POLLIN)
    result = dumps(None)
    registered = 0
    live = count
    while live:
        for sock, _ in poller.poll(1000):
            signer = signers[sock]
            while True:
                try:
                    frames = wire.recv(sock)
                except zmq.Again:
                    break
                kind, _sender, m, bufs, _mac = signer.unpack(frames)
                if kind == wire.TASK or kind == wire.TASKS:  # TASKS: several at once (hwm > 1)
                    now = time.time()
                    for head in [m] if kind == wire.TASK else [i[0] for i in wire.unbatch(m, bufs)]:
                        wire.send(sock, signer.pack(wire.DONE, (head[0], "ok", now, now, "", "",
                                                                None), result))
                elif kind == wire.REGISTERED:
                    registered += 1
                    if registered == count:
                        print("registered", flush=True)
                elif kind in (wire.STOP, wire.REFUSED):
                    poller.unregister(sock)
                    live -= 1
                    break


def spawn(info: dict[str, Any], n: int) -> list[subprocess.Popen]:
    """Start a swarm of ``n`` identities over up to PROCESSES processes (the cluster's info,
    key included, goes through their stdin, never their command line)."""
    procs, first = [], 0
    parts = min(PROCESSES, max(1, n // 2))
    for p in range(parts):
        count = n // parts + (p < n % parts)
        proc = subprocess.Popen([sys.executable, "-m", "ipylb.bench.swarm", "--serve",
                                 str(count), str(first)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        proc.stdin.write(json.dumps(info))  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        procs.append(proc)
        first += count
    return procs


def measure(n: int, tasks: int, idle_s: float = 3.0, latency_n: int = 300,
            listeners: int = 1) -> dict[str, float]:
    """One fresh controller with a swarm of ``n`` identities: its figures.  ``listeners``:
    clients connected meanwhile (a dashboard is one more; every one hears of every
    registration)."""
    import psutil

    import ipylb
    from ipylb.client.local import LocalCluster

    from .workloads import noop, noop_n

    cluster = LocalCluster(0)
    procs: list[subprocess.Popen] = []
    rc = None
    others: list[Any] = []
    try:
        rc = ipylb.Client(str(cluster.connection_file))
        others = [ipylb.Client(str(cluster.connection_file)) for _ in range(listeners - 1)]
        ctl = psutil.Process(cluster.info["pid"])
        c0, t0 = ctl.cpu_times(), time.perf_counter()
        procs = spawn(cluster.info, n)
        rc.wait_for_engines(n, 120)
        registered = time.perf_counter() - t0
        c1 = ctl.cpu_times()  # the controller's own work for n registrations
        reg_cpu = c1.user + c1.system - c0.user - c0.system
        for proc in procs:  # (all are in: they said so, or will at once)
            proc.stdout.readline()  # type: ignore[union-attr]
        c0 = ctl.cpu_times()
        time.sleep(idle_s)  # nothing but heartbeats
        c1 = ctl.cpu_times()
        idle = round(max(0.0, (c1.user + c1.system - c0.user - c0.system) / idle_s * 100), 2)
        view = rc.load_balanced_view()
        view.map_sync(noop_n, range(200))  # warm
        c0, t = ctl.cpu_times(), time.perf_counter()
        out = view.map_sync(noop_n, range(tasks))
        rate = tasks / (time.perf_counter() - t)
        c1 = ctl.cpu_times()  # the controller's CPU per task: less noisy than tasks/s
        cpu_us = (c1.user + c1.system - c0.user - c0.system) / tasks * 1e6
        if out != [None] * tasks:
            raise RuntimeError("the swarm's answers did not come back as None")
        # One task at a time: what a loop over every engine's socket would add shows here,
        # where pipelining (1,000 engines hold 1,000 tasks at hwm=1) cannot hide it.
        lat = []
        for _ in range(latency_n):
            t = time.perf_counter()
            view.apply_sync(noop)
            lat.append(time.perf_counter() - t)
        return {"register_s": registered, "register_ctl_cpu_s": reg_cpu, "idle_cpu_pct": idle, "tasks_per_s": rate,
                "ctl_cpu_us_per_task": cpu_us, "latency_p50_ms": statistics.median(lat) * 1e3,
                "rss_MB": ctl.memory_info().rss / 1e6}
    finally:
        for other in others:
            other.close()
        if rc is not None:
            rc.close()
        cluster.stop()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> None:
    """``python -m ipylb.bench.swarm [--engines 1000] [--small 8] [--tasks 4000] [--rounds 3]``."""
    p = argparse.ArgumentParser(prog="python -m ipylb.bench.swarm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=1000, help="identities of the large swarm")
    p.add_argument("--small", type=int, default=8, help="identities of the reference swarm")
    p.add_argument("--tasks", type=int, default=4000, help="no-op tasks per map")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    p.add_argument("--listeners", type=int, default=1,
                   help="clients connected while the swarm registers (at least 1)")
    p.add_argument("--serve", nargs=2, type=int, metavar=("COUNT", "FIRST"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(json.loads(sys.stdin.read()), *args.serve)
        return
    res: dict[int, list[dict[str, float]]] = {args.small: [], args.engines: []}
    for r in range(args.rounds):
        order = [args.small, args.engines] if r % 2 == 0 else [args.engines, args.small]
        for n in order:
            fig = measure(n, args.tasks, listeners=max(1, args.listeners))
            res[n].append(fig)
            print(f"round {r + 1}, {n} engines: " + ", ".join(f"{k} {v:.4g}" for k, v in fig.items()),
                  flush=True)
    keys = list(res[args.small][0])
    print(f"\nmedians of {args.rounds} round(s) (load average {os.getloadavg()[0]:.1f}):")
    width = {k: max(12, len(k) + 2) for k in keys}
    print(f"{'engines':>8}" + "".join(f"{k:>{width[k]}}" for k in keys))
    for n, figs in res.items():
        print(f"{n:>8}" + "".join(f"{statistics.median(f[k] for f in figs):>{width[k]}.4g}"
                                  for k in keys))
    small = statistics.median(f["tasks_per_s"] for f in res[args.small])
    large = statistics.median(f["tasks_per_s"] for f in res[args.engines])
    print(f"tasks/s at {args.engines} engines / at {args.small}: {large / small:.2f}")


if __name__ == "__main__":
    main()
