"""``map(..., chunksize="auto")``: chunks sized from the measured item time (real engines)."""

from __future__ import annotations

import re
import time

import pytest
from ipylb.client import autochunk
from ipylb.error import CompositeError, RemoteError, SerializationError


def double(x):
    return 2 * x


def nap(x):
    time.sleep(x)
    return x


def inverse(x):
    return 1 / x


def test_chunk_for_hides_overhead_and_keeps_engines_busy_to_the_end():
    # A no-op: capped so that each engine still gets CHUNKS_PER_ENGINE chunks.
    assert autochunk.chunk_for(1e-6, 200_000, 2) == 200_000 // (2 * autochunk.CHUNKS_PER_ENGINE)
    # 10 ms items: 20 per chunk make the 0.2 s target.
    assert autochunk.chunk_for(0.01, 10_000, 2) == round(autochunk.TARGET_S / 0.01)
    # Slow items, or none back in time: one per chunk, as chunksize=1.
    assert autochunk.chunk_for(1.0, 100, 2) == 1
    assert autochunk.chunk_for(None, 100, 2) == 1
    assert autochunk.chunk_for(1e-6, 3, 4) == 1


def test_trivial_items_travel_in_big_chunks(view):
    view.map_sync(double, range(4))  # engines warm: the probes time the items, not imports
    ar = view.map_async(double, range(20_000), chunksize="auto")
    assert ar.get(120) == [2 * x for x in range(20_000)]
    assert len(ar) == 20_000
    # A one-item probe's time includes the engine's cost per task (~0.1 ms), so chunks come
    # out hundreds to thousands of items long for a trivial function: far fewer tasks.
    assert len(ar.msg_ids) <= 20_000 // 20
    assert list(ar) == [2 * x for x in range(20_000)]  # iteration flattens the chunks too


def test_items_slower_than_the_probe_wait_go_one_per_task(view, monkeypatch):
    monkeypatch.setattr(autochunk, "PROBE_WAIT_S", 0.3)
    items = [0.45] * 6
    t0 = time.monotonic()
    ar = view.map_async(nap, items, chunksize="auto")
    assert time.monotonic() - t0 < autochunk.PROBE_WAIT_S + 5  # map_async does not run the map
    assert ar.get(60) == items
    assert len(ar.msg_ids) == 6


def test_auto_keeps_failures_in_place(view):
    items = [1, 2, 0, 4] * 50
    with pytest.raises(CompositeError):
        view.map_sync(inverse, items, chunksize="auto")
    out = view.map_sync(inverse, items, chunksize="auto", return_exceptions=True)
    assert len(out) == len(items)
    assert [type(v).__name__ for v in out[:4]][:2] == ["float", "float"]
    assert all(isinstance(v, Exception) for v, x in zip(out, items, strict=True) if x == 0)
    assert all(v == 1 / x for v, x in zip(out, items, strict=True)
               if x != 0 and not isinstance(v, Exception))


def test_auto_on_an_empty_or_tiny_input(view):
    assert view.map_sync(double, [], chunksize="auto") == []
    assert view.map_sync(double, [3], chunksize="auto") == [6]
    assert view.parallel(block=True, chunksize="auto")(double).map(range(5)) == [0, 2, 4, 6, 8]


LOCK = r"positional argument 0 \(lock object\): TypeError: cannot pickle '_thread.lock' object"


def test_an_unpicklable_item_after_the_probe_is_named_by_position_and_leaves_nothing_running(
        rc, view):
    import threading

    items = [1] * 40 + [threading.Lock()] + [1] * 5
    with pytest.raises(SerializationError) as e:
        view.map_async(double, items, chunksize="auto")
    # the item, not the chunk it fell into (once: "positional argument 0 (list object)")
    assert re.search(f"could not pickle item 40 of the map, {LOCK}", str(e.value)), str(e.value)
    assert "its first 4 item(s), sent ahead to time the rest, were aborted" in str(e.value)
    assert rc.wait(timeout=30)  # the probe tasks answered (ran or aborted): nothing pending


def test_an_unpicklable_item_is_named_by_position_whatever_the_chunking(rc, view):
    import threading

    for items, chunksize, where in (([1, threading.Lock()], "auto", 1),  # a probe item
                                    ([1] * 12 + [threading.Lock(), 1], 5, 12),
                                    ([1, 2, threading.Lock()], 1, 2)):
        with pytest.raises(SerializationError) as e:
            view.map_async(double, items, chunksize=chunksize)
        assert re.search(f"could not pickle item {where} of the map, {LOCK}.*; nothing was "
                         "sent", str(e.value)), (chunksize, str(e.value))
    with pytest.raises(SerializationError, match="item 1 of the map, positional argument 1 "):
        view.map_async(pow, [1, 2, 3], [1, threading.Lock(), 1])  # the second sequence's
    with pytest.raises(SerializationError, match="item 1 of the map, positional argument 1 "):
        view.map_async(pow, [1, 2, 3], [1, threading.Lock(), 1], chunksize=2)
    assert rc.wait(timeout=30)


