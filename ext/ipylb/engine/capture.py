"""A task's output: everything written to file descriptors 1 and 2 while it runs.

When the engine starts, fds 1 and 2 become, for good, the write ends of two pipes (``dup2``),
the way ipykernel's ``OutStream(watchfd=True)`` captures a cell's output at the fd level.
What a task writes there by any means (``print``, ``os.write(1, ...)``, C extensions, child
processes that inherit the fds) goes into the pipes, in the order the OS received it.
``sys.stdout``/``sys.stderr`` of a task are two long-lived, line-buffered text streams on
fds 1 and 2 (``fileno()``, ``buffer``, ``encoding``), so an object that kept a reference to
them in one task writes to the task that runs when it writes.

A reader thread files what arrives under the running task; between tasks it passes output
on to where fds 1 and 2 pointed before (ipykernel's own fd watcher, which shows it to an
attached ``jupyter console`` and copies it to the controller's log; or the log itself).  When a task ends, the main
thread flushes the streams and reads what is still in the pipes itself, under the reader's
lock: everything written before the end is the task's, nothing later is.  Child processes
that outlive a task write to whichever task runs when they write, or between tasks.
Threads are told apart where Python writes (``sys.stdout``): what a thread started by a task
writes there after that task ended goes to the engine's log, not into the task running then
(:class:`_StrayAwareStream`); thread pools' workers write to the task running.

Cost on the hot path: two attribute swaps to start a task; four flushes, one ``poll``, a lock
and two ``dup2`` to end it.  The ``dup2`` put the pipes back on fds 1 and 2 whatever the task
did to them (closed them, or pointed them elsewhere and left them so): otherwise every later
task's output on the engine would vanish, or land where that one task sent its own.
ipykernel's own machinery is not used per task: its stream buffers output for its IO thread
and would need a round trip to that thread at the end of every task.
"""

from __future__ import annotations

import fcntl
import io
import os
import select
import sys
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

# At most this many bytes of each stream are kept per task (IPYLB_OUTPUT_LIMIT): the rest is
# read and dropped, with a note, so a task that prints without end cannot exhaust memory.
OUTPUT_LIMIT = int(os.environ.get("IPYLB_OUTPUT_LIMIT", 8 * 1024 * 1024))
_PIPE_SIZE = 1024 * 1024  # fewer wake-ups of the reader for chatty tasks (Linux only)
_CHUNK = 65536
# While a task runs, the reader wakes at most this often (seconds): a task printing line by line
# then costs a write per line, not also a thread switch; the pipe holds what comes meanwhile.
_BATCH_S = 0.005
_BAD = select.POLLERR | select.POLLNVAL
# Bound now: a task that patches os or time (``time.sleep = None``) must not stop the reader
# thread (a task printing more than the pipe holds would then block for good), nor the end
# of every later task (``os.dup2 = None``).
_read, _write, _sleep = os.read, os.write, time.sleep
_dup2, _set_blocking, _ioctl = os.dup2, os.set_blocking, fcntl.ioctl


class TaskStream(io.TextIOWrapper):
    """``sys.stdout``/``sys.stderr`` while tasks run: UTF-8 text on fd 1 or 2, line-buffered,
    shared by all tasks.  Closing it (or its ``buffer``) only flushes it: the engine serves on."""

    def close(self) -> None:
        self.flush()


# Threads of these modules are pools' workers: they run whatever task gives them work.
_POOLS = frozenset({"concurrent.futures.thread", "multiprocessing.pool"})


class _StrayAwareStream(TaskStream):
    """A TaskStream once a task has started a thread (the class of the streams changes then:
    until that, writes cost nothing more): text that a thread started by an earlier task
    writes goes to the engine's log, as output between tasks does, not into the task that
    runs now.  The thread's own task gets what it writes while that task runs."""

    _capture: Capture
    _index: int

    def write(self, s: str) -> int:
        if threading.get_ident() != _MAIN and type(s) is str:
            owner = getattr(threading.current_thread(), "_ipylb_task", None)
            capture = self._capture
            if owner is not None and owner != capture.seq:
                try:
                    _write(capture._original[self._index], s.encode("utf-8", "backslashreplace"))
                except OSError:
                    pass
                return len(s)
        return super().write(s)


_MAIN = threading.main_thread().ident


class _Buffer(io.BufferedWriter):
    def close(self) -> None:
        self.flush()


def _streams(capture: Capture) -> tuple[TaskStream, TaskStream]:
    cls = _StrayAwareStream if capture.threads else TaskStream
    streams = tuple(cls(_Buffer(io.FileIO(fd, "w", closefd=False)), encoding="utf-8",
                        errors="backslashreplace", line_buffering=True) for fd in (1, 2))
    for i, s in enumerate(streams):
        s._capture, s._index = capture, i  # type: ignore[attr-defined]
    return streams  # type: ignore[return-value]


