"""A live panel of a cluster inside the notebook: ``rc.dashboard()`` or ``%lb_dashboard``.

What it shows (issue 15): a summary line; a progress bar per submission in flight (done,
failed, running, waiting, with rate and ETA, named by its ``label`` or function); the task
stream (a lane per engine, a bar per task over the last minute, coloured by label or
function, failures marked red, running tasks drawn to now); queue depth and throughput over
time; the engines (host, pid, CPU %, RSS, restarts, current task and how long it has run);
the failures, with impossible-dependency chains drawn as indented trees from their root
cause down.

Where the figures come from: one ``rc.activity()`` round trip per refresh (the controller
keeps the recent finished tasks and per-second buckets, and the engines report their own
health, see :mod:`ipylb.controller.activity`), ``rc.submissions()`` and ``rc.failures``
(both local).  Only what is new since the previous answer crosses the socket.

Plotting: bqplot.  Its marks are ipywidgets, so they update live in JupyterLab through the
kernel's comm, with no server of their own.  Measured against plotly's FigureWidget (plotly
7.1 + anywidget 0.11) on the same 2,000-task update (/tmp script, this 2-core machine under
load, two alternating rounds of 20): bqplot 45-84 ms per refresh, plotly 242-265 ms, so
plotly would cost a quarter of a core at 1 Hz; bqplot's lanes also look cleaner (thick
strokes, no per-bar hover boxes).  The stream is redrawn once a second; the tables four
times a second (traitlets send only values that changed).

Large clusters: at most :data:`MAX_LANES` lanes and :data:`MAX_ROWS` engine rows, busiest
first; the rest are summed in one "+N" lane and row.  The controller does the summing
(``activity(top=...)``): beyond that many engines it describes only the busiest one by one
and sends the others as one sum, so neither the answer nor the panel's work per refresh
grows with the engine count (measured at 1,000 swarm engines: see issue 14/15 notes).  At thousands of tasks a
second the controller sends at most 2,000 tasks per refresh and the stream keeps at most
:data:`MAX_BARS` bars; seconds whose tasks were not all sent are drawn from the engines'
one-second buckets as shaded blocks (how busy the engine was), so the cost per refresh is
bounded whatever the rate.

The thread stops on :meth:`Dashboard.close`, once the client is closed, and once the
cluster is gone (the panel says so).
"""

from __future__ import annotations

import html
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np

from .error import ControllerGone

if TYPE_CHECKING:
    from .client.client import Client

# Seconds between two refreshes of the tables (the panel must update at least twice a second).
INTERVAL_S = 0.25
# The task stream and the chart are redrawn every this many refreshes (once a second).
STREAM_EVERY = 4
# Span of the task stream, the chart and the throughput figure (seconds).
WINDOW_S = 60.0
# Lanes in the task stream and rows in the engine table before the rest are summed.
MAX_LANES = 24
MAX_ROWS = 24
# Task bars the stream keeps (the newest).
MAX_BARS = 3000
# Submission bars shown at most (the oldest in flight first; the rest are counted).
MAX_SUBMISSIONS = 12
# Finished submissions stay on the panel this long (seconds).
SUBMISSION_LINGER_S = 10.0
# How many failures the panel lists (newest first); older ones are counted.
FAILURES_SHOWN = 50
# A controller that has not answered a poll within this long is reported as not answering.
POLL_TIMEOUT_S = 5.0
# Failures the scheduler decided, not task code: shown with their reason in full.
SCHEDULER_FAILURES = {"ImpossibleDependency", "InvalidDependency", "DependencyTimeout",
                      "TaskAborted", "EngineError", "WalltimeExceeded"}
