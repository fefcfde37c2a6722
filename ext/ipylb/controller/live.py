"""Live output (issue 15): what a pending task prints, shown while it runs.

A client asks for it with the ``stream`` request (``AsyncResult.display_outputs``,
``%%lb``).  The engine running the task is asked over its health socket (``WATCH``) and
reports the task's new output (``OUTPUT``), which goes to each client that asked as an
EVENT.  A task that moves (a retry, a steal) is asked for again when its new engine's
health report names it; watches of finished tasks are pruned by housekeeping.  Only
tasks someone watches cost anything: results never wait for this.

A part of :class:`~ipylb.controller.hub.Controller` (a mixin: ``Controller`` owns the
state, ``live``: the clients that want each pending msg_id's output).
"""

from __future__ import annotations

from typing import Any

import zmq

from .. import wire

__all__ = ["LiveOutput"]


class LiveOutput:
    """The live-output part of :class:`~ipylb.controller.hub.Controller`."""

    def _watch(self, health: bytes, msg_id: str) -> None:
        """Ask an engine (its health socket) for the live output of the task it runs."""
        try:
            wire.send(self.engines, [health, *self.signer.pack(wire.WATCH, msg_id, to=health)])
        except zmq.ZMQError:  # its health socket is gone: its engine's end is noticed elsewhere
            pass

    def _on_output(self, sender: bytes, meta: Any) -> None:
        """A watched task's new output: an EVENT ``("output", msg_id, (stdout, end),
        (stderr, end), started)`` to each client that asked for it (ends are character
        positions in the text of the task's streams, as its result will carry it; started:
        the attempt's start stamp, as its result will carry it), nothing once the task has
        finished.  Only the engine the task is assigned to speaks for it: a report from any
        other socket is dropped."""
        engine_id = self.engine_of.get(sender.removesuffix(b"/health"))
        if not (engine_id is not None and sender.endswith(b"/health")
                and type(meta) is tuple and len(meta) == 4 and type(meta[0]) is str
                and type(meta[3]) is float
                and all(type(m) is tuple and len(m) == 2 and type(m[0]) is str
                        and type(m[1]) is int for m in meta[1:3])):
            raise wire.WireError("a malformed live output report, or one from no engine")
        clients = self.live.get(meta[0])
        if not clients or self.core.engine_of(meta[0]) != engine_id:
            return  # nobody asked, the task has ended, or it is not this engine's
        for client in clients:  # type: ignore[union-attr]
            if client in self.listeners:
                self._send_client(client, wire.EVENT, ("output", *meta))

    def _prune_live(self) -> None:
        """Forget watches of tasks that have finished (or were purged)."""
        for msg_id in [m for m in self.live if (r := self.store.records.get(m)) is None
                       or r.result is not None]:
            del self.live[msg_id]

    def _req_stream(self, client: bytes, msg_ids: Any) -> int:
        """A client wants the live output of these pending tasks of its own or another
        client's (``AsyncResult.display_outputs``, ``%%lb``): the engine each is assigned
        to is asked for it now (it reports once the task runs); a task assigned later, or
        elsewhere (a retry, a steal), is asked for when its engine's health report (every
        HEALTH_S) names it as running.  Returns how many of them are pending."""
        if not (isinstance(msg_ids, list) and all(type(m) is str for m in msg_ids)):
            raise ValueError("stream takes a list of msg_ids")
        watched = 0
        for msg_id in msg_ids:
            rec = self.store.records.get(msg_id)
            if rec is None or rec.result is not None:
                continue
            self.live.setdefault(msg_id, set()).add(client)
            watched += 1
            engine_id = self.core.engine_of(msg_id)
            if engine_id is not None:
                self._watch(self.engine_ident[engine_id] + b"/health", msg_id)
        return watched