def _track_threads(capture: Capture) -> None:
    """Mark each thread started while a task runs (or by such a thread) with that task
    (``Capture.seq``), and make the streams stray-aware at the first one."""
    start = threading.Thread.start
    main = threading.main_thread()

    def tracked_start(self: threading.Thread) -> None:
        parent = threading.current_thread()
        if parent is main:
            owner = capture.seq if capture._sinks is not None else None
        else:
            owner = getattr(parent, "_ipylb_task", None)
        if owner is not None and getattr(getattr(self, "_target", None), "__module__",
                                         None) not in _POOLS:
            self._ipylb_task = owner  # type: ignore[attr-defined]
            if not capture.threads:
                capture.threads = True
                for s in capture.streams:
                    s.__class__ = _StrayAwareStream
        start(self)

    tracked_start.__doc__ = start.__doc__
    threading.Thread.start = tracked_start  # type: ignore[method-assign]


class _Sink:
    """One task's bytes on one stream, up to OUTPUT_LIMIT."""

    __slots__ = ("data", "dropped")

    def __init__(self) -> None:
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = OUTPUT_LIMIT - len(self.data)
        if len(chunk) <= room:
            self.data += chunk
            return
        if room > 0:
            self.data += chunk[:room]
        self.dropped += len(chunk) - max(room, 0)

    def take(self, name: str) -> str:
        """The text so far (with a note of what was dropped), and start over empty."""
        if not self.data and not self.dropped:
            return ""
        text = self.data.decode("utf-8", "replace")
        if self.dropped:
            text += (f"\n[ipylb: {self.dropped} more bytes of {name} were dropped: a task keeps "
                     f"at most {OUTPUT_LIMIT} bytes per stream (IPYLB_OUTPUT_LIMIT)]\n")
        self.data = bytearray()
        self.dropped = 0
        return text


def live_text(data: bytes | bytearray, start: int, limit: int,
              chars: int = 0) -> tuple[str, int, int]:
    """The text of ``data[start:]``, the byte position it ends at, and the character
    position it ends at in the result's text (``data`` decoded as :meth:`_Sink.take` does,
    given ``chars``, the character position of ``start``), for live output.

    At most ``limit`` bytes: of more, the newest are kept after a note of how many were
    skipped (the full output still comes with the result).  A UTF-8 character cut by the
    end is left for the next call; a cut one at the start of the kept bytes is skipped.
    Positions in characters, not bytes, are what the client can find in the result's
    text: an invalid byte there is one U+FFFD, three bytes when encoded again."""
    end = len(data)
    if end <= start:
        return "", start, chars
    skipped = 0
    if end - start > limit:
        skipped = end - limit - start
        start = end - limit
        while start < end and data[start] & 0xC0 == 0x80:  # a continuation byte
            start += 1
            skipped += 1
        chars += len(bytes(data[start - skipped:start]).decode("utf-8", "replace"))
    cut = end
    i = end - 1
    while i > start and end - i < 4 and data[i] & 0xC0 == 0x80:
        i -= 1
    lead = data[i]
    need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 \
        else 1
    if end - i < need:  # the last character is not all there yet
        cut = i
    text = bytes(data[start:cut]).decode("utf-8", "replace")
    chars += len(text)
    if skipped:
        text = (f"[ipylb: {skipped} bytes of live output skipped (at most {limit} bytes per "
                "report); the full output comes with the result]\n") + text
    return text, cut, chars


