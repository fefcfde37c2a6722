"""The engine's health reports and live output, from a thread of their own.

Every :data:`HEALTH_S` the engine tells the controller its CPU % and RSS (psutil) and the
task running now (HEALTH), from a DEALER socket of its own (zmq sockets are not shared
between threads), so the reports go on while a task holds the main thread.  The same
socket hears WATCH (a client wants the live output of a task, issue 15): while that task
runs here, what it wrote since the last report goes out as OUTPUT, at most every
:data:`LIVE_S`.  Nothing here is on a task's path: the main thread only sets
``running``/``running_since``, which this thread reads.

A part of :class:`~ipylb.engine.taskchannel.TaskChannel` (a mixin: the channel owns the
state and starts the thread).
"""

from __future__ import annotations

import math
import time
from typing import Any

import zmq

from .. import connection, wire
from ..error import safe_str
from . import guard
from .report import safe_name

__all__ = ["HealthReports"]

# Seconds between two health reports (CPU %, RSS, current task) to the controller.
HEALTH_S = 1.0
# The live output of a task a client watches (issue 15): at most one report every LIVE_S
# seconds, with at most LIVE_BYTES bytes of each stream (the newest; a note says how many
# were skipped).  So a task printing without pause costs its client a bounded stream.
LIVE_S = 0.25
LIVE_BYTES = 16 << 10
# Watched tasks queued here, not running yet, are remembered for at most this long (seconds)
# and this many.
WANTED_S = 600.0
WANTED_MAX = 1000
# Bound now: what this thread uses, whatever a task patches later.
_monotonic, _sleep, _ceil = time.monotonic, time.sleep, math.ceil


class HealthReports:
    """The health thread of :class:`~ipylb.engine.taskchannel.TaskChannel`."""

    def _report_health(self) -> None:
        """Every HEALTH_S, tell the controller this process's CPU % and RSS (psutil) and
        the task running now, from a socket of its own (zmq sockets are not shared
        between threads): it works while a task holds the main thread, and for engines
        on other hosts.  A report that cannot be sent at once is dropped.

        The same socket hears WATCH from the controller (a client wants the live output of
        the task running here): then, every LIVE_S at most, what that task wrote since
        the last report goes out as OUTPUT (:meth:`_report_output`), until it ends."""
        import psutil

        ident = self.signer.sender + b"/health"
        signer = wire.Signer(self._cluster["key"].encode(), ident,
                             self._cluster["controller_id"].encode())
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, ident)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 2)
        sock.setsockopt(zmq.SNDTIMEO, 0)
        connection.secure(sock, self._cluster)
        sock.connect(self.engine_url)
        proc = psutil.Process()
        proc.cpu_percent(None)
        failed = False
        while True:  # (a daemon thread: it ends with the engine)
            try:
                self._health_loop(sock, signer, proc)
            except Exception as e:  # noqa: BLE001 - a task broke what this thread uses
                # (math.ceil = None, psutil patched): start over, and say so once.
                if not failed:
                    failed = True
                    self.capture.log(f"ipylb engine {self.engine_id}: its health thread failed "
                                     f"({safe_name(e)}: {safe_str(e, 200)}): a task replaced "
                                     "something it uses; it starts over")
                _sleep(HEALTH_S)

    def _health_loop(self, sock: zmq.Socket, signer: wire.Signer, proc: Any) -> None:
        """The health thread's work (:meth:`_report_health`), until something fails."""
        # The watched task running: [msg_id, (stdout, stderr) byte positions reported, next
        # report]; and the watched tasks not seen running yet, with when they were asked for.
        live: list[Any] | None = None
        wanted: dict[str, float] = {}
        next_health = _monotonic() + HEALTH_S
        while True:
            now = _monotonic()
            wake = next_health if live is None else min(next_health, live[2])
            if wanted:
                wake = min(wake, now + LIVE_S)
            # (rounded up: a poll of 0 ms before the deadline would spin until it)
            if sock.poll(max(0, _ceil((wake - now) * 1000)), zmq.POLLIN):
                self._watch(sock, signer, live, wanted)
            now = _monotonic()
            if wanted and (live is None or live[0] != self.running):  # one of them started?
                live = self._started(wanted, now) or live  # (the ended one's result has the rest)
            if live is not None and now >= live[2]:
                live = self._report_output(sock, signer, live, now)
            if now < next_health:
                continue
            next_health = now + HEALTH_S
            if self.engine_id is None:
                continue
            self.watchdog.arm(self)
            if self.leaving_for is None and guard.fds_exhausted():  # checked again between tasks
                self._loop.call_soon_threadsafe(self._check_fds)
            task = self.running
            try:  # psutil reads /proc: a file to open
                meta = (proc.cpu_percent(None), proc.memory_info().rss, task,
                        self.running_since if task else None)
                wire.send(sock, signer.pack(wire.HEALTH, meta))
            except (OSError, zmq.ZMQError):  # out of fds, the controller slow or gone: next time
                pass

    def _watch(self, sock: zmq.Socket, signer: wire.Signer, live: list[Any] | None,
               wanted: dict[str, float]) -> None:
        """Take the WATCH requests waiting on the health socket into ``wanted`` (at most
        WANTED_MAX, the oldest dropped).  The task reported already is left as it is: the
        controller repeats a request while its task runs, and nothing is sent twice."""
        while True:
            try:
                kind, _sender, meta, _bufs, _mac = signer.unpack(wire.recv(sock))
            except zmq.Again:
                return
            except wire.WireError as e:
                self.capture.log(f"ipylb engine: dropped a message: {e}")
                continue
            if kind == wire.WATCH and type(meta) is str and (live is None or live[0] != meta):
                wanted.pop(meta, None)
                wanted[meta] = _monotonic()
                if len(wanted) > WANTED_MAX:
                    del wanted[next(iter(wanted))]

    def _started(self, wanted: dict[str, float], now: float) -> list[Any] | None:
        """The watched task running now, if one is (to be reported from its first byte
        at once); requests older than WANTED_S are dropped (a task stolen by another
        engine, or aborted, never runs here; one that does later is asked for again)."""
        running = self.running
        if running is not None and wanted.pop(running, None) is not None:
            return [running, ((0, 0), (0, 0)), 0.0]
        for msg_id in [m for m, t in wanted.items() if now - t > WANTED_S]:
            del wanted[msg_id]
        return None

    def _report_output(self, sock: zmq.Socket, signer: wire.Signer, live: list[Any],
                       now: float) -> list[Any] | None:
        """Send what the watched task wrote since the last report (at most LIVE_BYTES per
        stream); None once it no longer runs (its result carries the rest)."""
        msg_id = live[0]
        # The attempt's start stamp (its result's too): a task retried here is another
        # attempt, whose text starts afresh (peek checks both under the reader's lock).
        started = self.running_since
        got = self.capture.peek(live[1], LIVE_BYTES,
                                lambda: self.running == msg_id and self.running_since == started)
        if got is None:
            return None
        (out, out_end, out_chars), (err, err_end, err_chars) = got
        live[2] = now + LIVE_S
        if out or err:  # positions for the client in characters of the result's text
            try:
                wire.send(sock, signer.pack(wire.OUTPUT, (msg_id, (out, out_chars),
                                                          (err, err_chars), started)))
            except zmq.ZMQError:  # not sent: the same bytes (and newer) go with the next one
                return live
            live[1] = ((out_end, out_chars), (err_end, err_chars))
        return live
