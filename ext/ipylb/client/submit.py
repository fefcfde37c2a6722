"""How a client's tasks leave for the controller: as few SUBMIT messages as possible.

Tasks that share a function go in one message (up to :data:`SUBMIT_BATCH`), with the
function's frames once and each task's argument frames under a MAC of their own, so the
controller forwards each to any engine untouched; the function is named by a key (a MAC
over its content), so each engine is sent it once.  Submissions made back to back
(``apply_async`` in a loop) are held and leave together; a lone one goes at once.
Arguments over the cluster's frame limit fail their task here, before anything is sent.
Large frames between processes of one machine go through shared memory (:mod:`ipylb.shm`).

A part of :class:`~ipylb.client.client.Client` (a mixin: ``Client`` owns the state and
the send lock).  This is the hot path's first step: no copies of payloads.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

from .. import wire
from ..error import SerializationError
from .asyncresult import AsyncResult
from .link import ADD_ENGINES
from .outcome import Outcome

__all__ = ["Submitting"]

# Tasks per submission message (a map sends its items in batches).
SUBMIT_BATCH = 256
# Submissions made back to back (within this many seconds of the one before, as apply_async
# in a loop: ~0.05-0.1 ms apart) are held and leave together, one message for many tasks
# (see Client._submit); one after a pause (a lone apply_sync, whose round trip alone is
# longer) is sent at once.
BURST_S = 250e-6


class Submitting:
    """The sending side of :class:`~ipylb.client.client.Client`."""

    def _new_msg_id(self) -> str:
        return f"{self.session}-{next(self._ids)}"

    def _submit(self, fbufs: list[Any], flags: dict[str, Any] | None, ar: Any,
                tasks: list[tuple[str, list[Any]]], base: int = 0, record: bool = True,
                tag: tuple[str | None, str] = (None, "")) -> None:
        """Send tasks that share one function, in as few messages as possible.

        ``fbufs`` are the function's frames (:func:`ipylb.serialize.dumps_function`); each
        task is ``(msg_id, arg_frames)``, filed as item ``base + i`` of ``ar`` (an
        AsyncResult, or anything with its ``_deliver(index, outcome)`` and ``wait``).  The
        function's frames have a MAC of their own, and a key (a MAC over their content): the
        controller sends a function to each engine once and then names it by that key.
        Each task's MAC covers its argument frames, so the controller can forward each
        task to a different engine untouched.  ``tag`` is ``(label, function name)``: the
        controller keeps it in the tasks' records (sent once per message, shared by its
        tasks).
        """
        self._check_open()
        if not self._engine_ids and not self._warned_empty:
            self._warned_empty = True
            warnings.warn(f"the cluster has no engines: tasks wait until one registers "
                          f"({ADD_ENGINES})", RuntimeWarning, stacklevel=3)
        mac, placer, limit = self._signer.bufs_mac, self._placer, self._max_frame
        fbufs, fmac, fkey = self._function_frames(fbufs)
        n = limit and wire.oversized(fbufs, limit)
        if n:
            raise SerializationError(_too_big("the function", n, limit))
        for start in range(0, len(tasks), SUBMIT_BATCH):
            batch = tasks[start:start + SUBMIT_BATCH]
            metas, bufs, sent = [], list(fbufs), []
            for i, (msg_id, args) in enumerate(batch, base + start):
                if placer is not None and len(args) > 1:
                    args = placer.place(args)
                n = limit and wire.oversized(args, limit)
                if n:  # the controller would refuse the message (and drop us): fail it here
                    why = _too_big(f"task {msg_id}'s arguments", n, limit)
                    self._outcomes[msg_id] = failed = Outcome.lost(msg_id, why, "SerializationError")
                    ar._deliver(i, failed)
                    continue
                metas.append((msg_id, len(args), mac(args)))
                bufs.extend(args)
                sent.append((msg_id, i))
            if not sent:
                continue
            # Under the lock, so that close() either sees these as pending or refuses them.
            with self._send_lock:
                self._check_open()
                for msg_id, i in sent:
                    self._pending[msg_id] = (ar, i)
                if record:
                    self.history.extend(msg_id for msg_id, _args in batch)
                    if start == 0 and isinstance(ar, AsyncResult):
                        self._submissions.add(ar)
                self._send_submission(flags, fbufs, fkey, fmac, metas, bufs, tag)

    def _send_submission(self, flags: dict[str, Any] | None, fbufs: list[Any], fkey: bytes,
                         fmac: bytes, metas: list[tuple], bufs: list[Any],
                         tag: tuple[str | None, str]) -> None:
        """Send one SUBMIT (``bufs``: the function's frames, then each task's), or hold it
        to leave with the ones right behind it; called with the send lock held.

        Submissions made back to back (the one before less than ``BURST_S`` ago) and alike
        (its function, flags and tag) are held, and the alike ones after join: they leave as
        one message when ``SUBMIT_BATCH`` tasks are held, when this client waits for a
        result or asks the controller anything, when it closes, or when the sending thread
        gets to run (Python lets another thread run within its switch interval, 5 ms, so
        a submitting loop sends every few ms).  A submission after a pause goes at once:
        a lone ``apply_sync`` waits for no batch."""
        now = time.monotonic()
        burst, self._last_submit = now - self._last_submit < BURST_S, now
        # Like the one before (function, tag, flags): the next may well be like it too.
        last, self._last_kind = self._last_kind, (fkey, tag, flags)
        alike = len(fbufs) == 1 and last is not None and last[0] == fkey and \
            last[1] == tag and (last[2] is flags or last[2] == flags)
        held = self._held
        if held is not None:  # (held is always the last one's kind)
            if alike and len(held[5]) + len(metas) <= SUBMIT_BATCH:
                held[5].extend(metas)
                held[6].extend(bufs[1:])  # (the function's frames are the held ones)
                if len(held[5]) == SUBMIT_BATCH:
                    self._send_held()
                return
            self._send_held()
        # Held only in a run of alike ones: a loop whose every task has flags of its own (a
        # DAG's `after`) sends each at once, without waking the sending thread for nothing.
        if burst and alike and len(metas) < SUBMIT_BATCH:
            self._held = [flags, len(fbufs), fkey, fmac, tag, metas, bufs]
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                                name="ipylb-client-sender")
                self._sender.start()
            self._held_cond.notify()
            return
        self._submit_messages += 1
        wire.send(self._send_sock, self._signer.pack(
            wire.SUBMIT, (flags, (len(fbufs), fkey, fmac), metas, tag), bufs, b""))

    def _send_held(self) -> None:
        """Send the held submission (with the send lock held)."""
        flags, nf, fkey, fmac, tag, metas, bufs = self._held  # type: ignore[misc]
        self._held = None
        self._submit_messages += 1
        wire.send(self._send_sock, self._signer.pack(
            wire.SUBMIT, (flags, (nf, fkey, fmac), metas, tag), bufs, b""))

    def _flush(self) -> None:
        """Send the held submission now (before this thread waits for a result)."""
        if self._held is not None:
            with self._send_lock:
                if self._held is not None and not self._closed:
                    self._send_held()

    def _send_loop(self) -> None:
        """The sending thread: sends a held submission once it gets to run."""
        with self._held_cond:
            while not self._closed:
                if self._held is None:
                    self._held_cond.wait()
                elif self._gone is None:
                    self._send_held()
                else:  # the controller is gone: its tasks have failed already
                    self._held = None

    def _function_frames(self, fbufs: list[Any]) -> tuple[list[Any], bytes, bytes]:
        """The function's frames as sent (large ones placed in shared memory, afresh each
        time: the controller takes each segment it receives), their MAC, and ``fkey``: a
        MAC over their content, which names the function on the engines (the same function
        submitted again is not sent to them again).  ``fkey`` is worked out once for the
        same frames submitted again (imap's batches)."""
        last = self._last_function
        if last is not None and last[0] is fbufs:
            fkey = last[1]
        else:
            fkey = self._signer.bufs_mac(fbufs)
            self._last_function = (fbufs, fkey)
        placed = self._placer.place(fbufs) if self._placer is not None and len(fbufs) > 1 \
            else fbufs
        return placed, (fkey if placed is fbufs else self._signer.bufs_mac(placed)), fkey


def _too_big(what: str, n: int, limit: int) -> str:
    return (f"{what} pickled to a frame of {n} bytes, over the cluster's limit of {limit} bytes "
            "(`ipylb cluster start --max-frame-mb`); on the controller's machine, arrays and "
            "bytes go through shared memory instead: pass large data as numpy arrays or bytes")
