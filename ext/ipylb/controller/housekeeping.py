"""The controller's periodic chores, run between messages at least every
:data:`HOUSEKEEPING_S`: the liveness of what it serves and the forgetting of what no
longer needs keeping.

- Its parent process gone (a private cluster): stop.
- An engine's kernel dead (jupyter_client's restarter says so) or its heartbeat silent
  (:mod:`.heartbeat`): the engine is gone, restarted if ours, and its tasks go on
  elsewhere.  A result it sent just before is read first, so it is not lost.
- An engine whose heartbeat answers but whose Python has not run for :data:`FROZEN_S`
  (its health reports stopped: a thread holds the GIL in C code): the log says so once.
  Between tasks the engine's own watchdog ends it (:class:`ipylb.engine.guard.IdleWatchdog`)
  and the tasks sent to it run elsewhere, no retry used; during a task that may be the
  task's own long C call: its walltime, if it has one, stops it.
- Peers silent for ``forget_after`` s, watches of finished tasks, and shared-memory
  segments nobody owns: forgotten or removed.

A part of :class:`~ipylb.controller.hub.Controller` (a mixin: ``Controller`` owns the
state and runs :meth:`Housekeeping._housekeeping` from its main loop).  Nothing here is
on a task's path.
"""

from __future__ import annotations

import logging
import os

from .. import shm

__all__ = ["Housekeeping"]

log = logging.getLogger("ipylb.controller")

# Housekeeping (engine liveness, parent watch) runs at least this often.
HOUSEKEEPING_S = 0.25
# Watches of finished tasks (live output) are forgotten this often (seconds); till then
# they cost nothing but memory: a report for a task not assigned is dropped anyway.
LIVE_PRUNE_S = 5.0
# Shared-memory segments nobody owns (their producer died before sending them, or a client
# never claimed its link) are removed this long after they were written, checked this often.
ORPHAN_GRACE_S = 300.0
ORPHAN_SWEEP_S = 60.0
# Idle peers are looked for this often (seconds; more often when ``forget_after`` is short).
FORGET_SWEEP_S = 30.0
# An engine alive by heartbeat whose health reports (every second, from a Python thread)
# stopped this long ago (seconds) has had no Python run: see Housekeeping._frozen.
FROZEN_S = float(os.environ.get("IPYLB_FROZEN_S", "20"))


class Housekeeping:
    """The periodic chores of :class:`~ipylb.controller.hub.Controller`."""

    def _housekeeping(self, now: float) -> None:
        """One round of the chores (``now``: ``time.monotonic()``); an engine found gone
        here is answered for at once (its tasks fail or go on elsewhere)."""
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("parent process %s is gone: shutting down", self.parent_pid)
            self.stop(f"the process that started it (pid {self.parent_pid}) is gone")
            return
        if self.live and now >= self._next_live_prune:
            self._prune_live()
            self._next_live_prune = now + LIVE_PRUNE_S
        if now >= self._next_forget:
            self._forget_idle_peers()
            self._next_forget = now + self._forget_sweep
        if self.shm_prefix and now >= self._next_orphan_sweep:
            shm.sweep_orphans(self.shm_prefix, ORPHAN_GRACE_S)
            self._next_orphan_sweep = now + ORPHAN_SWEEP_S
        # Before an engine's death fails (or re-runs) its task: a result it sent just before
        # may still wait in our socket, so take what is there first.
        if self.launcher is not None:
            dead = self.launcher.poll_dead()
            if dead:
                self._drain(self.engines, self._on_engine)
            for engine_id, reason, fate in dead:
                restarting = fate == "restarting it"
                if engine_id is not None:
                    frozen = self._frozen_end(engine_id)
                    if frozen:  # between tasks: no task sent to it started: they run elsewhere
                        reason = (f"no Python ran in it for {FROZEN_S:.0f} s between tasks: a "
                                  "thread a task left holds the GIL in C code (the tasks sent to "
                                  f"it run elsewhere; its threads then: {frozen[:1500]})")
                    self._engine_gone(engine_id, f"{reason}; restarting it" if restarting else
                                      reason, now, idle=bool(frozen))
                elif restarting:
                    log.warning("%s; restarting it", reason)
                else:
                    self._broadcast(("engine_failed", reason))
                if fate == "down":  # jupyter_client's restarter gave up on the slot
                    log.error("an engine stays down: %s", reason)
                    self._broadcast(("engine_down", reason))
                    self._check_stranded()
        silent = self.heartbeats.tick(now)
        if silent:
            self._drain(self.engines, self._on_engine)
        for engine_id, reason in silent:
            km = self.launcher.manager(engine_id) if self.launcher is not None else None
            if km is None or not self.launcher.autorestart:  # type: ignore[union-attr]
                self._engine_gone(engine_id, reason, now)
                if km is not None:  # ours but hung: make sure it is really gone
                    km.shutdown_kernel(now=True)
                continue
            failed = self.launcher.restart(engine_id)  # type: ignore[union-attr]  # hung: a new kernel
            self._engine_gone(engine_id, f"{reason}; {failed or 'restarting it'}", now)
            if failed:
                self._broadcast(("engine_down", f"engine {engine_id}: {failed}"))
        frozen = self.heartbeats.frozen(now, FROZEN_S)
        if frozen:
            self._frozen(frozen, now)

    def _frozen(self, frozen: list[tuple[int, str | None, float]], now: float) -> None:
        """Engines alive by heartbeat whose Python has not run for FROZEN_S: a thread holds
        the GIL in C code (a task's own long C call, or a thread a task left).  Said once in
        the log; the engine cannot tell, and the controller cannot tell which (the task's
        last report may predate a task that started since).  Between tasks the engine's
        watchdog ends it (see _reap_dead); a task's walltime stops it."""
        self._drain(self.engines, self._on_engine)  # reports waiting in our socket first
        for engine_id, task, silent in frozen:
            if self.heartbeats.still_frozen(engine_id, now, FROZEN_S) \
                    and self.heartbeats.warn_once(engine_id):
                log.warning("engine %d: no Python has run in it for %.0f s (its health reports "
                            "stopped) while its heartbeat answers: a thread holds the GIL in C "
                            "code (the task it runs%s, or a thread a task left); its tasks wait "
                            "until it lets go (a walltime stops a task that does not)",
                            engine_id, silent, f", {task}," if task else "")

    def _forget_idle_peers(self) -> None:
        """Forget peers not heard from for ``forget_after`` s: replay state, listener place."""
        for sender in self.signer.forget_idle(self.forget_after):
            prefix = sender[:-1]  # a client's two sockets: <prefix>s and <prefix>r
            if prefix in self.refused and not (self.signer.knows(prefix + b"s")
                                               or self.signer.knows(prefix + b"r")):
                self.refused.discard(prefix)  # its messages are refused by the floor now
            if sender in self.listeners:
                self.listeners.discard(sender)
                self.remote.discard(sender)
                log.info("forgot client %r: not heard from for %.0f s", sender, self.forget_after)
