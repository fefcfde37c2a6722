"""Progress bars for ``AsyncResult.wait_interactive()``, drawn by ``tqdm.auto``: a widget in
a notebook, text in a terminal, with tqdm's rate and ETA.

``IPYLB_PROGRESS=0`` or tqdm's own ``TQDM_DISABLE=1`` turn them off (the wait still happens).
"""

from __future__ import annotations

import os
import time
from typing import Any


def progress_on() -> bool:
    """Whether progress is shown: not if ``IPYLB_PROGRESS=0`` or ``TQDM_DISABLE`` is set
    (read here on each call: tqdm reads its variables once, when it is imported)."""
    return os.environ.get("IPYLB_PROGRESS", "1") != "0" and \
        os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")


def wait_with_progress(ar: Any, interval: float = 0.1, timeout: float | None = None) -> None:
    """Wait for ``ar`` (at most ``timeout`` seconds; None: until done), showing how many of
    its tasks are done and how many failed, named by its ``label`` or function name;
    redrawn every ``interval`` seconds."""
    if not progress_on():
        ar.wait(timeout)
        return
    from tqdm.auto import tqdm  # (imported on use: the client starts without it)

    deadline = None if timeout is None else time.monotonic() + timeout
    name = getattr(ar, "label", None) or getattr(ar, "_fname", "") or "tasks"
    with tqdm(total=len(ar.msg_ids), desc=name, unit="task", mininterval=interval) as bar:
        failed = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            finished = ar.wait(interval if left is None else max(0.0, min(interval, left)))
            bar.update(ar.progress() - bar.n)
            if ar._failed != failed:
                failed = ar._failed
                bar.set_postfix(failed=failed)
            if finished or (left is not None and left <= interval):
                break
