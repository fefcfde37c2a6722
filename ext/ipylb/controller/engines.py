"""The engine socket, and each engine's life as the controller sees it.

What engines send (every message checked by :mod:`ipylb.wire` first): registration
(versions and fields checked before any state changes: no ghost engine, none half
registered), results (``DONE``, or ``DONES`` for several finished back to back), start
reports, answers to steals, health reports, live output, and ``LEAVING`` (a task left it
unfit to serve).  Each becomes an event for the scheduler core.  An engine's end (dead,
silent, unreachable, restarted) is :meth:`EngineTraffic._engine_gone`, whatever noticed
it: the core hears it once, then clients do.  Restarts and interrupts go through the
jupyter_client KernelManager that started the engine, ours or that of the ``ipylb engine
join`` relaying its interrupts.

A part of :class:`~ipylb.controller.hub.Controller` (a mixin: ``Controller`` owns the
state).  A result is on the hot path: :meth:`EngineTraffic._on_done` does the checks
and one core event, no more.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import Any

import zmq

from .. import compat, shm, wire
from ..core import events as ev
from .records import Record

__all__ = ["EngineTraffic"]

log = logging.getLogger("ipylb.controller")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# What a registration may carry, and the types of the fields (others are kept as they come);
# pid and heartbeat are required: an engine nobody can watch could hold its tasks forever.
_REGISTER_FIELDS = {"connection_file": str, "pid": int, "hostname": str, "tag": str,
                    "heartbeat": str, "heartbeat_key": (str, type(None)),
                    "shm_domain": (str, type(None)), "shm_producer": (str, type(None)),
                    "watchdog": str}
_REGISTER_REQUIRED = ("pid", "heartbeat")


class EngineTraffic:
    """The engine side of :class:`~ipylb.controller.hub.Controller`."""

    def _on_engine(self, frames: list[Any]) -> None:
        ident = frames[0].bytes
        kind, sender, meta, bufs, bufs_mac = self.signer.unpack(frames[1:])
        self.received[kind] += 1
        if kind == wire.DONE:
            self._on_done(ident, meta, bufs, bufs_mac)
        elif kind == wire.DONES:  # results finished back to back, each under its own MAC
            for item in wire.unbatch(meta, bufs):
                try:
                    self._on_done(ident, *item)
                except wire.WireError as e:  # one bad entry: the others still count
                    log.warning("dropped a result from %r: %s", ident, e)
        elif kind == wire.STARTED:
            engine_id = self.engine_of.get(ident)
            if engine_id is None or not isinstance(meta, str):
                raise wire.WireError("a start report from an unregistered engine, or without a msg_id")
            self._execute(self.core.handle(ev.TaskStarted(meta, engine_id, time.monotonic())))
        elif kind == wire.REGISTER:
            self._on_register(ident, meta)
        elif kind == wire.PROBE:  # `ipylb engine join --url`: what a joining engine needs
            about = {"nonce": meta, "controller_id": self.ident.decode(),
                     "client_url": self.client_url, "engine_url": self.engine_url,
                     "curve_serverkey": self.curve_public.decode() if self.curve_public else None}
            wire.send(self.engines, [ident, *self.signer.pack(wire.ABOUT, about, to=sender)])
        elif kind == wire.STOLEN:  # an engine's answer to a STEAL, from its own steal socket
            if not sender.endswith(b"/steal") or type(meta) is not tuple or len(meta) != 2 \
                    or type(meta[0]) is not str or type(meta[1]) is not bool:
                raise wire.WireError("a malformed steal answer")
            engine_id = self.engine_of.get(sender.removesuffix(b"/steal"))
            if engine_id is None:  # from an engine declared dead since: its tasks moved on
                return
            self._execute(self.core.handle(ev.StealAnswered(meta[0], engine_id, meta[1],
                                                            time.monotonic())))
        elif kind == wire.HEALTH:  # signed by the engine's own health socket
            engine_id = self.engine_of.get(sender.removesuffix(b"/health"))
            if engine_id is not None and sender.endswith(b"/health") and type(meta) is tuple \
                    and len(meta) == 4:
                cpu, rss, task, since = meta
                self.activity.health[engine_id] = {"cpu": cpu, "rss": rss, "task": task,
                                                   "since": since}
                self.heartbeats.reported(engine_id, time.monotonic(), task)
                if task in self.live:  # (repeated each report: a lost request is no loss)
                    self._watch(sender, task)
        elif kind == wire.OUTPUT:
            self._on_output(sender, meta)
        elif kind == wire.LEAVING:  # after its last answer: a task left it unfit to serve
            engine_id = self.engine_of.get(ident)
            if engine_id is not None and type(meta) is tuple and len(meta) == 2 \
                    and isinstance(meta[0], str):
                self._restart_engine(engine_id, meta[0][:2000], idle=meta[1] is True)
        else:
            raise wire.WireError(f"unexpected message kind {kind!r} on the engine socket")

    def _on_register(self, ident: bytes, meta: dict[str, Any]) -> None:
        # Checked before any state changes: no ghost engine, no engine half registered.
        if not isinstance(meta, dict):
            raise wire.WireError(f"a registration without engine info ({type(meta).__name__})")
        refusal = compat.mismatch(
            self.versions, meta.get("versions"), "the cluster's controller",
            f"an engine (pid {meta.get('pid')} on {meta.get('hostname')})")
        if refusal is not None:  # whoever started it (launcher, `ipylb engine join`) hears why
            log.warning("refused an engine: %s", refusal)
            wire.send(self.engines, [ident, *self.signer.pack(wire.REFUSED, refusal, to=ident)])
            self._broadcast(("engine_refused", refusal))
            if self.launcher is not None:  # a restart would be refused again
                self.launcher.no_restart(meta.get("tag", ""))
            return
        bad = [k for k, t in _REGISTER_FIELDS.items() if k in meta and not isinstance(meta[k], t)]
        bad += [k for k in _REGISTER_REQUIRED if not meta.get(k)]
        if bad:
            raise wire.WireError(f"a registration with missing or malformed field(s) "
                                 f"{', '.join(bad)}")
        if ident in self.engine_of:
            raise wire.WireError(f"engine {self.engine_of[ident]} registered a second time")
        engine_id = self._next_engine
        try:  # every engine is watched: one that stops answering is dead after heartbeat_timeout
            self.heartbeats.add(engine_id, meta["heartbeat"], time.monotonic(),
                                meta.get("heartbeat_key"))
        except zmq.ZMQError as e:
            raise wire.WireError(f"a registration with a heartbeat url zmq refuses: {e}") from None
        if meta.get("watchdog"):  # an engine kernel's health thread reports: watched from now
            self.heartbeats.reported(engine_id, time.monotonic(), None)
        self._next_engine += 1
        self.engine_ident[engine_id] = ident
        self.held[engine_id] = OrderedDict()
        self.engine_of[ident] = engine_id
        self.engine_info[engine_id] = meta
        self._note_domain(ident, meta.get("shm_domain"))
        if self.launcher is not None:
            restarts = self.launcher.registered(meta.get("tag", ""), engine_id)
            if restarts is not None:
                meta["restarts"] = restarts  # of its slot before it: engine_info() shows it
        wire.send(self.engines, [ident, *self.signer.pack(wire.REGISTERED, engine_id, to=ident)])
        log.info("engine %d registered (pid %s)", engine_id, meta.get("pid"))
        # A delta, not the list: n registrations cost O(n) messages' worth, not O(n^2).
        self._broadcast(("engine_added", engine_id))
        self._execute(self.core.handle(ev.EngineAdded(engine_id, time.monotonic())))

    def _engine_gone(self, engine_id: int, reason: str, now: float, idle: bool = False) -> None:
        ident = self.engine_ident.pop(engine_id, None)
        if ident is None:
            return
        self.held.pop(engine_id, None)
        self._sent.pop(engine_id, None)
        self._tasks_out.pop(ident, None)  # never sent: the core puts them back in the queue
        del self.engine_of[ident]
        self.remote.discard(ident)
        info = self.engine_info.pop(engine_id, None)
        if info is not None and self.relays:
            self.relays.pop(info.get("tag"), None)
        if info is not None and shm.valid_producer(info.get("shm_producer"), self.shm_prefix):
            shm.sweep_producer(info["shm_producer"])  # what it wrote and never sent
        if info is not None and info.get("watchdog"):
            _remove(info["watchdog"])
        self.activity.forget(engine_id)
        self.heartbeats.remove(engine_id)
        log.warning("engine %d is gone: %s", engine_id, reason)
        if not self.engine_ident and self.launcher is not None and self.launcher.pending:
            self._broadcast(("restarting", len(self.launcher.pending)))  # before "no engines"
        self._execute(self.core.handle(ev.EngineRemoved(engine_id, reason, now, idle)))
        # After its tasks' failures: a client that sees the engine gone sees them failed.
        self._broadcast(("engine_removed", engine_id))
        self._check_stranded()

    def _frozen_end(self, engine_id: int) -> str | None:
        """What an engine's idle watchdog wrote (its threads' tracebacks, on one line) if it
        fired: the engine ended because no Python ran in it between tasks (guard.IdleWatchdog)."""
        path = self.engine_info.get(engine_id, {}).get("watchdog")
        if not path:
            return None
        try:
            with open(path, errors="replace") as f:
                text = f.read(4096)
        except OSError:
            return None
        return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or None

    def _check_stranded(self) -> None:
        """No engine is left, and none is being restarted: tell clients, rather than let
        their tasks wait in silence."""
        if self.engine_ident or (self.launcher is not None and self.launcher.pending):
            return
        waiting = self.core.queue_status()["unassigned"]
        if waiting:
            self._broadcast(("stranded", waiting))

    def _on_done(self, ident: bytes, meta: tuple, bufs: list[Any], bufs_mac: bytes) -> None:
        engine_id = self.engine_of.get(ident)
        if engine_id is None:
            if type(meta) is tuple and len(meta) > 1 and meta[1] == "unmet":
                # An engine that asked to be restarted (LEAVING) refuses the tasks queued
                # on it after that (hwm "auto" or > 1: up to 15): they never ran there and
                # were placed again when it left.  Nothing is lost: no warning per task.
                return
            raise wire.WireError(f"a result from an unregistered engine {ident!r}")
        if type(meta) is not tuple or len(meta) < 7 or type(meta[0]) is not str:
            raise wire.WireError("a malformed result")
        msg_id, status = meta[0], meta[1]
        rec = self.store.get(msg_id)
        if rec is None:
            raise wire.WireError(f"a result for unknown task {msg_id!r}")
        now = time.monotonic()
        if status == "unmet":
            error = meta[6] if len(meta) > 6 else None
            reason = str(error[1]) if isinstance(error, tuple) and len(error) > 1 else ""
            self._execute(self.core.handle(ev.TaskUnmet(msg_id, engine_id, now, reason[:500])))
            return
        started, ended = meta[2], meta[3]
        ran = ended - started if type(started) is float and type(ended) is float else None
        self._attempt_ended(rec, engine_id, status == "ok", (engine_id, *meta[1:], rec.submitted),
                            bufs, bufs_mac, now, ran, status == "aborted")

    def _attempt_ended(self, rec: Record, engine_id: int, ok: bool, result: tuple,
                       bufs: list[Any], mac: bytes, now: float, ran: float | None = None,
                       skipped: bool = False) -> None:
        """An attempt of ``rec`` ended on an engine (``ran``: seconds it ran there, by the
        engine's clock, if known; ``skipped``: the engine did not run it, a CANCEL came
        first).  Its result becomes the task's only if
        the core says it is final (a Deliver): a failed attempt with retries left, and a
        stale or repeated report, leave the record as it was, pending until its last
        attempt ends (issue 9: a task waiting for its retry is not finished anywhere)."""
        self._arrived = (rec.msg_id, result, bufs, mac)
        try:
            self._execute(self.core.handle(ev.TaskDone(rec.msg_id, engine_id, ok, now, ran,
                                                       skipped)))
        finally:
            self._arrived = None

    def _interrupt_task(self, engine_id: int, task_id: str) -> None:
        """A task's walltime expired: interrupt it on its engine, through the kernel's Jupyter
        control channel (``ipylb_interrupt_request``, served by the engine's control thread
        while the task runs: see ipylb.engine.kernel).  Only that task: the engine checks it
        is still the one running."""
        if not self._interrupt(engine_id, task_id):
            log.warning("task %s passed its walltime on engine %d, which neither this controller "
                        "nor a process relaying its interrupts (`ipylb engine join`) started: "
                        "it cannot be interrupted from here", task_id, engine_id)
            return
        log.info("task %s passed its walltime: interrupting it on engine %d", task_id, engine_id)

    def _interrupt(self, engine_id: int, task_id: str | None) -> bool:
        """Interrupt an engine (``task_id``: only that task, if it still runs) through the
        KernelManager that started it: ours (:meth:`EngineLauncher.interrupt`), or the one
        in the process that relays its interrupts (an EVENT ``("interrupt", engine_id, tag,
        task_id)`` to that process's client, which calls its own launcher's ``interrupt``).
        False if neither exists."""
        if self.launcher is not None and self.launcher.interrupt(engine_id, task_id):
            return True
        tag = self.engine_info.get(engine_id, {}).get("tag")
        relay = self.relays.get(tag) if tag else None
        if relay is None or relay not in self.listeners:
            return False
        self._send_client(relay, wire.EVENT, ("interrupt", engine_id, tag, task_id))
        return True

    def _restart_engine(self, engine_id: int, reason: str, idle: bool = False) -> None:
        """Forget an engine and restart its kernel through jupyter_client (the new kernel
        registers as a new engine): the core gave up on it (its task ignored a walltime
        interrupt), or it asked (LEAVING; ``idle``: it answered every task sent to it).
        An engine we did not start is told to stop instead."""
        ident = self.engine_ident.get(engine_id)
        km = self.launcher.manager(engine_id) if self.launcher is not None else None
        failed = self.launcher.restart(engine_id) if km is not None else None  # type: ignore[union-attr]
        self._engine_gone(engine_id, f"restarted: {reason}", time.monotonic(), idle)
        if failed:
            log.error("engine %d stays down: %s", engine_id, failed)
            self._broadcast(("engine_down", f"engine {engine_id}: {failed}"))
        if km is None and ident is not None:
            log.warning("engine %d was not started by this controller: told to stop, not restarted",
                        engine_id)
            self._to_engine(ident, wire.STOP, None)
