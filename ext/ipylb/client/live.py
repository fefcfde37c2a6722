"""Live output: what running tasks print, shown while they run (issue 15).

``ar.display_outputs()`` on a running result, and a blocking ``%%lb`` cell, ask the
controller for the live output of the result's tasks (the ``stream`` request).  The
engine running one then reports what it printed lately, at most every
``engine.health.LIVE_S`` seconds and ``LIVE_BYTES`` bytes per stream (the newest, after
a note of what was skipped), and the controller passes each report on to the clients that
asked, as an ``("output", msg_id, (stdout, end), (stderr, end), started)`` event (``end``: the character
position in the task's stream, as the result's text has it).  Tasks nobody watches cost nothing: no report is made.

Where it is shown:

- In a Jupyter kernel, in the cell that asked: a display (``display_id``) shown and
  updated by ipylb's callbacks thread under that cell's parent header (ipykernel's
  ``set_thread_parent``), so the output lands in that cell even while another cell runs;
  it appears with the first text (a task that prints nothing leaves no empty output).
  Once the tasks end, their full output (``ar.stdout``/``ar.stderr``, from the results)
  replaces the live view, once.
- Elsewhere (plain Python, a terminal IPython), the caller's thread prints each report to
  ``sys.stdout``/``sys.stderr`` as it comes and, as each task ends, what its result holds
  beyond what was printed of it: nothing twice.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from ..error import ClientClosed, ControllerGone
from .callbacks import runner

if TYPE_CHECKING:
    from .asyncresult import AsyncResult

__all__ = ["LiveOutput"]

# A live view keeps at most this many characters per task and stream (the newest): a task
# printing for hours must not make each update longer.  The result has everything.
KEPT_CHARS = 100_000
TRIMMED = "[ipylb: earlier live output not shown; the full output comes with the result]\n"


class LiveOutput:
    """The output of ``ar``'s tasks while they run, shown where it was created (see the
    module docstring).  Made by :meth:`start`; fed by the client's receiving thread
    (:meth:`add`) and ended by the result (:meth:`finish`, once)."""

    def __init__(self, ar: AsyncResult) -> None:
        self.ar = ar
        n = len(ar.msg_ids)
        self._cond = threading.Condition()
        self._texts = [["", ""] for _ in range(n)]  # per task: live stdout, stderr
        self._ends = [[0, 0] for _ in range(n)]  # per task: character positions reported
        self._started: list[float | None] = [None] * n  # per task: the attempt reported
        # Outside a kernel: what follow() has to print, in order: reports (index, stdout,
        # stderr) and ends of tasks (index, None, None).
        self._fresh: deque[tuple[int, str | None, str | None]] = deque()
        self._finished = False
        self._drawing = False  # a draw of the display is queued
        self._display = _Display.here()

    @classmethod
    def start(cls, ar: AsyncResult) -> LiveOutput:
        """Watch ``ar``'s unfinished tasks: register with its client, ask the controller
        for their output, and in a Jupyter kernel make the display that shows it (in the
        cell running now).  Best effort: a controller that cannot be asked (gone, client
        closed, no answer within 30 s) gives no live output, and the results still come."""
        live = cls(ar)
        client = ar._client
        pending = [(i, m) for i, (m, o) in enumerate(zip(ar.msg_ids, ar._outcomes)) if o is None]
        for i, msg_id in pending:
            client._live.setdefault(msg_id, []).append((live, i))
        ar.add_done_callback(lambda _ar: live.finish())
        if live._display is None:  # each task's rest is printed as it ends
            for i, part in enumerate(ar.split()):
                part.add_done_callback(functools.partial(live._task_done, i))
        if pending:
            try:
                client._request("stream", [m for _i, m in pending])
            except (ClientClosed, ControllerGone, TimeoutError):
                pass  # no live output then: the results (or their errors) still come
            except BaseException:
                live.finish()
                raise
        return live

    # -- the client's threads --------------------------------------------------------

    def add(self, index: int, out: str, err: str, ends: tuple[int, int],
            started: float) -> None:
        """A report for task ``index`` (the receiving thread) of its attempt that started at
        ``started`` (engine's clock, seconds): keep it, show it.  A report of another
        attempt (a retry) starts that task's live text afresh."""
        with self._cond:
            if self._finished or self.ar._outcomes[index] is not None:
                return  # the result came first: it has all this
            texts = self._texts[index]
            if self._started[index] != started:
                self._started[index] = started
                texts[:] = ["", ""]
            for k, new in ((0, out), (1, err)):
                text = texts[k] + new
                if len(text) > KEPT_CHARS:
                    text = TRIMMED + text[-KEPT_CHARS:]
                texts[k] = text
            self._ends[index] = list(ends)
            if self._display is None:
                self._fresh.append((index, out, err))
                self._cond.notify_all()
            elif not self._drawing:  # drawn off this thread (it delivers results), once
                self._drawing = True  # for the reports that came meanwhile
                runner.call(self._draw)

    def _draw(self) -> None:
        with self._cond:
            self._drawing = False
            if not self._finished and not self.ar.ready():  # (else finish() draws, once)
                self._display.update(*self._joined())  # type: ignore[union-attr]

    def finish(self) -> None:
        """The tasks have ended (or the caller gives up): unregister, and in a kernel
        replace the live view with the results' full output.  Only the first call acts."""
        with self._cond:
            if self._finished:
                return
            self._finished = True
            self._cond.notify_all()
            live = self._client_live()
            for msg_id in self.ar.msg_ids:
                watchers = live.get(msg_id)
                if watchers is not None:
                    rest = [w for w in watchers if w[0] is not self]
                    if rest:
                        live[msg_id] = rest
                    else:
                        live.pop(msg_id, None)
            if self._display is not None:
                self._display.update(*self._joined())

    def _client_live(self) -> dict[str, list[tuple[LiveOutput, int]]]:
        return self.ar._client._live

    def _joined(self) -> tuple[str, str]:
        """stdout and stderr of every task, in task order: a finished task's full text
        (from its result), else what came of it so far."""
        outs, errs = [], []
        for i, o in enumerate(self.ar._outcomes):
            if o is not None:
                outs.append(o.meta[5] or "")
                errs.append(o.meta[6] or "")
            else:
                outs.append(self._texts[i][0])
                errs.append(self._texts[i][1])
        return "".join(outs), "".join(errs)

    # -- the caller's thread (outside a kernel) --------------------------------------

    @property
    def in_kernel(self) -> bool:
        """Whether the output is shown by a Jupyter display (else by :meth:`follow`)."""
        return self._display is not None

    def follow(self) -> None:
        """Outside a kernel: print reports to sys.stdout/sys.stderr as they come, and as
        each task ends, what its result holds beyond what was printed of it; return once
        every task has ended.  In a kernel, wait for the tasks.  KeyboardInterrupt leaves
        the tasks running."""
        if self._display is not None:
            self.ar.wait()
            return
        ended: set[int] = set()  # tasks whose rest is printed
        while True:
            with self._cond:
                while not self._fresh and not self._finished:
                    self._cond.wait()
                fresh = list(self._fresh)
                self._fresh.clear()
                finished = self._finished
            for i, out, err in fresh:
                if out is None:  # task i ended (reports of it come before this)
                    self._print_rest(i, ended)
                else:
                    _write(sys.stdout, out)
                    _write(sys.stderr, err)
            if finished:
                break
        for i in range(len(self.ar.msg_ids)):
            self._print_rest(i, ended)

    def _print_rest(self, i: int, ended: set[int]) -> None:
        o = self.ar._outcomes[i]
        if o is None or i in ended:
            return
        ended.add(i)
        # Positions reported of another attempt than the result's (it was retried, and
        # the last attempt ended before a report of it) do not apply: all of it is new.
        ends = self._ends[i] if len(o.meta) > 3 and o.meta[3] == self._started[i] else (0, 0)
        for k, stream in ((0, sys.stdout), (1, sys.stderr)):
            _write(stream, _beyond(o.meta[5 + k] or "", ends[k]))

    def _task_done(self, index: int, _part: Any) -> None:
        """Task ``index`` has ended (a callback): its rest is printed next (console)."""
        with self._cond:
            if not self._finished:
                self._fresh.append((index, None, None))
                self._cond.notify_all()


def _beyond(text: str, end: int) -> str:
    """``text`` after its first ``end`` characters: what the live reports did not show (the
    engine counts positions in characters of the result's text, so invalid UTF-8 the task
    wrote, one U+FFFD each there, does not shift them)."""
    return text[end:]


def _write(stream: Any, text: str) -> None:
    if text:
        stream.write(text)
        stream.flush()


class _Display:
    """A display in the cell running when it was made, drawn from any thread under that
    cell's parent header: so it lands in that cell, not in the one running then.  It is
    shown at the first text (a task that prints nothing leaves no empty output)."""

    def __init__(self, shell: Any) -> None:
        self.pub = shell.display_pub
        self.parent = self.pub.parent_header  # the execute_request of the cell running now
        self.id: str | None = None
        self._set_parent = getattr(self.pub, "set_thread_parent", None)  # ipykernel >= 6.29
        if self._set_parent is None:  # no parent per thread: shown now, in this cell
            self._draw("")

    @classmethod
    def here(cls) -> _Display | None:
        """One for the cell running now, if this is a Jupyter kernel; else None."""
        if "ipykernel" not in sys.modules:
            return None
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or getattr(shell, "kernel", None) is None:
            return None
        return cls(shell)

    def update(self, out: str, err: str) -> None:
        """Show ``out`` then ``err`` (text/plain) in place of what was shown."""
        if self.id is None and not (out or err):
            return
        token = self._set_parent(self.parent) if self._set_parent is not None else None
        try:
            self._draw(out + err)
        finally:
            if token is not None:
                self.pub.reset_thread_parent(token)

    def _draw(self, text: str) -> None:
        from IPython.display import display, update_display

        if self.id is None:
            self.id = display({"text/plain": text}, raw=True, display_id=True).display_id
        else:
            update_display({"text/plain": text}, raw=True, display_id=self.id)
