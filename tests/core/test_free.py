"""The free-engine index (core/free.py): each scheme's pick, by its rule, without a scan.

Driven with stand-in engine records (the index reads ``alive``, ``load``, ``key``):
random operation sequences checked against the list-based rule of
:mod:`ipylb.core.schemes` (exactly for lru and leastload; in distribution for
the schemes that draw).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from ipylb.core import schemes
from ipylb.core.free import FreeEngines


class Eng:
    def __init__(self, i: int, key: int) -> None:
        self.id, self.key, self.load, self.alive, self.pos = i, key, 0, True, -1
        self.held = False  # (hwm="auto": held engines are never free)

    def __repr__(self) -> str:
        return f"<{self.id} load={self.load} key={self.key}>"


class Pool:
    """Engines plus a FreeEngines, changed the way the scheduler changes them."""

    def __init__(self, scheme: str, cap: int, n: int) -> None:
        self.idx = FreeEngines(scheme, cap)
        self.cap = cap
        self.stamp = 0
        self.engines = []
        for i in range(n):
            self.add(i)

    def add(self, i: int) -> Eng:
        e = Eng(i, -10**9 + i)
        self.engines.append(e)
        self.idx.registered(e)
        return e

    def assign(self, e: Eng) -> None:
        e.load += 1
        self.stamp += 1
        e.key = self.stamp
        self.idx.update(e)

    def release(self, e: Eng) -> None:
        e.load -= 1
        self.idx.update(e)

    def remove(self, e: Eng) -> None:
        e.alive = False
        self.engines.remove(e)
        self.idx.unregistered(e)

    def lru_free(self) -> list[Eng]:
        return sorted((e for e in self.engines if e.load < self.cap), key=lambda e: e.key)

    def churn(self, rng: random.Random, steps: int, pick: bool = True) -> None:
        """Random assignments (through the index's pick), releases, arrivals, departures."""
        for _ in range(steps):
            r = rng.random()
            busy = [e for e in self.engines if e.load]
            if r < 0.5 and pick:
                e = self.idx.pick(rng)
                if e is not None:
                    self.assign(e)
            elif r < 0.9 and busy:
                self.release(rng.choice(busy))
            elif r < 0.95:
                self.add(len(self.engines) + 1000 + rng.randrange(10**6))
            elif len(self.engines) > 1:
                self.remove(rng.choice(self.engines))
            assert self.idx.check(sorted(self.engines, key=lambda e: e.key)) is None


@pytest.mark.parametrize("scheme,cap", [("lru", 1), ("lru", 3), ("leastload", 1),
                                        ("leastload", 3), ("leastload", 1 << 62)])
def test_lru_and_leastload_pick_exactly_what_the_list_rule_picks(scheme, cap):
    rng = random.Random(5)
    p = Pool(scheme, cap, 12)
    rule = schemes.get(scheme)
    for _ in range(3000):
        free = p.lru_free()
        want = free[rule([e.load for e in free], rng)] if free else None
        assert p.idx.pick(rng) is want
        p.churn(rng, 1, pick=False)
        if free and rng.random() < 0.6:
            p.assign(want)


@pytest.mark.parametrize("scheme", ["plainrandom", "twobin", "weighted"])
@pytest.mark.parametrize("cap", [1, 2, 1 << 62])
def test_random_schemes_stay_consistent_under_churn(scheme, cap):
    p = Pool(scheme, cap, 9)
    p.churn(random.Random(cap), 2000)  # check() after every step: list, positions, weights


def rank_counts(scheme: str, loads: list[int], draws: int, seed: int = 1) -> Counter:
    """How often each LRU rank of engines with these loads (rank 0 = LRU) is picked."""
    p = Pool(scheme, 1 << 62, 0)
    for i, load in enumerate(loads):
        e = p.add(i)
        for _ in range(load):
            p.assign(e)
    order = p.lru_free()
    rng = random.Random(seed)
    return Counter(order.index(p.idx.pick(rng)) for _ in range(draws))


def test_plainrandom_is_uniform():
    counts = rank_counts("plainrandom", [0] * 4, 8000)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 1700


def test_twobin_picks_the_less_recently_used_of_two_distinct_draws():
    counts = rank_counts("twobin", [0] * 4, 12000)
    # min of two distinct uniform ranks of 4: P(0)=1/2, P(1)=1/3, P(2)=1/6, P(3)=0
    assert counts[3] == 0
    for rank, p in ((0, 1 / 2), (1, 1 / 3), (2, 1 / 6)):
        assert abs(counts[rank] / 12000 - p) < 0.02


def test_weighted_draws_by_one_over_load_plus_one_and_keeps_the_lighter():
    # loads 0 and 3 (weights 1 and 1/4): P(light drawn at least once) = 1 - (1/5)^2
    p = Pool("weighted", 1 << 62, 0)
    idle, busy = p.add(0), p.add(1)
    for _ in range(3):
        p.assign(busy)
    rng = random.Random(2)
    got = Counter(p.idx.pick(rng) is idle for _ in range(20000))
    assert abs(got[True] / 20000 - (1 - (1 / 5) ** 2)) < 0.01


def test_the_heap_stays_proportional_to_the_engines():
    p = Pool("leastload", 1 << 62, 50)
    rng = random.Random(3)
    for _ in range(20000):
        e = rng.choice(p.engines)
        p.assign(e)
        p.release(e)
    assert len(p.idx._heap) <= 2 * 50 + 64
