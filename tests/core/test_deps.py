"""The pure dependency rules: set-based check/unreachable and the incremental Tally."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ipylb.core.deps import Tally, check, counts, rule, unreachable, wants
from ipylb.core.events import DepSpec

SWITCHES = [(True, False), (False, True), (True, True)]


def spec(ids, all=True, success=True, failure=False):
    return DepSpec(frozenset(ids), all, success, failure)


def test_empty_dependency_is_met_and_never_unreachable():
    for all_, (s, f) in itertools.product((True, False), SWITCHES):
        d = spec((), all_, s, f)
        assert check(d, set(), set())
        assert not unreachable(d, {"x"}, {"y"})


def test_default_all_success():
    d = spec({"a", "b"})
    assert not check(d, {"a"}, set())
    assert check(d, {"a", "b"}, set())
    assert not unreachable(d, {"a"}, set())
    assert unreachable(d, {"a"}, {"b"})  # one failed: all=True, success only


def test_any_success_unreachable_only_when_all_failed():
    d = spec({"a", "b"}, all=False)
    assert check(d, {"b"}, {"a"})
    assert not unreachable(d, set(), {"a"})
    assert unreachable(d, set(), {"a", "b"})


def test_failure_only_counts_failures():
    d = spec({"a"}, success=False, failure=True)
    assert check(d, set(), {"a"})
    assert not check(d, {"a"}, set())
    assert unreachable(d, {"a"}, set())  # it succeeded: can never have failed


def test_success_and_failure_never_unreachable():
    d = spec({"a", "b"}, all=True, success=True, failure=True)
    assert check(d, {"a"}, {"b"})
    assert not unreachable(d, {"a"}, {"b"})


def test_accepts_a_set_with_switches_like_the_client_dependency():
    class Dep(set):
        all, success, failure = False, True, False

    d = Dep({"a", "b"})
    assert check(d, {"a"}, set())
    assert unreachable(d, set(), {"a", "b"})


def test_ids_outside_the_dependency_do_not_matter():
    d = spec({"a"})
    assert not check(d, {"b"}, set())
    assert not unreachable(d, set(), {"b"})


def test_words():
    assert rule(spec({"a"})) == "all=True, success=True, failure=False"
    assert wants(spec({"a"})) == "succeed"
    assert wants(spec({"a"}, success=False, failure=True)) == "fail"
    assert wants(spec({"a"}, failure=True)) == "finish"
    assert counts(spec({"a"}), True) and not counts(spec({"a"}), False)


@pytest.mark.parametrize("all_", [True, False])
@pytest.mark.parametrize("switches", SWITCHES)
def test_tally_agrees_with_sets_for_every_outcome_assignment(all_, switches):
    ids = ["a", "b", "c"]
    d = spec(ids, all_, *switches)
    # each id: pending, succeeded or failed
    for outcome in itertools.product((None, True, False), repeat=len(ids)):
        ok = {i for i, o in zip(ids, outcome, strict=True) if o is True}
        bad = {i for i, o in zip(ids, outcome, strict=True) if o is False}
        tally = Tally(d)
        for o in outcome:
            if o is not None:
                tally.add(counts(d, o))
        assert tally.met == check(d, ok, bad), outcome
        assert tally.dead == unreachable(d, ok, bad), outcome
        assert tally.pending == outcome.count(None)


@given(
    n=st.integers(1, 6),
    all_=st.booleans(),
    switches=st.sampled_from(SWITCHES),
    data=st.data(),
)
def test_met_and_unreachable_are_exclusive_and_final(n, all_, switches, data):
    """Met and unreachable never hold together, and finishing more ids never undoes either."""
    ids = [f"t{i}" for i in range(n)]
    d = spec(ids, all_, *switches)
    order = data.draw(st.permutations(ids))
    outcomes = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    ok: set[str] = set()
    bad: set[str] = set()
    was_met = was_dead = False
    for i, o in zip(order, outcomes, strict=True):
        (ok if o else bad).add(i)
        met, dead = check(d, ok, bad), unreachable(d, ok, bad)
        assert not (met and dead)
        assert met or not was_met
        assert dead or not was_dead
        was_met, was_dead = met, dead
    assert was_met or was_dead  # once everything finished, one of them holds
