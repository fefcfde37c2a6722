"""Routing schemes: which of several free, eligible engines gets a task.

Each scheme is a tiny pure function ``scheme(loads, rng) -> index``.  The
scheduler passes the candidate engines' outstanding-task counts *in
least-recently-assigned order* (index 0 is the engine that got a task longest
ago), so "LRU" is simply "the lowest index", and ties broken by LRU fall out of
``min``/``index``.  The candidates are already filtered for dependencies,
exclusions and free slots, which is why every scheme supports dependencies.

``rng`` is the scheduler's own ``random.Random``, so runs are reproducible from a
seed.  The stdlib generator is used rather than numpy: for lists of a few dozen
engines it is several times faster per call.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

Scheme = Callable[[Sequence[int], random.Random], int]


def lru(loads: Sequence[int], rng: random.Random) -> int:
    """Least recently used: the engine that got a task longest ago (round-robin-like)."""
    return 0


def plainrandom(loads: Sequence[int], rng: random.Random) -> int:
    """Any candidate, uniformly at random."""
    return rng.randrange(len(loads))


def _two(n: int, rng: random.Random) -> tuple[int, int]:
    """Two distinct indices below ``n`` (n >= 2), uniformly."""
    a = rng.randrange(n)
    b = rng.randrange(n - 1)
    if b >= a:
        b += 1
    return a, b


def twobin(loads: Sequence[int], rng: random.Random) -> int:
    """Two candidates at random, then the less recently used of the two."""
    n = len(loads)
    if n < 2:
        return 0
    a, b = _two(n, rng)
    return a if a < b else b


def leastload(loads: Sequence[int], rng: random.Random) -> int:
    """Fewest outstanding tasks; among equals, the least recently used."""
    return loads.index(min(loads))


def weighted(loads: Sequence[int], rng: random.Random) -> int:
    """Two candidates drawn with weights 1/(load+1), then the less loaded of the two.

    Idle engines are the likeliest draws, yet a busy one can still be drawn, which
    spreads work without the herd effect of always picking the minimum.  Ties go to
    the less recently used.
    """
    n = len(loads)
    if n < 2:
        return 0
    weights = [1.0 / (load + 1) for load in loads]
    a, b = rng.choices(range(n), weights, k=2)
    if loads[a] != loads[b]:
        return a if loads[a] < loads[b] else b
    return a if a < b else b


SCHEMES: dict[str, Scheme] = {
    "lru": lru,
    "plainrandom": plainrandom,
    "twobin": twobin,
    "leastload": leastload,
    "weighted": weighted,
}


def get(name: str) -> Scheme:
    """The scheme called ``name``; ValueError names the valid ones otherwise.

    ``pure`` is not here: it bypasses the Python scheduler altogether.
    """
    try:
        return SCHEMES[name]
    except KeyError:
        if name == "pure":
            raise ValueError(
                "scheme 'pure' has no Python scheduler core: the shell routes tasks directly"
            ) from None
        raise ValueError(
            f"unknown scheme {name!r}: choose one of {', '.join(sorted(SCHEMES))}"
        ) from None