@pytest.mark.parametrize("bad", ["fast", 0, 2.5, True])
def test_bad_chunksize_says_what_is_allowed(view, bad):
    with pytest.raises(ValueError, match="int >= 1 or 'auto'"):
        view.map_async(double, range(3), chunksize=bad)


# -- imap ----------------------------------------------------------------------------


def test_imap_auto_grows_its_chunks_and_yields_every_item_in_order(view):
    it = view.imap(double, range(5000), chunksize="auto")
    assert list(it) == [2 * x for x in range(5000)]
    assert it._next_index < 5000 // 5  # tasks: the first ones carry one item, later ones many


def test_imap_chunks_unordered(view):
    assert sorted(view.imap(double, range(100), chunksize=7, ordered=False)) == \
        [2 * x for x in range(100)]


def test_imap_a_failed_chunk_stands_for_each_of_its_items(view):
    out = list(view.imap(inverse, [1, 2, 0, 4, 5, 8], chunksize=3, return_exceptions=True))
    assert out[0] is out[1] is out[2]  # one error, in the place of each item of its chunk
    assert isinstance(out[0], RemoteError) and out[0].ename == "ZeroDivisionError"
    assert out[3:] == [0.25, 0.2, 0.125]
    it = view.imap(inverse, [1, 2, 0, 4, 5, 8], chunksize=3)
    with pytest.raises(Exception, match="ZeroDivisionError"):
        next(it)


def test_imap_chunks_keep_the_items_before_an_input_error_or_an_unpicklable_item(view):
    import threading

    def numbers():
        yield from range(4)
        raise OSError("the input broke")

    it = view.imap(double, numbers(), chunksize=3)
    assert [next(it) for _ in range(4)] == [0, 2, 4, 6]
    with pytest.raises(OSError, match="the input broke"):
        next(it)
    it = view.imap(double, [1, 2, threading.Lock(), 4], chunksize=3)
    assert [next(it) for _ in range(2)] == [2, 4]
    with pytest.raises(SerializationError) as e:
        next(it)
    assert re.search(f"could not pickle item 2 of the imap, {LOCK}.*; the 2 item\\(s\\) before "
                     "it were sent: their results are yielded before this error", str(e.value))


def test_imap_bad_chunksize_says_what_is_allowed(view):
    with pytest.raises(ValueError, match="int >= 1 or 'auto'"):
        view.imap(double, range(3), chunksize="big")


def fails_at_5(i):
    import threading

    if i == 5:
        raise ValueError("bad item")
    return threading.Lock() if i == 6 else i


@pytest.mark.parametrize("chunksize", [4, "auto"])
def test_a_chunk_that_fails_names_the_item_that_raised_or_does_not_pickle(view, chunksize):
    amr = view.map_async(fails_at_5, [0, 1, 2, 3, 4, 5, 7, 8], chunksize=chunksize)
    with pytest.raises(CompositeError) as e:
        amr.get(60)
    assert "ValueError: bad item (raised by item 5 of the map)" in str(e.value)
    if chunksize == 4:
        assert "(chunks 1 (items 4-7))" in str(e.value)  # the chunk, by its items
    got = view.map_sync(fails_at_5, range(10), chunksize=chunksize, return_exceptions=True)
    errors = {x.evalue for x in got if isinstance(x, RemoteError)}
    assert "bad item (raised by item 5 of the map)" in errors
    if chunksize == 4:  # items 4-7: item 5 raised first; 8-9 are fine
        assert got[8:] == [8, 9] and all(isinstance(x, RemoteError) for x in got[4:8])
    amr = view.map_async(fails_at_5, [0, 1, 2, 3, 4, 6, 7, 8], chunksize=chunksize)
    with pytest.raises(CompositeError) as e:
        amr.get(60)
    assert "could not be pickled: item 5 of the map returned a lock object: TypeError: cannot " \
           "pickle '_thread.lock' object" in str(e.value)  # not "(list object)"
    it = view.imap(fails_at_5, range(10), chunksize=chunksize)
    with pytest.raises(RemoteError, match=r"bad item \(raised by item 5 of the map\)"):
        list(it)
