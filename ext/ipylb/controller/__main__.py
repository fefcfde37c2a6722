"""``python -m ipylb.controller``: run a controller and the engines it launches.

The embedded ``Client(engines=N)`` and ``ipylb cluster start`` both run this.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import connection, wire
from .hub import Controller, stop_on_signals
from .launcher import EngineLauncher


def main(argv: list[str] | None = None) -> None:
    """Start the controller, write the connection file, launch engines, serve."""
    p = argparse.ArgumentParser(prog="python -m ipylb.controller")
    p.add_argument("--connection-file", required=True)
    p.add_argument("--engines", "-n", type=int, default=0)
    p.add_argument("--scheme", default="leastload")
    p.add_argument("--hwm", type=int, default=1)
    p.add_argument("--ip", default="127.0.0.1")
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="[ipylb controller %(levelname)s] %(message)s")

    key = wire.new_key()
    launcher = EngineLauncher(args.connection_file)
    ctl = Controller(key, ip=args.ip, scheme=args.scheme, hwm=args.hwm,
                     launcher=launcher, parent_pid=args.parent_pid)
    info = {
        "key": key.decode(), "client_url": ctl.client_url, "engine_url": ctl.engine_url,
        "pid": os.getpid(), "scheme": args.scheme, "hwm": args.hwm,
    }
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
    try:
        ctl.run()
    finally:
        try:
            os.unlink(args.connection_file)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    main()
