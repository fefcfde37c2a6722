"""Task functions travel once per engine (issue 10 item 5): a function is sent to an engine
the first time one of its tasks goes there, and named by its key afterwards; large arrays
it closes over travel out of band; one that still pickles large draws a warning, once.
Against the session's two real engines.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ipylb.controller.dispatch import FUNCTIONS_HELD


def channel_state():
    """On an engine: (functions sent to it so far, functions it holds now)."""
    from IPython import get_ipython

    ch = get_ipython().kernel.task_channel
    return ch.functions_received, len(ch.functions)


def state(rc):
    return {e: rc.load_balanced_view(targets=e).apply_sync(channel_state) for e in rc.ids}


def test_a_large_closure_is_sent_to_each_engine_once(rc, view):
    big = np.random.rand(4_000_000)

    def make():  # one code object: each call makes a new function with the same pickle
        return lambda i: float(big[i])

    before = state(rc)  # channel_state itself is held by every engine from here on
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its data went out of band: no size warning
        assert view.map_sync(make(), range(8)) == [float(x) for x in big[:8]]
        # A new function object with the same pickle (a cell run again) is not sent again.
        assert view.map_sync(make(), range(8, 16)) == [float(x) for x in big[8:16]]
    after = state(rc)
    sent = {e: after[e][0] - before[e][0] for e in rc.ids}
    assert all(n <= 1 for n in sent.values()), (before, after)  # 16 tasks, one send each
    assert sum(sent.values()) >= 1


def test_engines_hold_a_bounded_number_of_functions_and_a_dropped_one_is_sent_again(rc, view):
    fs = [eval(f"lambda: {i}") for i in range(FUNCTIONS_HELD + 8)]  # distinct pickles
    assert [view.apply_async(f).get(30) for f in fs] == list(range(FUNCTIONS_HELD + 8))
    assert all(held <= FUNCTIONS_HELD for _sent, held in state(rc).values())
    assert view.apply_sync(fs[0]) == 0  # dropped by then on every engine: sent again, runs


def test_a_function_that_still_pickles_large_warns_once():
    from ipylb import serialize

    data = [float(i) for i in range(700_000)]  # a list: no out-of-band buffer to go in

    def uses_data(i):
        return data[i]

    with pytest.warns(UserWarning, match=r"uses_data pickles to \d+\.\d MB.*Pass the data "
                                         r"as an argument"):
        frames = serialize.dumps_function(uses_data)
    assert len(frames[0]) > serialize.FUNCTION_WARN_BYTES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        serialize.dumps_function(uses_data)  # once per function


def test_arrays_a_function_closes_over_go_out_of_band():
    from ipylb import serialize

    big = np.zeros(1_000_000)
    frames = serialize.dumps_function(lambda: big.sum())
    assert len(frames) == 2 and frames[1].nbytes == big.nbytes and len(frames[0]) < 10_000


def test_an_array_a_function_closes_over_reaches_the_engine_through_shared_memory(view):
    """Out of band on one host means shared memory, as for arguments: on the engine the
    closure's array is a mapped segment, not a copy that came through the sockets."""
    from test_shm import where_is

    big = np.arange(4_000_000, dtype="f8")
    mapped, _writable = view.apply_sync(lambda: where_is(big))
    assert mapped is True
    assert view.apply_sync(lambda i: float(big[i]), 3_999_999) == 3_999_999.0
