"""The controller process's garbage-collector policy: what survives a full collection is
frozen, so later full collections walk only what came since.

A controller is a long-lived process that holds many records (the core's ``Task`` per
queued task, a :class:`~ipylb.controller.records.Record` per task kept): a million queued
tasks are about three million objects the cyclic collector tracks.  CPython's default
policy (3.11) runs a full collection each time the objects that survived younger ones grow
by a quarter of those that survived the last full one, and every full collection walks all
of them: with a million tasks queued, a per-event cost 1.2-1.4x that of the same core with
the collector paused, and pauses of 0.3-1.4 s each (``ipylb bench --core``; issue 14 item 5).
The records cannot simply be left untracked: CPython tracks every instance of a class with
``__slots__`` (and they hold references to one another: a task's engine, its dependents).

So after each full collection, :func:`gc.freeze` moves its survivors (live, since the
collection just freed every unreachable cycle) into the permanent generation, which
collections skip.  Each object is then walked by at most one full
collection while it lives, and a full collection costs what was allocated since the last
one.  Frozen objects are still freed by reference counting the moment they are dropped (a
finished task's records are: they hold no cycles); what freezing forgoes is finding
*cycles* among them, so every ``thaw_every`` seconds (:data:`THAW_EVERY_S`) the survivors
are put back (:func:`gc.unfreeze`) instead, and the next full collection looks at every
object once: cyclic garbage that involves a long-lived object lives at most that long.

Installed by the controller's process entry (``python -m ipylb.controller``), not by the
:class:`~ipylb.controller.hub.Controller` class: it is a policy of the whole process.
``ipylb bench --core`` reports the core's per-event cost under it next to CPython's default.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

__all__ = ["THAW_EVERY_S", "GCPolicy"]

# Seconds between thaws: how long cyclic garbage involving a frozen (long-lived) object may
# live.  Each thaw costs one full collection over every live object (about 0.3-1.4 s with a
# million tasks queued, on this project's 2-core test machine), i.e. well under 1% of the time.
THAW_EVERY_S = 600.0


class GCPolicy:
    """Freeze the survivors of each full collection; thaw them every ``thaw_every`` seconds.

    :meth:`install` hooks :data:`gc.callbacks` (one policy per process: installing a second
    raises RuntimeError); :meth:`uninstall` removes the hook and thaws everything.
    ``clock`` gives seconds (``time.monotonic``).  ``thaws`` counts the thaws so far.
    """

    NAME = "freeze survivors of full collections"
    _installed: GCPolicy | None = None

    def __init__(self, thaw_every: float = THAW_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not thaw_every > 0:
            raise ValueError(f"thaw_every must be a positive number of seconds, not {thaw_every!r}")
        self.thaw_every = thaw_every
        self._clock = clock
        self._thawed = clock()
        self.thaws = 0

    def install(self, freeze_now: bool = False) -> GCPolicy:
        """Hook this policy into the collector of this process; returns self.  With
        ``freeze_now``, first collect and freeze what exists now (a process's modules and
        set-up: long-lived; at start-up, a cheap point to do it once)."""
        if GCPolicy._installed is not None:
            raise RuntimeError("a GC policy is already installed in this process "
                               "(uninstall() it first)")
        if freeze_now:
            gc.collect()
            gc.freeze()
        GCPolicy._installed = self
        gc.callbacks.append(self._after)
        return self

    def uninstall(self) -> None:
        """Remove the hook and put every frozen object back under the collector."""
        if GCPolicy._installed is self:
            gc.callbacks.remove(self._after)
            GCPolicy._installed = None
            gc.unfreeze()

    @staticmethod
    def installed() -> GCPolicy | None:
        """The policy installed in this process, if any."""
        return GCPolicy._installed

    def stats(self) -> dict[str, Any]:
        """The collector's state under this policy: ``policy`` (its name), ``frozen`` (objects
        in the permanent generation now), ``full_collections`` (since the process started),
        ``thaws``, ``thaw_every_s``, ``thresholds`` (``gc.get_threshold()``)."""
        return _stats(self.NAME, self.thaws, self.thaw_every)

    @staticmethod
    def default_stats() -> dict[str, Any]:
        """:meth:`stats`' keys for a process without a policy (CPython's default)."""
        return _stats("default", 0, None)

    def _after(self, phase: str, info: dict[str, int]) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        now = self._clock()
        if now - self._thawed >= self.thaw_every:
            self._thawed = now
            self.thaws += 1
            gc.unfreeze()  # the next full collection walks everything once
        else:
            gc.freeze()


def _stats(policy: str, thaws: int, thaw_every: float | None) -> dict[str, Any]:
    """The collector's state now, under ``policy`` (see :meth:`GCPolicy.stats`)."""
    return {"policy": policy, "frozen": gc.get_freeze_count(),
            "full_collections": gc.get_stats()[2]["collections"], "thaws": thaws,
            "thaw_every_s": thaw_every, "thresholds": gc.get_threshold()}
