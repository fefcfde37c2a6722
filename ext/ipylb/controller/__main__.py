"""``python -m ipylb.controller``: run a controller and the engines it launches.

The embedded ``Client(engines=N)`` and ``ipylb cluster start`` both run this.
With ``--parent-pid`` it lives only as long as that process (a private cluster);
without, it serves until asked to stop (a standalone cluster).  Either way it
stops its engines when it stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import zmq

from .. import connection, limits, wire
from ..connection import KERNEL_NAME
from ..core.pipeline import DEFAULT_HWM, parse_hwm
from ..error import NoCluster
from .gcpolicy import GCPolicy
from .hub import FORGET_AFTER_S, MAX_FRAME_BYTES, Controller, stop_on_signals
from .launcher import EngineLauncher
from .records import TaskDB, TaskStore


def main(argv: list[str] | None = None) -> None:
    """Start the controller, write the connection file, launch engines, serve."""
    p = argparse.ArgumentParser(prog="python -m ipylb.controller")
    p.add_argument("--connection-file", required=True)
    p.add_argument("--engines", "-n", type=int, default=0)
    p.add_argument("--scheme", default="leastload")
    p.add_argument("--hwm", type=parse_hwm, default=DEFAULT_HWM,
                   help="max outstanding tasks per engine, 0: no limit, auto: adaptive with "
                        f"stealing (default {DEFAULT_HWM})")
    p.add_argument("--ip", default="127.0.0.1")
    p.add_argument("--location", default=None,
                   help="host name or address other hosts reach this one at (default: "
                        "this host's routable address when --ip is 0.0.0.0 or ::)")
    p.add_argument("--client-port", type=int, default=0, help="0: any free port")
    p.add_argument("--engine-port", type=int, default=0, help="0: any free port")
    p.add_argument("--kernel", default=None,
                   help="the kernelspec engines are started from (any provisioner)")
    p.add_argument("--curve", action="store_true",
                   help="encrypt the controller's sockets with CurveZMQ")
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--db-file", default=None,
                   help="keep finished task records in this SQLite file (they survive restarts)")
    p.add_argument("--store-limit-mb", type=int, default=1024,
                   help="memory for finished task records before the oldest are dropped")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds of heartbeat silence after which an engine counts as dead")
    limits.add_fault_options(p)
    p.add_argument("--max-frame-mb", type=int, default=MAX_FRAME_BYTES >> 20,
                   help="the largest frame a peer may send, in MiB (a larger one disconnects it)")
    p.add_argument("--forget-after", type=float, default=FORGET_AFTER_S,
                   help="seconds after which a silent client's (or engine's) state is dropped")
    args = p.parse_args(argv)
    try:
        limits.check_engine_count(args.engines, "--engines", minimum=0)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=args.log_level, format="[ipylb controller %(levelname)s] %(message)s")

    swept = connection.sweep_leftovers()  # what killed clusters and engines left behind
    if swept:
        logging.getLogger("ipylb.controller").info("removed stale runtime files: %s", swept)
    db = TaskDB(args.db_file) if args.db_file else None
    key = db.key(wire.new_key()) if db is not None else wire.new_key()
    launcher = EngineLauncher(args.connection_file, kernel_name=args.kernel or KERNEL_NAME,
                              restart=args.restart,
                              restart_limit=args.restart_limit,
                              stable_start_time=args.restart_stable, curve=args.curve)
    try:
        ctl = Controller(key, ip=args.ip, scheme=args.scheme, hwm=args.hwm,
                         launcher=launcher, parent_pid=args.parent_pid,
                         heartbeat_timeout=args.heartbeat_timeout,
                         walltime_grace=args.walltime_grace,
                         store=TaskStore(args.store_limit_mb << 20, db),
                         location=args.location, curve=args.curve,
                         ports=(args.client_port, args.engine_port),
                         max_frame_bytes=args.max_frame_mb << 20, forget_after=args.forget_after)
    except (ValueError, zmq.ZMQError) as e:  # unknown scheme, an --ip not on this machine
        print(f"error: {e}", flush=True)
        sys.exit(1)
    info = {
        "key": key.decode(), "controller_id": ctl.ident.decode(), "client_url": ctl.client_url, "engine_url": ctl.engine_url,
        "pid": os.getpid(), "scheme": args.scheme, "hwm": ctl.hwm,
        "shm_domain": ctl.shm_domain, "shm_prefix": ctl.shm_prefix,
        "db": "sqlite" if db is not None else "memory",  # what survives it (clients say so)
        "max_frame_bytes": ctl.max_frame_bytes,  # clients and engines check before sending
        "forget_after": ctl.forget_after,  # clients ping well within it
    }
    if ctl.curve_public is not None:
        info["curve_serverkey"] = ctl.curve_public.decode()
    elif not connection.is_loopback(args.ip):
        logging.getLogger("ipylb.controller").warning(
            "listening on %s without --curve: every message is authenticated (HMAC under the "
            "cluster key) but travels unencrypted; start the cluster with --curve on networks "
            "others can read", args.ip)
    connection.write(args.connection_file, info)
    stop_on_signals(ctl)
    try:
        launcher.start(args.engines)
    except Exception as e:
        print(f"error: {e}", flush=True)
        ctl.close()
        os.unlink(args.connection_file)
        sys.exit(1)
    # One line on stdout tells the launching process we are ready; then stdout is not used.
    print("ready", flush=True)
    # Long-lived records: full collections skip what survived one (and the set-up, now).
    GCPolicy().install(freeze_now=True)
    try:
        ctl.run()
    finally:
        _remove_if_ours(args.connection_file)


def _remove_if_ours(path: str) -> None:
    """Remove our connection file, unless a newer cluster has already replaced it."""
    try:
        if connection.read(path).get("pid") == os.getpid():
            os.unlink(path)
    except (NoCluster, FileNotFoundError):
        pass


if __name__ == "__main__":
    main()
