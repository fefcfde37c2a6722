"""The controller's answers to clients' requests (``REQUEST`` frames: ``(req_id, op, arg)``):
queue status, activity, results by msg_id, redelivery, resubmission, ``db_query``,
purge, abort, interrupt, shutdown, adding engines, and ``validate`` (live output's
``stream`` is in :mod:`.live`).  Each answer is computed on the controller's main loop, between messages;
the core is reached only through ``Scheduler.handle``.  A part of :class:`~ipylb.controller.hub.Controller`
(a mixin: ``Controller`` owns the state).
"""

from __future__ import annotations

import heapq
import time
from typing import Any

from .. import connection, limits, shm, wire
from ..core import events as ev
from .activity import ANSWER_TASKS
from .gcpolicy import GCPolicy
from .records import Record, parse_query

__all__ = ["Requests"]

# What controller_stats calls each kind of message the controller receives.
KIND_NAMES = {getattr(wire, name): name.lower() for name in (
    "HELLO", "SUBMIT", "REQUEST", "BYE", "REGISTER", "DONE", "DONES", "STARTED", "PROBE",
    "HEALTH", "OUTPUT", "LEAVING", "STOLEN")}


# Why an engine cannot be interrupted from here (for the KeyError of an interrupt request).
_UNREACHABLE = ("was started neither by this controller nor by an `ipylb engine join` still "
                "connected to it: interrupt it through the kernel manager that started it")

