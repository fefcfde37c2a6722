"""The client socket: what clients send the controller.

Each client connects two DEALERs: ``<id>s`` to submit and ask, ``<id>r`` to receive.
``HELLO`` (the version handshake, :mod:`ipylb.compat`: a refused client's submissions
are dropped unread), ``BYE``, ``REQUEST`` (routed by name to the answers in
:mod:`.requests` and :mod:`.live`; an error is sent back as its type and message) and
``SUBMIT``: one or more tasks sharing a function.  A submission is checked whole before
the core sees it (the core trusts its events' types); a task that cannot be taken is
answered with an error result at once, never left waiting.

A part of :class:`~ipylb.controller.hub.Controller` (a mixin: ``Controller`` owns the
state).  A submission is on the hot path: each task is one record and one core event.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import compat, wire
from ..core import events as ev
from ..error import PURE_REFUSES
from .records import Function, Record

__all__ = ["ClientTraffic"]

log = logging.getLogger("ipylb.controller")


class ClientTraffic:
    """The client side of :class:`~ipylb.controller.hub.Controller`."""

    def _on_client(self, frames: list[Any]) -> None:
        ident = frames[0].bytes
        kind, _sender, meta, bufs, bufs_mac = self.signer.unpack(frames[1:])
        self.received[kind] += 1
        if kind == wire.SUBMIT:
            if self.refused and ident[:-1] in self.refused:
                raise wire.WireError("a submission from a client refused at its hello")
            self._on_submit(ident, meta, bufs, bufs_mac)
        elif kind == wire.REQUEST:
            if type(meta) is not tuple or len(meta) != 3 or type(meta[1]) is not str:
                raise wire.WireError("a malformed request")
            req_id, op, arg = meta
            reply_to = ident[:-1] + b"r"
            if ident == reply_to and ident not in self.listeners:
                # A receiving socket's ping: it listens again after it was forgotten, and
                # gets the whole engine list (it missed the added/removed events meanwhile).
                self.listeners.add(ident)
                self._send_client(ident, wire.EVENT, ("engines", self._engine_list()))
            try:
                value, ok = self._requests[op](reply_to, arg), True
            except Exception as e:  # a KeyError's str() is its repr: send the message itself
                text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                value, ok = (type(e).__name__, str(text)), False
            self._send_client(reply_to, wire.REPLY, (req_id, ok, value))
        elif kind == wire.HELLO:
            theirs = meta.get("versions") if isinstance(meta, dict) else None
            refusal = compat.mismatch(self.versions, theirs, "the cluster's controller",
                                      "this client")
            if refusal is not None:
                log.warning("refused a client: %s", refusal)
                self.refused.add(ident[:-1])
                self._send_client(ident, wire.WELCOME, {"refused": refusal,
                                                        "versions": self.versions})
                return
            self.listeners.add(ident)
            self._note_domain(ident, meta.get("shm_domain") if isinstance(meta, dict) else None)
            info = {"engines": self._engine_list(), "scheme": self.scheme, "hwm": self.hwm,
                    "versions": self.versions}
            self._send_client(ident, wire.WELCOME, info)
        elif kind == wire.BYE:  # a client closed: stop telling it about engines
            self.listeners.discard(ident)
            self.remote.discard(ident)
        else:
            raise wire.WireError(f"unexpected message kind {kind!r} on the client socket")

    def _on_submit(self, ident: bytes, meta: tuple, bufs: list[Any], _mac: bytes) -> None:
        """One or more tasks sharing a function (its frames first); each task carries
        the MAC of its argument frames."""
        if type(meta) is not tuple or len(meta) != 4 or type(meta[2]) is not list \
                or type(meta[1]) is not tuple or len(meta[1]) != 3:
            raise wire.WireError("a malformed submission")
        flags, (nf, fkey, fmac), tasks, tag = meta
        if type(nf) is not int or not 1 <= nf <= len(bufs) or type(fkey) is not bytes \
                or type(fmac) is not bytes:
            raise wire.WireError("malformed function frames in a submission")
        # (label, function name), shared by the submission's tasks
        label, func = tag if type(tag) is tuple and len(tag) == 2 else (None, None)
        client = ident[:-1] + b"r"
        try:
            _check_flags(flags)
            if not (label is None or type(label) is str) or type(func) is not str \
                    or len(func) > 200 or (label is not None and len(label) > 200):
                raise wire.WireError("a malformed label or function name in a submission")
        except wire.WireError as e:
            self._refuse(client, tasks, str(e))
            raise
        bufs = wire.detach(bufs)  # kept in records: pin no receive buffer
        fn, charge = self.functions.get(fkey), 0
        if fn is None:  # a function we hold already keeps its frames: these are dropped
            fn = self.functions[fkey] = Function(fkey, bufs[:nf], fmac)
            charge = fn.nbytes
        pos, end = nf, len(bufs)
        now = time.monotonic()
        for k, task in enumerate(tasks):
            # Each task checked before it is kept (those before a malformed one are valid;
            # it and those after it are refused).
            if type(task) is not tuple or len(task) != 3 or type(task[0]) is not str \
                    or type(task[1]) is not int or not 0 <= task[1] <= end - pos \
                    or type(task[2]) is not bytes:
                why = f"a malformed task in a submission ({task!r:.80})"
                self._refuse(client, tasks[k:], why)
                raise wire.WireError(why)
            msg_id, nargs, task_mac = task
            task_bufs = bufs[pos:pos + nargs]
            pos += nargs
            if msg_id in self.store.records:
                log.warning("dropped a task with a duplicate msg_id %r", msg_id)
                continue
            self._new_task(Record(msg_id, client, fn, task_bufs, task_mac, flags, label, func,
                                  charge), now)
            charge = 0

    def _refuse(self, client: bytes, tasks: Any, why: str) -> None:
        """Answer each task of a submission we cannot take with an error result (no record
        is kept), rather than leave its submitter waiting for it."""
        now = time.time()
        for task in tasks if isinstance(tasks, list) else ():
            msg_id = task[0] if isinstance(task, tuple) and task else None
            if isinstance(msg_id, str):
                error = ("WireError", f"the controller refused task {msg_id}: {why} (are the "
                         "client and the cluster running different versions of ipylb?)", "")
                self._send_client(client, wire.RESULT,
                                  (msg_id, None, "error", None, now, "", "", error, now))

    def _new_task(self, rec: Record, now: float) -> None:
        self.store.add(rec)
        flags = rec.flags
        if flags is not None and self.scheme == "pure":
            self._execute([ev.Fail(rec.msg_id, "ImpossibleDependency", PURE_REFUSES)])
            return
        if flags is None:
            event = ev.TaskSubmitted(rec.msg_id, now)
        else:
            event = ev.TaskSubmitted(rec.msg_id, now, **flags)
        self._execute(self.core.handle(event))

    def _engine_list(self) -> list[int]:
        return sorted(self.engine_ident)


def _check_flags(flags: Any) -> None:
    """Raise WireError unless ``flags`` are what a client sends.  Checked here because the
    core trusts its events' types: a wrong one would fail halfway through an event and
    leave the scheduler inconsistent (a signed but malformed submission, a peer bug)."""
    if flags is None:
        return
    if not isinstance(flags, dict) or not flags.keys() <= {"after", "follow", "timeout", "retries",
                                                           "targets", "walltime"}:
        raise wire.WireError("malformed task flags")
    targets = flags.get("targets")
    if targets is not None and not (isinstance(targets, frozenset) and targets
                                    and all(type(t) is int for t in targets)):
        raise wire.WireError("malformed targets in task flags")
    for name in ("after", "follow"):
        spec = flags.get(name)
        if spec is not None and not (
            isinstance(spec, ev.DepSpec) and isinstance(spec.ids, frozenset)
            and all(isinstance(i, str) for i in spec.ids)
            and all(type(b) is bool for b in (spec.all, spec.success, spec.failure))
        ):
            raise wire.WireError(f"malformed {name!r} dependency in task flags")
    timeout, retries = flags.get("timeout"), flags.get("retries", 0)
    if timeout is not None and (type(timeout) not in (int, float) or not timeout >= 0):
        raise wire.WireError("malformed timeout in task flags")
    walltime = flags.get("walltime")
    if walltime is not None and (type(walltime) not in (int, float) or not walltime >= 0):
        raise wire.WireError("malformed walltime in task flags")
    if type(retries) is not int or retries < 0:
        raise wire.WireError("malformed retries in task flags")
