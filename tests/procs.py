"""Shared by the tests that run the installed ``ipylb`` command as a user would, and
that check every process of a cluster is gone afterwards."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from ipylb.connection import pid_alive

__all__ = ["IPYLB", "ipylb_cmd", "pid_alive", "wait_gone"]

IPYLB = str(Path(sys.executable).with_name("ipylb"))


def ipylb_cmd(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``ipylb ARGS`` with no stdin; its output captured as text; ``timeout`` seconds."""
    return subprocess.run([IPYLB, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def wait_gone(pids: Iterable[int], timeout: float = 10) -> bool:
    """Whether every process of ``pids`` has ended (zombies count as ended) within
    ``timeout`` seconds.  They are not our children, so there is no exit event to wait on:
    this polls /proc every 50 ms."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