class Requests:
    """The ``_req_*`` handlers (and :meth:`validate`) of
    :class:`~ipylb.controller.hub.Controller`."""

    def validate(self) -> dict[str, int]:
        """Check the scheduler core's invariants and that this shell agrees with it; raise
        AssertionError naming the first broken one.  Sound at any time a request is served:
        the core changes only inside ``handle``, which runs to completion between messages.
        (The ``validate`` request: tests and ``ipylb soak`` ask for it while serving.)

        Returns the sizes of what grows with use: listeners, peers' replay state, records."""
        self.core.validate()
        engines = set(self.core.engines)
        if engines != set(self.engine_ident):
            raise AssertionError(f"engines registered here {sorted(self.engine_ident)} "
                                 f"!= the scheduler's {sorted(engines)}")
        if {v: k for k, v in self.engine_ident.items()} != self.engine_of:
            raise AssertionError("engine ids and socket identities do not match one to one")
        for msg_id, rec in self.store.records.items():
            if rec.result is None and self.core.task_state(msg_id) is None:
                raise AssertionError(f"task {msg_id} is pending here, unknown to the scheduler")
        return {"listeners": len(self.listeners), "senders": self.signer.senders,
                "records": len(self.store.records), "engines": len(self.engine_ident)}

    def _req_stats(self, _client: bytes, _arg: Any) -> dict[str, Any]:
        """``rc.controller_stats()``: messages received by kind, the process's GC policy and
        collector state, and the pipeline's state (see :meth:`ipylb.Client.controller_stats`)."""
        messages = {KIND_NAMES.get(kind, str(kind)): n for kind, n in sorted(self.received.items())}
        policy = GCPolicy.installed()
        gc_state = policy.stats() if policy is not None else GCPolicy.default_stats()
        return {"messages": messages, "messages_received": sum(messages.values()), "gc": gc_state,
                "pipeline": self.core.pipeline_status()}

    def _req_queue_status(self, _client: bytes, verbose: Any) -> dict[Any, Any]:
        status = self.core.queue_status(verbose=verbose is True)
        for engine_id, info in self.engine_info.items():  # how often its slot was restarted
            if engine_id in status:
                status[engine_id]["restarts"] = info.get("restarts", 0)
        return status

    def _req_activity(self, _client: bytes, arg: Any) -> dict[str, Any]:
        """What the dashboard draws (one round trip per refresh).  ``arg``: ``(seq, second)``
        of its last answer (``(0, 0)`` at first), or ``(seq, second, top)``.  Answers the
        tasks finished since ``seq`` (at most ``activity.ANSWER_TASKS``, each ``(engine_id,
        started, completed, ok, label or function)``), per-engine one-second buckets
        ``[second, finished, failed, busy seconds]`` from ``second`` on, queue status, and
        per live engine its host, pid, restarts, health (CPU %, RSS bytes) and current task
        ``(msg_id, key, since)``.

        With ``top`` (>= 1) and more live engines than that, only the ``top`` busiest
        (outstanding tasks, then busy seconds in their buckets) are described one by one,
        with their buckets of the whole window; ``rest`` sums the others (see
        ``Client.activity``), so the answer's size is bounded whatever the engine count.
        The work here stays one pass over the engines' counts."""
        act = self.activity
        if not (type(arg) is tuple and len(arg) in (2, 3) and all(type(a) is int for a in arg)
                and (len(arg) == 2 or arg[2] >= 1)):
            raise ValueError("activity takes (seq, second) or (seq, second, top): ints, top >= 1")
        seq, second = arg[:2]
        top = arg[2] if len(arg) == 3 else None
        now = time.time()
        act.prune(now)
        last, tasks, skipped = act.since(seq)
        status = self._req_queue_status(_client, False)
        shown: Any = self.engine_info
        rest = None
        if top is not None and len(shown) > top:
            shown, rest = self._busiest(status, top)
            buckets = {e: list(act.buckets.get(e, ())) for e in shown}
            status = {e: status[e] for e in (*shown, "unassigned")}
        else:
            buckets = {e: [x for x in b if x[0] >= second] for e, b in act.buckets.items()}
        engines = {}
        for engine_id in shown:
            info = self.engine_info[engine_id]
            h = act.health.get(engine_id, {})
            task = h.get("task")
            rec = self.store.records.get(task) if task else None
            engines[engine_id] = {
                "host": connection.engine_host(info), "pid": info.get("pid"),
                "restarts": info.get("restarts", 0), "cpu": h.get("cpu"), "rss": h.get("rss"),
                "task": None if rec is None else (task, rec.label or rec.func, h.get("since")),
            }
        answer = {"now": now, "seq": last, "tasks": tasks, "skipped": skipped,
                  "buckets": buckets, "status": status, "engines": engines}
        if rest is not None:
            answer["rest"] = rest
        return answer

    def _busiest(self, status: dict[Any, Any], top: int) -> tuple[list[int], dict[str, Any]]:
        """The ``top`` busiest live engines (ids, in id order) and the others summed:
        ``engines``, ``busy`` (running a task), ``outstanding``, ``completed``, ``restarts``,
        ``buckets`` (per second of the window, summed: ``[second, finished, failed, busy
        seconds]``), ``running`` (msg_ids of their running tasks, at most ANSWER_TASKS).
        One pass over the engines' counts; the buckets come from the running totals less
        the shown engines' own (O(top), not O(engines))."""
        act = self.activity
        work = act.work
        shown = sorted(heapq.nsmallest(top, self.engine_info, key=lambda e: (
            -(status[e]["tasks"] + status[e]["queue"]), -work.get(e, 0.0), e)))
        mine = set(shown)
        running: list[str] = []
        busy = outstanding = completed = restarts = n = 0
        health = act.health
        for e in self.engine_info:
            if e in mine:
                continue
            s = status[e]
            n += 1
            busy += s["tasks"]
            outstanding += s["tasks"] + s["queue"]
            completed += s["completed"]
            restarts += s.get("restarts", 0)
            if s["tasks"] and len(running) < ANSWER_TASKS:
                task = health.get(e, {}).get("task")
                if task:
                    running.append(task)
        summed = {b[0]: list(b) for b in act.totals}
        for e in shown:
            for sec, k, failed, secs in act.buckets.get(e, ()):
                m = summed.get(sec)
                if m is not None:
                    m[1], m[2], m[3] = max(0, m[1] - k), max(0, m[2] - failed), max(0.0, m[3] - secs)
        return shown, {"engines": n, "busy": busy, "outstanding": outstanding,
                       "completed": completed, "restarts": restarts,
                       "buckets": [b for b in summed.values() if b[1]], "running": running}

    def _known(self, msg_ids: list[str]) -> list[Record]:
        unknown = [m for m in msg_ids if m not in self.store]
        if unknown:
            raise KeyError(f"no such task(s): {', '.join(map(repr, unknown))} (never submitted "
                           "to this cluster, purged, dropped from memory once finished (the "
                           "controller's --store-limit-mb; --db sqlite keeps them), or still "
                           "unfinished when an earlier controller of this cluster stopped)")
        return [self.store[m] for m in msg_ids]

    def _req_get_result(self, client: bytes, msg_ids: list[str]) -> list[str]:
        """Send the results of ``msg_ids`` to ``client``: now if finished, else when they are.

        Returns the ids still pending."""
        pending = []
        for rec in self._known(msg_ids):
            if rec.result is None:
                rec.watchers.append(client)
                pending.append(rec.msg_id)
            else:
                self._send_result(client, rec)
        return pending

    def _req_redeliver(self, client: bytes, msg_ids: Any) -> None:
        """A client whose connection broke (and came back) asks again for the results it
        has not received: results sent meanwhile were dropped by the socket.  Finished
        tasks are sent now, pending ones will be when they finish, and a task whose record
        is gone since is answered with an error, so none is left without an answer."""
        if not isinstance(msg_ids, list):
            raise TypeError("redeliver takes a list of msg_ids")
        now = time.time()
        for msg_id in msg_ids:
            rec = self.store.get(msg_id) if isinstance(msg_id, str) else None
            if rec is None:
                if isinstance(msg_id, str):
                    lost = ("WireError", f"task {msg_id}'s result was sent while this client "
                            "was disconnected from the controller, and its record is gone "
                            "since (purged, or dropped by the controller's memory budget): "
                            "submit it again", "")
                    self._send_client(client, wire.RESULT,
                                      (msg_id, None, "error", None, now, "", "", lost, None))
            elif rec.result is not None:
                self._send_result(client, rec)
            elif client != rec.client and client not in rec.watchers:
                rec.watchers.append(client)

    def _req_resubmit(self, client: bytes, pairs: list[tuple[str, str]]) -> None:
        """Run finished tasks again under new msg_ids (chosen by the client)."""
        recs = self._known([old for old, _new in pairs])
        pending = [r.msg_id for r in recs if r.result is None]
        if pending:
            raise ValueError(f"cannot resubmit pending task(s) {', '.join(map(repr, pending))}: "
                             "only finished tasks (succeeded or failed) can run again")
        clash = [new for _old, new in pairs if new in self.store]
        if clash:
            raise ValueError(f"msg_id(s) already in use: {', '.join(clash)}")
        now = time.monotonic()
        for rec, (_old, new) in zip(recs, pairs):
            flags = rec.flags and {k: rec.flags.get(k) for k in ("retries", "targets", "walltime")}
            fn = self.functions.setdefault(rec.fn.key, rec.fn)  # one from the database, too
            self._new_task(Record(new, client, fn, rec.bufs, rec.bufs_mac, flags or None,
                                  rec.label, rec.func), now)

    def _req_db_query(self, _client: bytes, arg: Any) -> list[dict[str, Any]]:
        """``rc.db_query(query, keys)``: the records that meet an ipyparallel-style query."""
        query, keys = arg
        return self.store.query(parse_query(query), keys)

    def _req_purge(self, _client: bytes, msg_ids: list[str] | None) -> list[str]:
        """Forget finished tasks (None: all of them); pending ones cannot be purged."""
        if msg_ids is not None:
            pending = [r.msg_id for r in self._known(msg_ids) if r.result is None]
            if pending:
                raise ValueError(f"cannot purge pending task(s) {', '.join(map(repr, pending))}: "
                                 "wait for them or abort them first")
        forgotten = self.store.purge(msg_ids)
        self._forget(forgotten)
        shm.settle_removals(10.0)  # their files are gone when the client hears back
        return forgotten

    def _forget(self, msg_ids: list[str]) -> None:
        now = time.monotonic()
        for msg_id in msg_ids:
            self.core.handle(ev.TaskForgotten(msg_id, now))

    def _req_abort(self, _client: bytes, msg_ids: list[str]) -> None:
        self._known(msg_ids)
        now = time.monotonic()
        for m in msg_ids:
            self._execute(self.core.handle(ev.AbortRequested(m, now)))

    def _req_interrupt(self, _client: bytes, engine_ids: list[int]) -> list[int]:
        """Interrupt engines through the jupyter_client KernelManager that started each
        (``interrupt_kernel``: SIGINT to the kernel, the running task stops): this
        controller's, or that of the ``ipylb engine join`` that relays its interrupts."""
        done = []
        for engine_id in engine_ids or self._engine_list():
            if not self._interrupt(engine_id, None):
                raise KeyError(f"engine {engine_id} {_UNREACHABLE}")
            done.append(engine_id)
        return done

    def _req_interrupt_tasks(self, _client: bytes, msg_ids: list[str]) -> list[int]:
        """Interrupt these tasks where they run, and nothing else: each task on an engine is
        named in the interrupt (``ipylb_interrupt_request``), which that engine acts on only
        if the task is the one running there.  With tasks queued on engines (``hwm="auto"``
        or > 1) a task may wait behind another task, which an interrupt of its whole engine
        would stop in its place.  Returns the engines asked (sorted); a task not on an
        engine now (waiting in the controller, or finished) is left alone."""
        self._known(msg_ids)
        asked = set()
        for m in msg_ids:
            engine_id = self.core.engine_of(m)
            if engine_id is None:
                continue
            if not self._interrupt(engine_id, m):
                raise KeyError(f"task {m!r} runs on engine {engine_id}, which {_UNREACHABLE}")
            asked.add(engine_id)
        return sorted(asked)

    def _req_relay_interrupts(self, client: bytes, tags: Any) -> int:
        """A process that starts engines itself (``ipylb engine join``, with jupyter_client's
        KernelManager) will interrupt those registering with these tags when asked
        (walltime, ``rc.interrupt``): the only way to reach a kernel's process or its
        control channel on another host.  Returns how many tags it took."""
        if not (isinstance(tags, list) and all(type(t) is str and 0 < len(t) <= 200
                                               for t in tags)):
            raise ValueError("relay_interrupts takes a list of engine tags (str)")
        for tag in tags:
            self.relays[tag] = client
        return len(tags)

    def _req_shutdown(self, _client: bytes, _arg: Any) -> None:
        self.stop("a client asked it to (`ipylb cluster stop` or rc.stop_cluster())")

    def _req_add_engines(self, _client: bytes, arg: Any) -> int:
        """``ipylb engine add``: launch ``n`` more engines (``arg``: n, or (n, kernelspec
        name)); they register like the first ones, and the scheduler hands them waiting
        tasks as soon as they do."""
        if self.launcher is None:
            raise ValueError("this controller does not launch engines")
        n, kernel = arg if isinstance(arg, tuple | list) and len(arg) == 2 else (arg, None)
        limits.check_engine_count(n, "the number of engines to add")
        if kernel is not None and not isinstance(kernel, str):
            raise ValueError(f"a kernelspec name is a str, got {kernel!r}")
        self.launcher.start(n, kernel, wait=False)  # remote kernels: off this loop
        return n
