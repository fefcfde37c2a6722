"""A live ipywidgets panel of a cluster: ``rc.dashboard()`` or ``%lb_dashboard``.

A background thread asks the controller for ``queue_status()`` a few times a
second (one round trip on the client's request socket, well under a
millisecond) and re-renders three HTML widgets; traitlets only send a value to
the front end when it changed, so an idle cluster costs no traffic.  The task
path never waits for the dashboard: results are filed by the client's receiving
thread, and the dashboard reads ``rc.failures`` (a deque that thread appends to)
by copying it.

The thread stops on :meth:`Dashboard.close` and by itself once the client is
closed or shut down.
"""

from __future__ import annotations

import html
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from . import connection

if TYPE_CHECKING:
    from .client.client import Client

# Seconds between two refreshes (the panel must update at least twice a second).
INTERVAL_S = 0.25
# Throughput is measured over this window.
WINDOW_S = 60.0
# How many failures the panel lists (newest first); older ones are counted.
FAILURES_SHOWN = 50
# A controller that has not answered a poll within this long is reported as not answering.
POLL_TIMEOUT_S = 5.0
# Failures the scheduler decided, not task code: shown with their reason in full.
SCHEDULER_FAILURES = {"ImpossibleDependency", "InvalidDependency", "DependencyTimeout",
                      "TaskAborted", "EngineError"}

_STYLE = """<style>
.ipylb-dash table {border-collapse: collapse; font-family: var(--jp-code-font-family, monospace);
  font-size: 12px}
.ipylb-dash td, .ipylb-dash th {padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: right}
.ipylb-dash th {text-align: right; font-weight: 600}
.ipylb-dash .ipylb-busy {color: #1565c0; font-weight: 600}
.ipylb-dash .ipylb-idle {color: #666}
.ipylb-dash .ipylb-dead {color: #b71c1c; font-weight: 600}
.ipylb-dash .ipylb-failures td, .ipylb-dash .ipylb-failures th {text-align: left; vertical-align: top}
.ipylb-dash .ipylb-failures td:first-child {white-space: nowrap}
.ipylb-dash .ipylb-sched td.ipylb-ename {color: #b71c1c}
</style>"""


@dataclass(frozen=True)
class EngineRow:
    """One engine as the panel shows it."""

    engine_id: int
    state: str  # "busy" | "idle" | "dead"
    outstanding: int
    done: int
    host: str = "?"  # where it runs (connection.engine_host)


