"""Progress bars for ``AsyncResult.wait_interactive()``: a widget in a notebook, text elsewhere.

``IPYLB_PROGRESS=0`` turns them off (the wait still happens).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


def _failed(ar: Any) -> str:
    n = ar._failed
    return f" ({n} failed)" if n else ""


def wait_with_progress(ar: Any, interval: float = 0.1, timeout: float | None = None) -> None:
    """Wait for ``ar``, showing how many of its tasks are done."""
    total = len(ar.msg_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    if os.environ.get("IPYLB_PROGRESS", "1") == "0":
        ar.wait(timeout)
        return
    if _in_notebook():
        import ipywidgets
        from IPython.display import display

        bar = ipywidgets.IntProgress(min=0, max=max(total, 1), description="tasks")
        label = ipywidgets.Label()
        display(ipywidgets.HBox([bar, label]))

        def show(done: int) -> None:
            bar.value = done
            label.value = f"{done}/{total}{_failed(ar)}"
    else:

        def show(done: int) -> None:
            width = 30
            filled = width * done // max(total, 1)
            sys.stdout.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks"
                             f"{_failed(ar)}")
            sys.stdout.flush()

    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        if ar.wait(interval if left is None else min(interval, left)):
            break
        show(ar.progress())
    show(ar.progress())
    if not _in_notebook():
        sys.stdout.write("\n")
