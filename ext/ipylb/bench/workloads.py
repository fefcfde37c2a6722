"""Task functions the benchmarks run: importable, so both farms pickle them by reference."""

from __future__ import annotations

import time
from typing import Any


def noop() -> None:
    """The cheapest task: measures pure per-task overhead."""


def noop_n(_: Any) -> None:
    """A no-op taking one argument (for ``map``-style warm-ups)."""


def echo(x: Any) -> Any:
    """Send a value there and back."""
    return x


def sleep(seconds: float) -> float:
    """A task of known duration (heterogeneous workloads)."""
    time.sleep(seconds)
    return seconds
