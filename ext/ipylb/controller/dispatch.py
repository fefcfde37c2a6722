"""What leaves the controller: the scheduler core's commands carried out on the sockets.

:meth:`Dispatch._execute` turns each command into messages: an ``Assign`` into a task
for its engine (its function's frames first, if that engine does not hold them), a
``Deliver`` or ``Fail`` into a result for its client (and every client watching it),
``Steal``/``Cancel`` into requests to an engine, ``Interrupt``/``RestartEngine`` into
calls on the engine's kernel manager.  Tasks for one engine, and results for one client,
made within a drain of a socket leave batched (``TASKS``, ``RESULTS``: :func:`ipylb.wire.batch`,
signed once, each item under its producer's MAC), when the drain ends or every
``FLUSH_EVERY`` messages.  Peers that cannot map this host's shared memory get
segments' bytes inline.  An engine found unreachable is gone (its tasks go on elsewhere);
a segment that vanished fails its task, as an engine would.

A part of :class:`~ipylb.controller.hub.Controller` (a mixin: ``Controller`` owns the
state).  This is the hot path's second half: no copies of payloads, no logging.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import zmq

from .. import shm, wire
from ..core import events as ev
from .records import Function, Record

__all__ = ["Dispatch"]

# What an engine keeps of the task functions it was sent (the controller decides, see
# Dispatch._send_function): at most this many, and this many bytes, least recent dropped.
FUNCTIONS_HELD = 32
FUNCTION_BYTES_HELD = 512 << 20
# Results for one client that finish within one drain of the engines' socket leave as one
# RESULTS message (wire.batch), at most this many per message; a lone result is a RESULT.
RESULTS_BATCH = 256


class Dispatch:
    """The outgoing half of :class:`~ipylb.controller.hub.Controller`."""

    def _execute(self, commands: list[Any]) -> None:
        unreachable: list[int] = []
        unsendable: list[tuple[ev.Assign, str]] = []
        unasked: list[ev.Steal] = []
        for c in commands:
            t = type(c)
            if t is ev.Assign:
                rec = self.store[c.task_id]
                ident = self.engine_ident[c.engine_id]
                bufs, mac = rec.bufs, rec.bufs_mac
                fkey = rec.fn.key
                held = self.held[c.engine_id]
                try:
                    if fkey in held:
                        held.move_to_end(fkey)
                    elif not self._send_function(c.engine_id, ident, rec.fn, held):
                        unreachable.append(c.engine_id)
                        continue
                    if ident in self.remote:
                        bufs, mac = self.signer.inline(bufs, mac)
                except wire.WireError as e:  # its segment vanished: as an engine would say
                    unsendable.append((c, str(e)))
                    continue
                # A task with a walltime asks its engine to report its start.
                walltime = rec.flags and rec.flags.get("walltime")
                if self._auto:  # numbered (see __init__); 1: report its start
                    n = self._sent[c.engine_id] = self._sent.get(c.engine_id, 0) + 1
                    self._numbers[c.task_id] = n
                    head = (c.task_id, fkey, 1 if walltime else 0, n)
                else:
                    head = (c.task_id, fkey, 1) if walltime else (c.task_id, fkey)
                queued = self._tasks_out.get(ident)
                if queued is None:
                    self._tasks_out[ident] = [(head, bufs, mac)]
                else:
                    queued.append((head, bufs, mac))
            elif t is ev.Deliver:  # only ever in answer to the TaskDone of _attempt_ended
                rec = self.store[c.task_id]
                msg_id, rec.result, rec.result_bufs, rec.result_mac = self._arrived  # type: ignore[misc]
                rec.result_bufs = wire.detach(rec.result_bufs)  # kept: pin no receive buffer
                assert msg_id == c.task_id, (msg_id, c.task_id)
                self._deliver(rec)
            elif t is ev.Fail:
                rec = self.store[c.task_id]
                arrived = self._arrived
                if arrived is not None and arrived[0] == c.task_id:
                    # The verdict on the attempt the engine just reported (its walltime ran
                    # out): keep its times, its output and where it was interrupted.
                    r = arrived[1]
                    tb = r[6][2] if isinstance(r[6], tuple) and len(r[6]) > 2 else ""
                    rec.result = (c.engine_id, "error", r[2], r[3], r[4], r[5],
                                  (c.error, c.message, tb), rec.submitted)
                else:
                    rec.result = (c.engine_id, "error", None, time.time(), "", "",
                                  (c.error, c.message, ""), rec.submitted)
                rec.result_bufs, rec.result_mac = [], b""
                self._deliver(rec)
            elif t is ev.Steal:
                ident = self.engine_ident[c.engine_id]
                if ident in self._tasks_out and not self._send_tasks(ident):  # (sent first)
                    unreachable.append(c.engine_id)
                # its steal socket may not be connected (yet)
                if not self._to_engine(ident + b"/steal", wire.STEAL,
                                       (c.task_id, self._numbers[c.task_id])):
                    unasked.append(c)
            elif t is ev.Cancel:
                ident = self.engine_ident[c.engine_id]
                if not self._to_engine(ident, wire.CANCEL, c.task_id):
                    unreachable.append(c.engine_id)
            elif t is ev.Interrupt:
                self._interrupt_task(c.engine_id, c.task_id)
            elif t is ev.RestartEngine:
                self._restart_engine(c.engine_id, c.reason)
        for engine_id in unreachable:
            self._engine_gone(engine_id, "its connection to the controller is gone",
                              time.monotonic())
        for c in unasked:  # as if it had started: the task stays where it is
            self._execute(self.core.handle(ev.StealAnswered(c.task_id, c.engine_id, False,
                                                            time.monotonic())))
        for c, why in unsendable:
            rec = self.store[c.task_id]
            result = (c.engine_id, "error", None, time.time(), "", "", ("WireError", why, ""),
                      rec.submitted)
            self._attempt_ended(rec, c.engine_id, False, result, [], b"", time.monotonic(),
                                skipped=True)  # it never reached the engine

    def _send_function(self, engine_id: int, ident: bytes, fn: Function,
                       held: OrderedDict[bytes, int]) -> bool:
        """Send a function's frames to an engine that does not hold it, with the keys of
        the functions it is to drop to stay within ``FUNCTIONS_HELD``/``FUNCTION_BYTES_HELD``
        (least recently used first).  The engine drops only what it is told to, so ``held``
        is exactly what it holds.  False if the engine is unreachable; WireError if a
        segment of the function vanished."""
        bufs, mac = fn.bufs, fn.mac
        if ident in self.remote:
            bufs, mac = self.signer.inline(bufs, mac)
        drop = []
        total = sum(held.values()) + fn.nbytes
        while held and (len(held) >= FUNCTIONS_HELD or total > FUNCTION_BYTES_HELD):
            key, nbytes = held.popitem(last=False)
            drop.append(key)
            total -= nbytes
        held[fn.key] = fn.nbytes
        return self._to_engine(ident, wire.FUNCTION, (fn.key, drop), bufs, mac)

    def _flush_out(self) -> None:
        """Send what this turn of the main loop made: each engine its tasks, each client
        its results (one message each); an engine found unreachable is gone (which may
        assign its tasks elsewhere: those are sent too)."""
        while self._tasks_out or self._outbox:
            for ident in list(self._tasks_out):
                if not self._send_tasks(ident) and ident in self.engine_of:
                    self._engine_gone(self.engine_of[ident],
                                      "its connection to the controller is gone", time.monotonic())
            self._flush_results()

    def _send_tasks(self, ident: bytes) -> bool:
        """Send an engine the tasks assigned to it and not sent yet: one TASK, or one TASKS
        message for several (wire.batch: signed once, each task under its client's MAC).
        False if the engine is unreachable."""
        tasks = self._tasks_out.pop(ident, None)
        if not tasks:
            return True
        if len(tasks) == 1:
            head, bufs, mac = tasks[0]
            frames = self.signer.pack(wire.TASK, head, bufs, mac, ident)
        else:
            metas, bufs = wire.batch(tasks)
            frames = self.signer.pack(wire.TASKS, metas, bufs, b"", ident)
        return self._send_engine(ident, frames)

    def _to_engine(self, ident: bytes, kind: int, meta: Any, bufs: Sequence[Any] = (),
                   mac: bytes | None = None) -> bool:
        """Send an engine one message; False if it has disconnected (it is then treated as
        dead).  Its tasks not sent yet go first, and this is signed after them: messages
        keep their order, and their sequence numbers grow (wire's replay rule)."""
        if ident in self._tasks_out and not self._send_tasks(ident):
            return False
        return self._send_engine(ident, self.signer.pack(kind, meta, bufs, mac, ident))

    def _send_engine(self, ident: bytes, frames: list[Any]) -> bool:
        try:
            wire.send(self.engines, [ident, *frames])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return False
        return True

    def _deliver(self, rec: Record) -> None:
        r = rec.result
        if self._auto:
            self._numbers.pop(rec.msg_id, None)
        self.activity.finished(r[0], r[2], r[3], r[1] == "ok", rec.label or rec.func)
        self._send_result(rec.client, rec)
        if rec.watchers:
            for client in rec.watchers:
                self._send_result(client, rec)
            rec.watchers = []
        evicted = self.store.finished(rec)
        if evicted:
            self._forget(evicted)

    def _send_result(self, client: bytes, rec: Record) -> None:
        r = rec.result  # 8 fields (7 in records stored by older versions), then the label
        meta = (rec.msg_id, *r, None, rec.label) if len(r) == 7 else (rec.msg_id, *r, rec.label)
        bufs, mac = rec.result_bufs, rec.result_mac
        if len(bufs) > 1:  # segments: inline for a remote client, else a link it claims
            try:
                if client in self.remote:
                    bufs, mac = self.signer.inline(bufs, mac)
                else:
                    bufs = [b.link() if type(b) is shm.Segment else b for b in bufs]
            except wire.WireError as e:
                lost = ("WireError", f"task {rec.msg_id} finished, but its result is lost: {e}", "")
                meta = (*meta[:2], "error", *meta[3:7], lost, *meta[8:])
                bufs = []
        # Sent at the end of this turn of the main loop, with the others finished in it.
        box = self._outbox.get(client)
        if box is None:
            box = self._outbox[client] = []
        box.append((meta, bufs, mac))
        if len(box) >= RESULTS_BATCH:
            self._flush_client(client)

    def _note_domain(self, ident: bytes, domain: Any) -> None:
        if self.shm_domain is not None and domain != self.shm_domain:
            self.remote.add(ident)

    def _send_client(self, ident: bytes, kind: int, meta: Any, bufs: list[Any] = (), mac: bytes | None = None) -> None:
        if ident in self._outbox:  # results it is owed go first: messages keep their order
            self._flush_client(ident)
        wire.send(self.clients, [ident, *self.signer.pack(kind, meta, bufs, mac, ident)])

    def _flush_results(self) -> None:
        """Send every client the results waiting for it (one message each)."""
        for client in list(self._outbox):
            self._flush_client(client)

    def _flush_client(self, client: bytes) -> None:
        box = self._outbox.pop(client, None)
        if not box:
            return
        if len(box) == 1:
            self._send_client(client, wire.RESULT, *box[0])
        else:  # one signature for all; each result keeps its engine's MAC over its buffers
            metas, bufs = wire.batch(box)
            self._send_client(client, wire.RESULTS, metas, bufs, b"")

    def _broadcast(self, event: Any) -> None:
        for ident in self.listeners:
            self._send_client(ident, wire.EVENT, event)
