"""``ipylb top [--profile P]``: the dashboard's figures live in a terminal (rich's Live
display): queue depth, throughput, the engines (host, pid, state, CPU %, RSS, restarts,
current task and how long it has run), and the failures of the last minute.  ``q`` quits
(Ctrl-C too).  One ``Client.activity()`` round trip per refresh, as the notebook panel;
beyond :data:`MAX_ROWS` engines the controller describes the busiest and sums the rest
(``activity(top=...)``), so a refresh costs the same at 20 engines or 1,000.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .cli import HelpFormatter

# Refreshes per second, engine rows shown (the busiest; the rest summed in one row), and
# failures listed.
INTERVAL_S = 0.5
MAX_ROWS = 20
FAILURES_SHOWN = 8
WINDOW_S = 60


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipylb top", description="the cluster live in this terminal; q quits",
        formatter_class=HelpFormatter)
    p.add_argument("--profile", default="default", help="which cluster")
    p.add_argument("--interval", type=float, default=INTERVAL_S,
                   help="seconds between refreshes")
    return p


class Top:
    """What ``ipylb top`` keeps between refreshes and how it draws them."""

    def __init__(self, client: Any, profile: str) -> None:
        self.client = client
        self.profile = profile
        self.seq = 0
        self.second = 0
        self.buckets: dict[int, dict[int, list[Any]]] = {}
        self.failures: deque[tuple[int | None, str, float]] = deque(maxlen=FAILURES_SHOWN)
        self.problem = ""

    def poll(self) -> dict[str, Any] | None:
        """One activity round trip (None if the controller did not answer)."""
        try:
            act = self.client.activity(self.seq, self.second, timeout=5.0, top=MAX_ROWS)
        except TimeoutError:
            self.problem = "the controller is not answering"
            return None
        self.problem = ""
        self.seq = act["seq"]
        self.second = int(act["now"]) - 1
        rest = act.get("rest")
        if rest is not None:  # beyond MAX_ROWS engines: whole-window buckets, the rest summed
            self.buckets = {eid: {b[0]: b for b in bs} for eid, bs in act["buckets"].items()}
            self.buckets[-1] = {b[0]: b for b in rest["buckets"]}
        else:
            for eid, bs in act["buckets"].items():
                mine = self.buckets.setdefault(eid, {})
                for b in bs:
                    mine[b[0]] = b
            self.buckets.pop(-1, None)
        for eid, _start, end, ok, key in act["tasks"]:
            if not ok:
                self.failures.append((eid, key, end))
        return act

    def render(self, act: dict[str, Any] | None) -> Group:
        """The screen: a summary line, the engine table, recent failures."""
        if act is None:
            return Group(Text(f"ipylb top · profile {self.profile} · {self.problem}",
                              style="bold red"))
        now = act["now"]
        recent = [b for mine in self.buckets.values() for s, b in mine.items()
                  if s >= now - 10]
        rate = sum(b[1] for b in recent) / 10.0
        status = act["status"]
        engines = act["engines"]
        rest = act.get("rest") or {"engines": 0, "busy": 0, "outstanding": 0, "completed": 0}
        busy = sum(1 for e in status if isinstance(e, int) and status[e]["tasks"]) + rest["busy"]
        head = Text.assemble(
            ("ipylb top", "bold"), f" · profile {self.profile} · queue depth ",
            (str(status.get("unassigned", 0)), "bold"), " · engines ",
            (f"{len(engines) + rest['engines']}", "bold"), f" ({busy} busy) · throughput ",
            (f"{rate:.1f}", "bold"), " tasks/s (last 10 s) · q quits")
        table = Table(expand=False, header_style="bold")
        for col in ("engine", "host", "pid", "state", "CPU %", "RSS MB", "restarts", "task",
                    "running for", "outstanding", "done"):
            table.add_column(col, justify="left" if col in ("host", "task", "state") else "right")
        rows = sorted(engines, key=lambda e: (-status.get(e, {}).get("tasks", 0),
                                              -status.get(e, {}).get("queue", 0), e))
        for eid in rows[:MAX_ROWS]:
            e, s = engines[eid], status.get(eid, {"tasks": 0, "queue": 0, "completed": 0})
            task = e.get("task")
            ran = "" if not task or task[2] is None else f"{max(0.0, now - task[2]):.1f} s"
            table.add_row(
                str(eid), e["host"], str(e["pid"]),
                "busy" if s["tasks"] else "idle",
                "–" if e["cpu"] is None else f"{e['cpu']:.0f}",
                "–" if e["rss"] is None else f"{e['rss'] / 2**20:.0f}",
                str(e["restarts"]), task[1] if task else "", ran,
                str(s["tasks"] + s["queue"]), str(s["completed"]),
                style="bold blue" if s["tasks"] else None)
        hidden = rows[MAX_ROWS:]  # (and the engines the controller summed)
        if hidden or rest["engines"]:
            table.add_row(
                f"+{len(hidden) + rest['engines']}", "", "",
                f"{sum(status[e]['tasks'] > 0 for e in hidden) + rest['busy']} busy",
                "", "", "", "", "",
                str(sum(status[e]["tasks"] + status[e]["queue"] for e in hidden)
                    + rest["outstanding"]),
                str(sum(status[e]["completed"] for e in hidden) + rest["completed"]))
        fails = Table(title="failures (last minute)", title_justify="left", header_style="bold")
        for col in ("engine", "task", "ago"):
            fails.add_column(col)
        for eid, key, end in reversed(self.failures):
            if now - end <= WINDOW_S:
                fails.add_row("–" if eid is None else str(eid), key, f"{now - end:.0f} s")
        return Group(head, table, fails if fails.row_count else Text("no failures in the last minute"))


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """stdin in cbreak mode (keys arrive one at a time) while it is a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def main(argv: list[str]) -> int:
    """``ipylb top``: returns the exit status (1: no cluster for that profile)."""
    from .client.client import Client
    from .error import ControllerGone, NoCluster

    args = _parser().parse_args(argv)
    try:
        rc = Client(profile=args.profile)
    except (NoCluster, OSError, TimeoutError) as e:
        sys.stderr.write(f"ipylb top: no cluster for profile {args.profile!r}: {e}\n"
                         f"start one with `ipylb cluster start -n 4 --profile {args.profile}`\n")
        return 1
    top = Top(rc, args.profile)
    try:
        with _keys() as fd, Live(top.render(top.poll()), auto_refresh=False,
                                 screen=False) as live:
            while True:
                if fd is not None:
                    ready, _, _ = select.select([fd], [], [], args.interval)
                    if ready and os.read(fd, 1) in (b"q", b"Q"):
                        break
                else:
                    time.sleep(args.interval)
                try:
                    live.update(top.render(top.poll()), refresh=True)
                except ControllerGone as e:
                    live.update(Text(f"ipylb top: the cluster is gone: {e}", style="bold red"),
                                refresh=True)
                    return 1
    except KeyboardInterrupt:
        pass
    finally:
        rc.close()
    return 0
