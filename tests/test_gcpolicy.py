"""The controller process's GC policy (issue 14 item 5): survivors of a full collection are
frozen (later collections skip them), and thawed every ``thaw_every`` seconds so that cyclic
garbage involving them is still found."""

from __future__ import annotations

import gc
import weakref

import pytest
from ipylb.controller.gcpolicy import GCPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def clock():
    clock = Clock()
    policy = GCPolicy(thaw_every=60.0, clock=clock).install()
    yield clock, policy
    policy.uninstall()


def _tracked(obj: object) -> bool:
    """Whether the collector's generations hold ``obj`` (frozen objects are in none)."""
    return any(o is obj for o in gc.get_objects())


def test_survivors_of_a_full_collection_are_frozen_and_skipped(clock):
    _, policy = clock
    kept = Node()
    assert _tracked(kept)
    before = policy.stats()["full_collections"]
    gc.collect()
    assert gc.get_freeze_count() > 0 and not _tracked(kept)  # frozen: no collection walks it
    young = Node()  # made after the freeze: collected as usual
    assert _tracked(young)
    stats = policy.stats()
    assert stats["frozen"] == gc.get_freeze_count() and stats["full_collections"] == before + 1
    assert stats["policy"] == GCPolicy.NAME


def test_frozen_objects_dropped_are_still_freed_by_reference_counting(clock):
    kept = Node()
    gc.collect()
    gone = weakref.ref(kept)
    del kept
    assert gone() is None


def test_a_cycle_among_frozen_objects_is_collected_after_the_thaw(clock):
    clock_, policy = clock
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect()  # a and b are live: frozen
    gone = weakref.ref(a)
    del a, b  # now cyclic garbage, but frozen: full collections skip it
    gc.collect()
    assert gone() is not None and policy.thaws == 0
    clock_.now = 60.0  # thaw_every later: this collection thaws instead of freezing
    gc.collect()
    assert policy.thaws == 1 and gc.get_freeze_count() == 0
    gc.collect()  # walks everything once: the cycle is found
    assert gone() is None
    assert gc.get_freeze_count() > 0  # ... and the survivors are frozen again


def test_freeze_now_freezes_what_exists_at_install():
    kept = Node()
    policy = GCPolicy().install(freeze_now=True)
    try:
        assert not _tracked(kept) and gc.get_freeze_count() > 0
    finally:
        policy.uninstall()
    assert _tracked(kept) and GCPolicy.default_stats()["policy"] == "default"


def test_one_policy_per_process_and_uninstall_thaws_everything(clock):
    _, policy = clock
    assert GCPolicy.installed() is policy
    with pytest.raises(RuntimeError, match="already installed"):
        GCPolicy().install()
    gc.collect()
    assert gc.get_freeze_count() > 0
    policy.uninstall()
    assert gc.get_freeze_count() == 0 and GCPolicy.installed() is None
    assert policy._after not in gc.callbacks
    policy.uninstall()  # twice is harmless (the fixture does it again)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_thaw_every_must_be_positive(bad):
    with pytest.raises(ValueError, match="thaw_every must be a positive number of seconds"):
        GCPolicy(thaw_every=bad)


def _noop():
    return None


def test_a_controller_process_runs_under_the_policy_and_counts_its_messages(rc, view):
    # The controller a Client starts (python -m ipylb.controller) installs the policy and
    # freezes its set-up at once; rc.controller_stats() is the public way to see both.
    stats = rc.controller_stats()
    assert stats["gc"]["policy"] == GCPolicy.NAME
    assert stats["gc"]["frozen"] > 10_000  # its modules, classes, functions at least
    assert stats["gc"]["thaw_every_s"] == 600.0
    assert stats["messages"]["register"] >= len(rc.ids)  # (more if a test restarted one)
    assert stats["messages_received"] == sum(stats["messages"].values())
    before = stats["messages"]
    assert view.apply_sync(_noop) is None
    after = rc.controller_stats()["messages"]
    assert after["submit"] == before.get("submit", 0) + 1  # a lone apply_sync: one message
    done = sum(after.get(k, 0) - before.get(k, 0) for k in ("done", "dones"))
    assert done == 1
    assert after["request"] >= before["request"] + 1  # the first controller_stats() (+ pings)