def _pending(fd: int) -> int:
    """Bytes waiting in a pipe."""
    return int.from_bytes(_ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


class Capture:
    """Owns fds 1 and 2 of the engine: ``begin()`` and ``end()`` bracket each task."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pair = (_Sink(), _Sink())  # one task's at a time, emptied by end()
        self._sinks: tuple[_Sink, _Sink] | None = None  # the pair while a task runs
        self._original = (os.dup(1), os.dup(2))  # where output went before (not inherited)
        self._open()
        self.seq = 0  # the task running or last run (threads are marked with it)
        self.threads = False  # a task has started a thread: the streams are stray-aware
        self.streams = _streams(self)
        _track_threads(self)

    def _open(self) -> None:
        """New pipes on fds 1 and 2, and a reader thread for them."""
        reads, writes = [], []
        for fd in (1, 2):
            r, w = os.pipe()
            os.set_blocking(r, False)
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            except (AttributeError, OSError):
                pass
            os.dup2(w, fd)
            reads.append(r)
            writes.append(w)
        self._reads, self._writes = tuple(reads), tuple(writes)
        self._poll = select.poll()
        for r in reads:
            self._poll.register(r, select.POLLIN)
        threading.Thread(target=self._pump, args=(self._reads,), daemon=True,
                         name="ipylb-output").start()

    def _reopen(self) -> None:
        """A task closed or replaced one of our pipe's ends: start over with new ones."""
        with self._lock:
            for fd in (*self._reads, *self._writes):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._open()

    # -- the reader thread -----------------------------------------------------------

    def _pump(self, reads: tuple[int, int]) -> None:
        poller = select.poll()
        for r in reads:
            poller.register(r, select.POLLIN)
        while True:
            # The timeout lets a thread whose pipes were replaced notice it and end.
            events = poller.poll(1000)
            if self._sinks is not None:  # a task writes: let it go on, read in batches
                _sleep(_BATCH_S)
                events = poller.poll(0)
            idle: list[tuple[int, bytes]] = []
            with self._lock:
                if self._reads is not reads:
                    return
                for fd, ev in events:
                    if ev & _BAD:
                        return
                    i = reads.index(fd)
                    for _ in range(16):  # then let go of the lock: a task may be ending
                        try:
                            chunk = _read(fd, _CHUNK)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            return
                        if not chunk:  # every write end closed: end() starts over
                            return
                        sinks = self._sinks
                        if sinks is not None:
                            sinks[i].add(chunk)
                        else:
                            idle.append((i, chunk))
            for i, chunk in idle:  # outside the lock: the log may be slow
                try:
                    _write(self._original[i], chunk)
                except OSError:
                    pass

    # -- the main thread ---------------------------------------------------------------

    def begin(self) -> tuple[Any, Any]:
        """Start filing output under a new task; returns what ``end`` restores."""
        self._sinks = self._pair
        self.seq += 1
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.streams
        return saved

    def end(self, saved: tuple[Any, Any]) -> tuple[str, str]:
        """Stop filing under the task: restore ``sys.stdout``/``sys.stderr`` to ``saved``,
        and return the task's (stdout, stderr) text."""
        sys.stdout, sys.stderr = saved
        try:
            for s in self.streams:
                s.flush()
                if s.encoding != "utf-8":  # reconfigured by the task: we decode UTF-8
                    raise ValueError
        except Exception:  # detached, its file closed, re-encoded: new streams for the next task
            self.streams = _streams(self)
        for s in (sys.__stdout__, sys.__stderr__):
            try:
                s.flush()  # type: ignore[union-attr]
            except Exception:
                pass
        broken = False
        with self._lock:
            sinks = self._sinks
            self._sinks = None
            try:
                for fd, ev in self._poll.poll(0):  # the pipes with output left
                    if ev & _BAD:
                        raise OSError(f"fd {fd} closed")
                    # What is in the pipe now was written before the task ended.
                    i = self._reads.index(fd)
                    left = _pending(fd)
                    while left > 0:
                        chunk = _read(fd, min(left, _CHUNK))
                        if not chunk:
                            break
                        sinks[i].add(chunk)  # type: ignore[index]
                        left -= len(chunk)
            except OSError:
                broken = True
        if not broken:  # fds 1 and 2 are our pipes again, whatever the task did to them
            try:
                _dup2(self._writes[0], 1)
                _dup2(self._writes[1], 2)
                # and blocking: O_NONBLOCK a task set on them (os.set_blocking(1, False),
                # asyncio's connect_write_pipe(sys.stdout)) is the pipes' own, and made a
                # later task's print of more than the pipe holds fail with BlockingIOError.
                # One F_GETFL each when unchanged.
                _set_blocking(self._writes[0], True)
                _set_blocking(self._writes[1], True)
            except OSError:
                broken = True
        if broken:
            self._reopen()
        return sinks[0].take("stdout"), sinks[1].take("stderr")  # type: ignore[index]

    def peek(self, since: tuple[tuple[int, int], tuple[int, int]], limit: int,
             current: Callable[[], bool]) -> tuple[tuple[str, int, int], ...] | None:
        """What the running task wrote to stdout and stderr after positions ``since``
        (per stream: bytes, characters), for its live output (the health thread's, not the
        main thread's): per stream ``(text, byte position after it, character position
        after it)``, at most ``limit`` bytes each (the newest, after a note of how many were
        skipped; see :func:`live_text`).  None if no task runs, or
        ``current()`` (asked under the reader's lock) says it is not the one wanted: the
        task running under that lock cannot end, so what is read is its own."""
        with self._lock:
            sinks = self._sinks
            if sinks is None or not current():
                return None
            (out, out_chars), (err, err_chars) = since
            return (live_text(sinks[0].data, out, limit, out_chars),
                    live_text(sinks[1].data, err, limit, err_chars))

    def log(self, text: str) -> None:
        """Write a line of the engine's own to the controller's log (never a task's output)."""
        try:
            _write(self._original[1], text.encode("utf-8", "replace") + b"\n")
        except OSError:
            pass
