"""Tasks queued on an engine (hwm="auto", the default) behind a task whose engine holds the GIL
in C code: taking them back needs the engine's acknowledgement (its steal thread, ipylb.engine.
steal), which needs the GIL.  Found by the breaker (notes/breaker2.md, defect 2); left open:
the fix is a design decision (restart such an engine, killing a possibly legitimate running
task; or a GIL-free revocation the engine checks as it takes each task)."""

from __future__ import annotations

import time

import ipylb
import pytest


def pid():
    import os

    return os.getpid()


def holds_the_gil(seconds):
    """A task's own long C call that holds the GIL (no Python runs meanwhile, in any thread)."""
    import ctypes

    return ctypes.PyDLL(None).sleep(seconds)


@pytest.mark.xfail(strict=True, reason="open: a queued task cannot be taken back from an engine "
                   "whose GIL is held (notes/breaker2.md, defect 2)")
def test_short_tasks_do_not_wait_behind_a_task_holding_the_gil_while_an_engine_is_idle():
    """API.md: a short task never stays queued behind a running one while another engine is
    idle.  With hwm=1 the short tasks all run on the other engine at once; with the default
    pipeline those queued behind the C call waited for its whole 30 s (for good, when a thread
    a task left holds the GIL)."""
    with ipylb.Client(engines=2) as rc:
        view = rc.load_balanced_view()
        for ar in [view.apply_async(pid) for _ in range(300)]:  # deep pipeline, as in a map
            ar.get(60)
        hog = view.apply_async(holds_the_gil, 30)
        short = [view.apply_async(pid) for _ in range(10)]
        start = time.monotonic()
        assert rc.wait(short, timeout=60)
        assert time.monotonic() - start < 10, "short tasks waited behind the C call"
        assert hog.get(60) == 0
