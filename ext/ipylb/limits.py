"""The one rule for engine counts, wherever one is given: ``Client(engines=N)``,
``ipylb cluster start -n N``, ``%lb_start -n N``, ``ipylb engine add -n N`` (and the
controller, which checks again what a client asks of it).

Each engine is a kernel process (tens of MB, a second or so of CPU to start), so
a count far above the machine's CPUs is almost always a typo: more than
``WARN_PER_CPU`` engines per CPU draws a warning, more than ``MAX_ENGINES`` is
refused.  Also the start-up progress line (``12/64 engines up``) shown while
many engines start, and the options that limit engine restarts and walltime kills.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

# More engines than this are refused, however many CPUs (one controller, one machine).
MAX_ENGINES = 1024
# More than this many engines per CPU draws a warning.
WARN_PER_CPU = 4
# Start-up progress appears once waiting for engines has taken this long (seconds).
PROGRESS_AFTER_S = 3.0


def check_engine_count(n: object, option: str = "engines", minimum: int = 1) -> str | None:
    """Validate an engine count; return a warning to show (or None).

    ``option`` names the argument as the user wrote it (``engines``, ``-n``), for the
    messages.  Raises ``ValueError`` unless ``n`` is an int from ``minimum`` (1, or 0 for
    a cluster that starts empty) to ``MAX_ENGINES``.  The warning is for more than
    ``WARN_PER_CPU`` times ``os.cpu_count()`` engines; the caller shows it its own way
    (``warnings.warn`` in Python, a line on stderr in the CLI).
    """
    if type(n) is not int or not minimum <= n <= MAX_ENGINES:
        raise ValueError(f"{option} must be an int from {minimum} to {MAX_ENGINES}, got {n!r}")
    cpus = os.cpu_count() or 1
    if n <= WARN_PER_CPU * cpus:
        return None
    return (f"{option}={n}: {n} engine kernels on a machine with {cpus} CPU(s). Each engine is "
            f"a process of its own; more than {WARN_PER_CPU} per CPU rarely helps and may "
            "exhaust memory.")


def progress_enabled() -> bool:
    """Whether progress lines are shown (``IPYLB_PROGRESS=0`` turns them off)."""
    return os.environ.get("IPYLB_PROGRESS", "1") != "0"


class StartProgress:
    """``ipylb: 12/64 engines up`` on stderr once a start has lasted ``PROGRESS_AFTER_S``
    (a quick start shows nothing): rewritten in place on a terminal or in a notebook,
    elsewhere (a log) a line each time the count changes."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.t0 = time.monotonic()
        self.shown = -1  # the count last shown
        self.enabled = progress_enabled()
        err = sys.stderr
        self.in_place = type(err).__name__ == "OutStream" or getattr(err, "isatty", bool)()

    def update(self, up: int) -> None:
        """Show ``up`` of ``total`` engines registered (if the wait has lasted long enough)."""
        up = min(up, self.total)
        if not self.enabled or up == self.shown or (
                self.shown < 0 and time.monotonic() - self.t0 < PROGRESS_AFTER_S):
            return
        self.shown = up
        text = f"ipylb: {up}/{self.total} engines up"
        sys.stderr.write(f"\r{text}" if self.in_place else f"{text}\n")
        sys.stderr.flush()

    def done(self, up: int) -> None:
        """Show the final count and end the line, if anything was shown."""
        if self.shown >= 0:
            self.update(up)
            if self.in_place:
                sys.stderr.write("\n")
                sys.stderr.flush()


# -- engine restarts and walltime kills: the options of `ipylb cluster start` and of the
# controller (`python -m ipylb.controller`), defined once.  The defaults are jupyter_client's
# KernelRestarter's (restart_limit, stable_start_time) and API.md's grace period.
RESTART_LIMIT = 5
RESTART_STABLE_S = 10.0
WALLTIME_GRACE_S = 5.0


def _at_least_zero(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_fault_options(p: argparse.ArgumentParser) -> None:
    """Add --no-restart, --restart-limit, --restart-stable and --walltime-grace to ``p``."""
    p.add_argument("--no-restart", dest="restart", action="store_false",
                   help="leave an engine whose kernel died down (default: restart it through "
                        "jupyter_client, at most --restart-limit times in a row)")
    p.add_argument("--restart-limit", type=_at_least_zero(int), default=RESTART_LIMIT,
                   help="restarts in a row (each within --restart-stable seconds of the last "
                        "death) after which an engine slot stays down (default: %(default)s)")
    p.add_argument("--restart-stable", type=_at_least_zero(float), default=RESTART_STABLE_S,
                   help="seconds a restarted kernel must live for its restart to count as a "
                        "success (default: %(default)s)")
    p.add_argument("--walltime-grace", type=_at_least_zero(float), default=WALLTIME_GRACE_S,
                   help="seconds between a walltime interrupt and the restart of an engine "
                        "whose task ignores it (default: %(default)s)")


def fault_argv(args: argparse.Namespace) -> list[str]:
    """The options :func:`add_fault_options` parsed into ``args``, as a command line again."""
    return ["--restart-limit", str(args.restart_limit), "--restart-stable", str(args.restart_stable),
            "--walltime-grace", str(args.walltime_grace), *([] if args.restart else ["--no-restart"])]