class Dashboard:
    """A live view of one client's cluster: queue depth, engines, throughput, failures.

    Display it (it is the last value of a cell, or ``display(dash)``); ``close()``
    stops its updates.  Several may be open at once, each with its own thread.
    """

    def __init__(self, client: Client, interval: float = INTERVAL_S) -> None:
        self.client = client
        self.interval = interval
        self.summary = widgets.HTML()
        self.engines = widgets.HTML()
        self.failures = widgets.HTML()
        self.widget = widgets.VBox(
            [widgets.HTML(_STYLE), self.summary, self.engines, self.failures]
        )
        self.widget.add_class("ipylb-dash")
        self.rows: list[EngineRow] = []
        self.unassigned = 0
        self.restarts = 0  # restarts of the live engines' slots
        self.throughput: float | None = None
        self._last: dict[int, dict[str, int]] = {}  # every engine seen, dead ones included
        self._hosts: dict[int, str] = {}  # engine id -> where it runs, asked once per engine
        self._samples: deque[tuple[float, int]] = deque()
        self._failures_seen: tuple[int, int] = (0, 0)
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ipylb-dashboard")
        self._thread.start()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def running(self) -> bool:
        """Whether the panel is still updating."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop updating (the panel keeps its last figures and says it stopped)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if not self.client.closed:
            self._render_summary("stopped: closed")

    # -- the updating thread -------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.refresh():
                    break
            except Exception as e:  # shown, and the next tick tries again: a panel must not die
                self._render_summary(f"could not refresh: {type(e).__name__}: {e}")

    def refresh(self) -> bool:
        """Poll the controller once and re-render; False once the client is closed."""
        if self.client.closed:
            self._render_summary("stopped: the client was shut down")
            return False
        try:
            status = self.client.queue_status(timeout=POLL_TIMEOUT_S)
        except TimeoutError:
            self._render_summary("the controller is not answering")
            return True
        except RuntimeError:  # closed between the check and the request
            if self.client.closed:
                self._render_summary("stopped: the client was shut down")
                return False
            raise
        self._update(status, time.monotonic())
        self._render_summary("")
        self._render_engines()
        self._render_failures()
        return True

    def _update(self, status: dict[Any, Any], now: float) -> None:
        self.unassigned = int(status.get("unassigned", 0))
        live = {k: v for k, v in status.items() if isinstance(k, int)}
        self.restarts = sum(v.get("restarts", 0) for v in live.values())
        self._last.update((int(k), v) for k, v in live.items())
        if not live.keys() <= self._hosts.keys():  # a new engine: ask where it runs, once
            info = self.client.engine_info()
            self._hosts.update((i, connection.engine_host(m)) for i, m in info.items())
        rows = []
        for eid in sorted(self._last):
            s = self._last[eid]
            if eid in live:
                outstanding = s["queue"] + s["tasks"]
                rows.append(EngineRow(eid, "busy" if s["tasks"] else "idle", outstanding,
                                      s["completed"], self._hosts.get(eid, "?")))
            else:
                rows.append(EngineRow(eid, "dead", 0, s["completed"], self._hosts.get(eid, "?")))
        self.rows = rows
        total = sum(r.done for r in rows)
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()
        t0, done0 = self._samples[0]
        self.throughput = (total - done0) / (now - t0) if now > t0 else None

    # -- rendering -----------------------------------------------------------------

    def _render_summary(self, problem: str) -> None:
        live = sum(r.state != "dead" for r in self.rows)
        rate = "–" if self.throughput is None else f"{self.throughput:.1f}"
        note = f' <b class="ipylb-note">{html.escape(problem)}</b>' if problem else ""
        self.summary.value = (
            f'<div class="ipylb-summary"><b>ipylb</b> · queue depth (unassigned): '
            f'<span class="ipylb-queue-depth">{self.unassigned}</span> · engines: '
            f'<span class="ipylb-live">{live}</span> · restarts: '
            f'<span class="ipylb-restarts">{self.restarts}</span> · throughput: '
            f'<span class="ipylb-throughput">{rate}</span> tasks/s (last minute){note}</div>'
        )

    def _render_engines(self) -> None:
        body = "".join(
            f'<tr class="ipylb-engine" data-engine="{r.engine_id}">'
            f"<td>{r.engine_id}</td><td>{html.escape(r.host)}</td>"
            f'<td class="ipylb-{r.state}">{r.state}</td>'
            f'<td>{"–" if r.state == "dead" else r.outstanding}</td><td>{r.done}</td></tr>'
            for r in self.rows
        )
        self.engines.value = (
            '<table class="ipylb-engines"><tr><th>engine</th><th>host</th><th>state</th>'
            f"<th>outstanding</th><th>done</th></tr>{body}</table>"
        )

    def _render_failures(self) -> None:
        failures = list(self.client.failures)  # a C-level copy: safe while the receiver appends
        key = (len(failures), id(failures[-1]) if failures else 0)
        if key == self._failures_seen and self.failures.value:
            return
        self._failures_seen = key
        if not failures:
            self.failures.value = '<div class="ipylb-failures-none">no failures</div>'
            return
        shown = failures[::-1][:FAILURES_SHOWN]
        rows = "".join(_failure_row(m) for m in shown)
        more = len(failures) - len(shown)
        tail = f"<div>… and {more} older</div>" if more else ""
        self.failures.value = (
            f"<div><b>failures</b> ({len(failures)}, newest first)</div>"
            f'<table class="ipylb-failures"><tr><th>task</th><th>engine</th><th>error</th>'
            f"<th>reason</th></tr>{rows}</table>{tail}"
        )


def _failure_row(meta: Any) -> str:
    err = meta.get("error")
    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", str(err))
    kind = "ipylb-sched" if ename in SCHEDULER_FAILURES else "ipylb-task"
    engine = "–" if meta.get("engine_id") is None else meta.get("engine_id")
    return (
        f'<tr class="ipylb-failure {kind}" data-ename="{html.escape(ename)}">'
        f"<td>{html.escape(str(meta.get('msg_id')))}</td><td>{engine}</td>"
        f'<td class="ipylb-ename">{html.escape(ename)}</td><td>{html.escape(evalue)}</td></tr>'
    )