# Colours of labels/functions, in order of first appearance (Tableau 10 without the red,
# kept for failures).
PALETTE = ("#4e79a7", "#f28e2b", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac", "#17becf")
FAILED_COLOUR = "#d62728"

_STYLE = """<style>
.ipylb-dash table {border-collapse: collapse; font-family: var(--jp-code-font-family, monospace);
  font-size: 12px}
.ipylb-dash td, .ipylb-dash th {padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right}
.ipylb-dash th {font-weight: 600}
.ipylb-dash .ipylb-busy {color: #1565c0; font-weight: 600}
.ipylb-dash .ipylb-idle {color: #666}
.ipylb-dash .ipylb-dead {color: #b71c1c; font-weight: 600}
.ipylb-dash .ipylb-failures td, .ipylb-dash .ipylb-failures th {text-align: left; vertical-align: top}
.ipylb-dash .ipylb-failures td:first-child {white-space: nowrap}
.ipylb-dash .ipylb-sched td.ipylb-ename {color: #b71c1c}
.ipylb-dash .ipylb-sub {display: flex; align-items: center; gap: 8px; font-size: 12px;
  white-space: nowrap;
  font-family: var(--jp-code-font-family, monospace)}
.ipylb-dash .ipylb-bar {display: flex; flex: none; width: 200px; height: 12px; background: #e0e0e0;
  border-radius: 3px; overflow: hidden}
.ipylb-dash .ipylb-bar span {display: block; height: 100%}
.ipylb-dash .ipylb-tree {font-family: var(--jp-code-font-family, monospace); font-size: 12px;
  white-space: pre; margin: 4px 0}
.ipylb-dash .ipylb-note {color: #b71c1c}
</style>"""


@dataclass(frozen=True)
class EngineRow:
    """One engine as the panel shows it."""

    engine_id: int
    state: str  # "busy" | "idle" | "dead"
    outstanding: int
    done: int
    host: str = "?"  # where it runs (connection.engine_host)
    pid: int | None = None
    cpu: float | None = None
    rss: int | None = None
    restarts: int = 0
    task: str = ""  # the running task's label or function
    running_s: float | None = None  # how long it has run


class Dashboard:
    """A live view of one client's cluster (see the module docstring).

    Display it (it is the last value of a cell, or ``display(dash)``); ``close()``
    stops its updates.  Several may be open at once, each with its own thread.
    """

    def __init__(self, client: Client, interval: float = INTERVAL_S) -> None:
        self.client = client
        self.interval = interval
        self.summary = widgets.HTML()
        self.progress = widgets.HTML()
        self.engines = widgets.HTML()
        self.failures = widgets.HTML()
        self._legend = widgets.HTML()
        self._build_charts()
        self.widget = widgets.VBox([
            widgets.HTML(_STYLE), self.summary, self.progress, self.stream, self._legend,
            self.chart, self.engines, self.failures])
        self.widget.add_class("ipylb-dash")
        self.rows: list[EngineRow] = []
        self.unassigned = 0
        self.restarts = 0  # restarts of the live engines' slots
        self.throughput: float | None = None
        self.refresh_ms: deque[float] = deque(maxlen=100)  # what each refresh cost
        self._last: dict[int, dict[str, Any]] = {}  # engines shown, dead ones included
        self._rest: dict[str, Any] | None = None  # the engines summed by the controller
        self._rest_buckets: dict[int, list[Any]] = {}  # their buckets, summed per second
        self._samples: deque[tuple[float, int]] = deque()
        self._series: deque[tuple[float, int, float]] = deque()  # (time, queue, tasks/s)
        self._failures_seen: tuple[int, int] = (0, 0)
        self._seq = 0
        self._second = 0
        self._bars: deque[tuple] = deque(maxlen=MAX_BARS)  # (eid, start, end, ok, key)
        self._buckets: dict[int, dict[int, list[Any]]] = {}  # eid -> second -> bucket
        self._dense_from = float("inf")  # before this, the stream relies on buckets
        self._colours: dict[str, str] = {}
        self._engines: dict[int, dict[str, Any]] = {}
        self._hosts: dict[int, str] = {}  # engine id -> where it runs (kept once it is gone)
        self._finished_at: dict[int, float] = {}  # id(ar) -> when it was seen finished
        self._ticks = 0
        self._opened = time.time()
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

    # -- charts --------------------------------------------------------------------

    def _build_charts(self) -> None:
        x = bq.LinearScale(min=-WINDOW_S, max=0.0)
        y = bq.LinearScale(min=-0.6, max=1.6)  # lanes are 0..n-1 (reset on each draw)
        self._lane_scale, self._x_scale = y, x

        def lines(**kw: Any) -> bq.Lines:
            return bq.Lines(x=np.zeros((1, 2)), y=np.full((1, 2), np.nan),
                            scales={"x": x, "y": y}, **kw)

        # shaded seconds (buckets), task bars, running tasks, failure marks
        self._dense = lines(colors=["#9e9e9e"], stroke_width=14, opacities=[0.5])
        self._done = lines(stroke_width=12)
        self._live = lines(stroke_width=12, opacities=[0.45])
        self._failed = bq.Scatter(x=[], y=[], scales={"x": x, "y": y}, marker="cross",
                                  colors=[FAILED_COLOUR], default_size=40)
        # lane names (engine ids, "+N" for the summed rest) left of the window
        self._lane_names = bq.Label(x=[], y=[], text=[], scales={"x": x, "y": y},
                                    x_offset=4, y_offset=-8, align="start", font_weight="bold",
                                    default_size=11, colors=["#444"])
        axes = [bq.Axis(scale=x, label="seconds ago (lanes: engines)", num_ticks=7),
                bq.Axis(scale=y, side="left", visible=False)]  # lanes are named by labels
        self.stream = bq.Figure(
            marks=[self._dense, self._done, self._live, self._failed, self._lane_names], axes=axes,
            title="task stream", fig_margin={"top": 30, "bottom": 35, "left": 60, "right": 10},
            layout=widgets.Layout(width="100%", height="220px"), animation_duration=0)
        self.stream.add_class("ipylb-stream")
        t = self._t_scale = bq.LinearScale(min=-WINDOW_S, max=0.0)
        q, r = bq.LinearScale(min=0.0), bq.LinearScale(min=0.0)
        self._queue_line = bq.Lines(x=[0.0], y=[0.0], scales={"x": t, "y": q},
                                    colors=["#f28e2b"], labels=["queue depth"])
        self._rate_line = bq.Lines(x=[0.0], y=[0.0], scales={"x": t, "y": r},
                                   colors=["#4e79a7"], labels=["tasks/s"])
        self.chart = bq.Figure(
            marks=[self._queue_line, self._rate_line], legend_location="top-left",
            axes=[bq.Axis(scale=t, num_ticks=7),
                  bq.Axis(scale=q, side="left", label="queue", tick_format="d"),
                  bq.Axis(scale=r, side="right", label="tasks/s")],
            fig_margin={"top": 10, "bottom": 25, "left": 60, "right": 60},
            layout=widgets.Layout(width="100%", height="140px"), animation_duration=0)
        self.chart.add_class("ipylb-chart")
        for m in (self._queue_line, self._rate_line):
            m.display_legend = True

    # -- the updating thread -------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.refresh():
                    break
            except Exception as e:  # shown, and the next tick tries again: a panel must not die
                self._render_summary(f"could not refresh: {type(e).__name__}: {e}")

    def refresh(self) -> bool:
        """Poll the controller once and re-render; False once the client is closed or the
        cluster is gone (the panel then says which)."""
        if self.client.closed:
            self._render_summary("stopped: the client was shut down")
            return False
        t0 = time.perf_counter()
        try:  # beyond a screenful of engines, the controller sums the rest (bounded answer)
            act = self.client.activity(self._seq, self._second, timeout=POLL_TIMEOUT_S,
                                       top=max(MAX_LANES, MAX_ROWS))
        except TimeoutError:
            self._render_summary("the controller is not answering")
            return True
        except ControllerGone as e:
            self._render_summary(f"the cluster is gone: {e}")
            return False
        except RuntimeError:  # closed between the check and the request
            if self.client.closed:
                self._render_summary("stopped: the client was shut down")
                return False
            raise
        now = act["now"]
        self._rest = act.get("rest")
        self._update(act["status"], act["seq"], time.monotonic())
        self._take(act, now)
        self._render_summary("")
        self._render_progress(act, now)
        self._render_engines()
        self._render_failures()
        if self._ticks % STREAM_EVERY == 0:
            self._draw_stream(now)
            self._draw_chart(now)
        self._ticks += 1
        self.refresh_ms.append((time.perf_counter() - t0) * 1000)
        return True

    def _update(self, status: dict[Any, Any], total: int, now: float) -> None:
        """File the engines' counts; ``total``: tasks finished so far (activity's seq)."""
        self.unassigned = int(status.get("unassigned", 0))
        live = {k: v for k, v in status.items() if isinstance(k, int)}
        rest = self._rest
        self.restarts = sum(v.get("restarts", 0) for v in live.values()) + \
            (rest["restarts"] if rest else 0)
        if rest:  # engines not in this answer are summed, not gone: only the gone stay rows
            alive = set(self.client.ids)
            for eid in [e for e in self._last if e not in live and e in alive]:
                del self._last[eid]
            dead = [e for e in self._last if e not in live]
            for eid in dead[:max(0, len(dead) - MAX_ROWS)]:  # the latest MAX_ROWS gone
                del self._last[eid]
        self._last.update((int(k), v) for k, v in live.items())
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()
        t0, done0 = self._samples[0]
        self.throughput = (total - done0) / (now - t0) if now > t0 else None
        self._live_ids = set(live)

    def _take(self, act: dict[str, Any], now: float) -> None:
        """File what the controller sent: new bars, buckets, engine health."""
        tasks = act["tasks"]
        if act["skipped"] and tasks:  # before these, not every task was sent: use buckets
            self._dense_from = tasks[0][2]
        self._bars.extend(tasks)
        self._seq = act["seq"]
        if self._rest is not None:  # the whole window for the engines shown and the rest
            self._buckets = {eid: {b[0]: b for b in bs} for eid, bs in act["buckets"].items()}
            self._rest_buckets = {b[0]: b for b in self._rest["buckets"]}
        else:
            self._rest_buckets = {}
            for eid, bs in act["buckets"].items():
                mine = self._buckets.setdefault(eid, {})
                for b in bs:
                    mine[b[0]] = b
        self._second = int(now) - 1  # the current second may still grow
        cutoff = now - WINDOW_S
        for eid in list(self._buckets):
            mine = self._buckets[eid]
            for sec in [s for s in mine if s < cutoff - 1]:
                del mine[sec]
            if not mine:
                del self._buckets[eid]
        self._engines = act["engines"]
        self._hosts.update((eid, e["host"]) for eid, e in self._engines.items())
        rows = []
        for eid in sorted(self._last):
            s = self._last[eid]
            e = self._engines.get(eid, {})
            if eid in self._live_ids:
                task = e.get("task")
                rows.append(EngineRow(
                    eid, "busy" if s["tasks"] else "idle", s["queue"] + s["tasks"],
                    s["completed"], e.get("host", "?"), e.get("pid"), e.get("cpu"), e.get("rss"),
                    e.get("restarts", 0),
                    task[1] if task else "",
                    None if not task or task[2] is None else max(0.0, now - task[2])))
            else:
                rows.append(EngineRow(eid, "dead", 0, s["completed"],
                                      self._hosts.get(eid, "?")))
        self.rows = rows
        self._series.append((now, self.unassigned, self.throughput or 0.0))
        while self._series and now - self._series[0][0] > WINDOW_S:
            self._series.popleft()

    # -- the task stream -----------------------------------------------------------

    def _colour(self, key: str) -> str:
        c = self._colours.get(key)
        if c is None:
            c = self._colours[key] = PALETTE[len(self._colours) % len(PALETTE)]
        return c

    def lanes(self, now: float) -> list[tuple[str, list[int]]]:
        """The stream's lanes, top to bottom: ``(name, engine ids)``; beyond
        :data:`MAX_LANES` engines, the busiest that many (seconds of work in the window)
        and one lane "+N" that the rest share (N counts the engines the controller summed,
        whose ids are not listed)."""
        busy: dict[int, float] = dict.fromkeys(self._live_ids, 0.0)  # seconds of work
        for eid, mine in self._buckets.items():
            busy[eid] = busy.get(eid, 0.0) + sum(b[3] for b in mine.values())
        summed = self._rest["engines"] if self._rest else 0
        if len(busy) <= MAX_LANES and not summed:
            return [(str(e), [e]) for e in sorted(busy)]
        order = sorted(busy, key=lambda e: (-busy[e], e))
        top = sorted(order[:MAX_LANES])
        rest = order[MAX_LANES:]
        return [*((str(e), [e]) for e in top), (f"+{len(rest) + summed}", rest)]

    def _draw_stream(self, now: float) -> None:
        lanes = self.lanes(now)
        lane_of = {e: i for i, (_n, es) in enumerate(lanes) for e in es}
        summed = len(lanes) - 1 if self._rest else None  # the "+N" lane: engines not listed
        lo = now - WINDOW_S
        done: dict[str, list[tuple[float, float, int]]] = {}
        fails_x, fails_y = [], []
        for eid, start, end, ok, key in self._bars:
            lane = lane_of.get(eid, summed)
            if lane is None or end < lo:
                continue
            s = max(start if start is not None else end, lo)
            done.setdefault(key, []).append((s - now, end - now, lane))
            if not ok:
                fails_x.append(end - now)
                fails_y.append(lane)
        live: dict[str, list[tuple[float, float, int]]] = {}
        for eid, e in self._engines.items():
            task = e.get("task")
            if task and task[2] is not None and eid in lane_of:
                live.setdefault(task[1], []).append((max(task[2], lo) - now, 0.0, lane_of[eid]))
        dense = []
        if self._dense_from != float("inf"):
            for eid, mine in self._buckets.items():
                if eid in lane_of:
                    for sec, b in mine.items():
                        if lo <= sec < self._dense_from:
                            width = min(1.0, b[3]) if b[3] else 0.5
                            dense.append((sec - now, sec + width - now, lane_of[eid]))
            if summed is not None:  # the summed engines' seconds: shaded by how busy
                for sec, b in self._rest_buckets.items():
                    if lo <= sec < self._dense_from:
                        width = min(1.0, b[3] / max(1, self._rest["engines"])) if b[3] else 0.5
                        dense.append((sec - now, sec + max(width, 0.1) - now, summed))
        n = max(len(lanes), 1)
        # the span shown: the last minute, or less while the panel has seen less (>= 10 s)
        oldest = min((b[1] if b[1] is not None else b[2] for b in self._bars
                      if b[2] >= lo), default=now)
        span = min(WINDOW_S, max(10.0, now - min(oldest, self._opened)))
        with self.stream.hold_sync():
            self._x_scale.min = self._t_scale.min = -span
            self._lane_scale.min, self._lane_scale.max = -0.6, n - 0.4
            self._lane_names.x = np.full(len(lanes), -span)
            self._lane_names.y = np.arange(len(lanes), dtype=float)
            self._lane_names.text = [name for name, _ in lanes]
            _set_segments(self._done, done, self._colour)
            _set_segments(self._live, live, self._colour)
            _set_segments(self._dense, {"": dense}, lambda _k: "#9e9e9e")
            self._failed.x, self._failed.y = np.array(fails_x), np.array(fails_y)
            keys = list(done)[:6]
            self._legend.value = "".join(
                f'<span style="color:{self._colour(k)}">■</span> {html.escape(_short(k))} '
                for k in keys) + (f'<span style="color:{FAILED_COLOUR}">✚</span> failed · '
                                  'pale: running · grey: busy seconds (aggregated)')

    def _draw_chart(self, now: float) -> None:
        if not self._series:
            return
        t = np.array([s[0] - now for s in self._series])
        with self.chart.hold_sync():
            self._queue_line.x, self._queue_line.y = t, np.array([s[1] for s in self._series])
            self._rate_line.x, self._rate_line.y = t, np.array([s[2] for s in self._series])

    # -- rendering -----------------------------------------------------------------

    def _render_summary(self, problem: str) -> None:
        live = sum(r.state != "dead" for r in self.rows) + \
            (self._rest["engines"] if self._rest else 0)
        rate = "–" if self.throughput is None else f"{self.throughput:.1f}"
        note = f' <b class="ipylb-note">{html.escape(problem)}</b>' if problem else ""
        self.summary.value = (
            f'<div class="ipylb-summary"><b>ipylb</b> · queue depth (unassigned): '
            f'<span class="ipylb-queue-depth">{self.unassigned}</span> · engines: '
            f'<span class="ipylb-live">{live}</span> · restarts: '
            f'<span class="ipylb-restarts">{self.restarts}</span> · throughput: '
            f'<span class="ipylb-throughput">{rate}</span> tasks/s (last minute){note}</div>'
        )

    def _render_progress(self, act: dict[str, Any], now: float) -> None:
        running_of: dict[int, int] = {}  # id(submission) -> its tasks running now
        running = [e["task"][0] for e in act["engines"].values() if e.get("task")]
        if self._rest:
            running += self._rest["running"]
        for msg_id in running:
            owner = self.client.submission_of(msg_id)
            if owner is not None:
                running_of[id(owner)] = running_of.get(id(owner), 0) + 1
        mono = time.monotonic()
        parts = []
        more = 0  # shown ones beyond MAX_SUBMISSIONS: counted, their rows not even built
        finished_at = {}  # only the submissions still held: the dict stays bounded
        for ar in self.client.submissions():
            total = len(ar.msg_ids)
            done = ar.progress()
            if done == total:
                seen = finished_at[id(ar)] = self._finished_at.get(id(ar), mono)
                if mono - seen > SUBMISSION_LINGER_S:
                    continue
            if len(parts) == MAX_SUBMISSIONS:
                more += 1
                continue
            failed = ar.failed_count
            running = running_of.get(id(ar), 0)
            waiting = total - done - running
            parts.append(_progress_row(ar.name, total, done - failed, failed, running, waiting,
                                       now - ar.submitted_at))
        self._finished_at = finished_at
        if more:
            parts.append(f'<div class="ipylb-sub ipylb-more">… and {more} more submissions</div>')
        self.progress.value = "".join(parts) or \
            '<div class="ipylb-sub ipylb-no-subs">no submissions in flight</div>'

    def _render_engines(self) -> None:
        rows = self.rows
        hidden = []
        rest = self._rest
        if len(rows) > MAX_ROWS:  # busiest first, the rest summed
            order = sorted(rows, key=lambda r: (r.state != "busy", -r.outstanding, -r.done,
                                                r.engine_id))
            rows, hidden = order[:MAX_ROWS], order[MAX_ROWS:]
        body = "".join(_engine_row(r) for r in rows)
        if hidden or rest:
            busy = sum(r.state == "busy" for r in hidden) + (rest["busy"] if rest else 0)
            dead = sum(r.state == "dead" for r in hidden)
            n = len(hidden) + (rest["engines"] if rest else 0)
            outstanding = sum(r.outstanding for r in hidden) + (rest["outstanding"] if rest else 0)
            done = sum(r.done for r in hidden) + (rest["completed"] if rest else 0)
            body += (f'<tr class="ipylb-engine-rest"><td>+{n}</td><td></td>'
                     f"<td>{busy} busy, {dead} dead</td><td colspan=6></td>"
                     f"<td>{outstanding}</td><td>{done}</td></tr>")
        self.engines.value = (
            '<table class="ipylb-engines"><tr><th>engine</th><th>host</th><th>state</th>'
            "<th>pid</th><th>CPU %</th><th>RSS MB</th><th>restarts</th><th>task</th>"
            f"<th>running for</th><th>outstanding</th><th>done</th></tr>{body}</table>"
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
        trees = impossible_trees(failures)
        tree = "".join(f'<div class="ipylb-tree">{html.escape(t)}</div>' for t in trees)
        self.failures.value = (
            f"<div><b>failures</b> ({len(failures)}, newest first)</div>"
            f'<table class="ipylb-failures"><tr><th>task</th><th>engine</th><th>error</th>'
            f"<th>reason</th></tr>{rows}</table>{tail}"
            + (f"<div><b>impossible dependencies</b>, root cause first:</div>{tree}"
               if tree else "")
        )


def _set_segments(mark: bq.Lines, groups: dict[str, list[tuple[float, float, int]]],
                  colour: Any) -> None:
    """One line per segment (x: start, end; y: lane), coloured by its group's key."""
    xs, ys, cs = [], [], []
    for key, segs in groups.items():
        c = colour(key)
        for a, b, lane in segs:
            xs.append((a, b))
            ys.append((lane, lane))
            cs.append(c)
    if not xs:
        xs, ys, cs = [(0.0, 0.0)], [(np.nan, np.nan)], ["#ffffff"]
    with mark.hold_sync():
        mark.x = np.array(xs, dtype=float)
        mark.y = np.array(ys, dtype=float)
        mark.colors = cs


def _short(key: str, n: int = 24) -> str:
    return key if len(key) <= n else key[:n - 1] + "…"


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    return f"{m}:{s:02d} min" if m < 60 else f"{m // 60}:{m % 60:02d} h"


def _progress_row(name: str, total: int, ok: int, failed: int, running: int, waiting: int,
                  elapsed: float) -> str:
    """One submission's bar: done (green), failed (red), running (blue), waiting (grey),
    with tasks/s since it was submitted and the ETA at that rate."""
    finished = ok + failed
    rate = finished / elapsed if elapsed > 0 else 0.0
    left = total - finished
    eta = "done" if not left else (f"ETA {_duration(left / rate)}" if rate > 0 else "ETA –")

    def seg(n: int, colour: str, cls: str) -> str:
        return f'<span class="{cls}" style="width:{100 * n / max(total, 1):.2f}%;' \
               f'background:{colour}"></span>'

    return (
        f'<div class="ipylb-sub" data-name="{html.escape(name)}">'
        f"<b>{html.escape(_short(name))}</b>"
        f'<div class="ipylb-bar">{seg(ok, "#59a14f", "ipylb-ok")}'
        f'{seg(failed, FAILED_COLOUR, "ipylb-failed")}{seg(running, "#4e79a7", "ipylb-running")}'
        f"</div><span class=\"ipylb-counts\">{finished}/{total} done · {failed} failed · "
        f"{running} running · {waiting} waiting</span> · {rate:.1f} tasks/s · {eta}</div>"
    )


def _engine_row(r: EngineRow) -> str:
    dead = r.state == "dead"
    cpu = "–" if r.cpu is None else f"{r.cpu:.0f}"
    rss = "–" if r.rss is None else f"{r.rss / 2**20:.0f}"
    ran = "" if r.running_s is None else _duration(r.running_s)
    return (
        f'<tr class="ipylb-engine" data-engine="{r.engine_id}">'
        f"<td>{r.engine_id}</td><td>{html.escape(r.host)}</td>"
        f'<td class="ipylb-{r.state}">{r.state}</td><td>{r.pid or "–"}</td>'
        f'<td class="ipylb-cpu">{cpu}</td><td class="ipylb-rss">{rss}</td>'
        f"<td>{r.restarts}</td><td class=\"ipylb-task\">{html.escape(_short(r.task))}</td>"
        f'<td class="ipylb-ran">{ran}</td>'
        f'<td>{"–" if dead else r.outstanding}</td><td>{r.done}</td></tr>'
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


def impossible_trees(failures: list[Any]) -> list[str]:
    """Impossible-dependency chains among ``failures`` (metadata dicts) as indented text
    trees, root cause first: each ImpossibleDependency hangs under the failed task its
    reason names (the scheduler's message names the dependency that made it impossible);
    a root is a failure that no other explains.  Trees without an impossible task are
    left out (a lone failure is in the table already)."""
    by_id = {str(m.get("msg_id")): m for m in failures}
    ids_re = re.compile("|".join(re.escape(i) for i in sorted(by_id, key=len, reverse=True)))
    parent: dict[str, str] = {}
    for mid, m in by_id.items():
        err = m.get("error")
        if getattr(err, "ename", "") != "ImpossibleDependency":
            continue
        for found in ids_re.findall(getattr(err, "evalue", "")):
            if found != mid:
                parent[mid] = found
                break
    children: dict[str, list[str]] = {}
    for child, p in parent.items():
        children.setdefault(p, []).append(child)
    trees = []
    for root in by_id:
        if root in parent or root not in children:
            continue
        lines: list[str] = []
        todo = [(root, 0)]
        while todo:  # depth first, children in the order they failed
            mid, depth = todo.pop()
            err = by_id[mid].get("error")
            ename = getattr(err, "ename", type(err).__name__)
            reason = getattr(err, "evalue", "") if depth == 0 else ""
            lines.append(f"{'    ' * depth}{'└─ ' if depth else ''}{mid}  {ename}"
                         + (f": {_short(reason, 80)}" if reason else ""))
            todo.extend((c, depth + 1) for c in reversed(children.get(mid, ())))
        trees.append("\n".join(lines))
    return trees
