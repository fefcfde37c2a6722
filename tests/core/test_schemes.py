"""Routing schemes: pure functions from candidate loads (LRU order) to an index."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from ipylb.core import schemes


@pytest.mark.parametrize("name", sorted(schemes.SCHEMES))
def test_every_scheme_returns_a_valid_index(name):
    fn = schemes.get(name)
    rng = random.Random(1)
    for n in range(1, 8):
        for _ in range(50):
            loads = [rng.randrange(4) for _ in range(n)]
            assert 0 <= fn(loads, rng) < n


def test_lru_is_the_first_candidate():
    assert schemes.lru([5, 0, 0], random.Random(0)) == 0


def test_leastload_picks_fewest_and_breaks_ties_by_lru():
    assert schemes.leastload([2, 1, 3], random.Random(0)) == 1
    assert schemes.leastload([2, 1, 1], random.Random(0)) == 1  # index 1 is less recently used


def test_plainrandom_reaches_every_candidate_evenly():
    rng = random.Random(2)
    counts = Counter(schemes.plainrandom([0] * 4, rng) for _ in range(4000))
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 800


def test_twobin_returns_the_lru_of_two_distinct_draws():
    rng = random.Random(3)
    counts = Counter(schemes.twobin([0] * 4, rng) for _ in range(6000))
    # min of two distinct uniform draws from 4: P(0)=1/2, P(1)=1/3, P(2)=1/6, P(3)=0
    assert counts[3] == 0
    assert counts[0] > counts[1] > counts[2] > 0
    assert schemes.twobin([7], rng) == 0


def test_weighted_prefers_light_engines_but_not_only_them():
    rng = random.Random(4)
    counts = Counter(schemes.weighted([0, 9, 9, 9], rng) for _ in range(3000))
    assert counts[0] > 2000
    assert sum(counts[i] for i in (1, 2, 3)) > 0  # two busy draws can still happen


class _Draws:
    """A stand-in rng whose draws are fixed, to test the choice made from them."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def choices(self, population, weights, k):
        return [self.draws.pop(0) for _ in range(k)]

    def randrange(self, n):
        return self.draws.pop(0)


def test_weighted_keeps_the_less_loaded_of_its_two_draws():
    assert schemes.weighted([3, 1, 2], _Draws(0, 2)) == 2
    assert schemes.weighted([3, 1, 2], _Draws(1, 0)) == 1
    assert schemes.weighted([1, 1, 2], _Draws(1, 0)) == 0  # tie: the less recently used


def test_twobin_keeps_the_less_recently_used_of_its_two_draws():
    # draws a=2, then b from the 3 others: 0 stays 0
    assert schemes.twobin([0, 0, 0, 0], _Draws(2, 0)) == 0
    # a=1, b=1 -> shifted past a to 2: the LRU of (1, 2) is 1
    assert schemes.twobin([0, 0, 0, 0], _Draws(1, 1)) == 1


def test_unknown_and_pure_schemes_are_value_errors():
    with pytest.raises(ValueError, match="unknown scheme 'fastest'"):
        schemes.get("fastest")
    with pytest.raises(ValueError, match="pure"):
        schemes.get("pure")
