"""The Client: a connection to an ipylb cluster (or a private one it starts).

Two DEALER sockets to the controller: one to send (submissions and requests,
from whichever user thread, under a lock) and one to receive, owned by a
background thread that files results into their AsyncResults.  Sockets are not
thread-safe, so each has one owner.

This module has the Client's public face (engines, requests, waiting, shutdown);
:mod:`.submit` how its tasks leave (batched submissions, the sending thread), :mod:`.link`
its connection and receiving thread, :mod:`.taskdb` the controller's task records
(get_result, resubmit, purge, db_query): all three are mixins of :class:`Client`.
"""

from __future__ import annotations

import atexit
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .. import connection, limits, wire
from ..core.pipeline import DEFAULT_HWM
from ..error import ClientClosed, ControllerGone, NoCluster
from .asyncresult import AsyncResult, wait_seconds
from .link import LOCAL_URLS, Link
from .local import LocalCluster
from .outcome import Outcome
from .submit import Submitting
from .taskdb import TaskRecords, as_list, job_ids

# How long a client waits for a controller to answer its hello.
CONNECT_TIMEOUT_S = 5.0
# How long Client(engines=N) waits for its engines to register: this, plus the second
# term for each engine (kernels boot one CPU-second or so each, a few at a time).
ENGINE_START_TIMEOUT_S = 60.0
ENGINE_START_PER_ENGINE_S = 2.0
# What ipylb has instead of ipyparallel's direct interface (rc[:], rc.direct_view(), ...).
TASK_INTERFACE_ONLY = (
    "ipylb has ipyparallel's task interface only (no DirectView): run functions with "
    "view = rc.load_balanced_view(); view.apply(f, ...) / view.map(f, seq); to run a setup "
    "step on the engines, make what it defines importable there, or use @ipylb.require(...)"
)
_IPP_DIRECT = frozenset({
    "direct_view", "broadcast_view", "activate", "push", "pull", "execute", "run", "scatter",
    "gather", "become_dask", "become_distributed", "send_execute_request",
})


class Client(Submitting, Link, TaskRecords):
    """Connect to a cluster (``Client()``, ``Client(file_or_url)``, ``Client(profile=)``)
    or start a private one on this machine (``Client(engines=N)``)."""

    def __init__(
        self,
        url_or_file: str | Path | None = None,
        profile: str | None = None,
        engines: int | None = None,
        scheme: str | None = None,
        hwm: int | str | None = None,
        timeout: float = CONNECT_TIMEOUT_S,
        heartbeat_timeout: float | None = None,
        restart: bool | tuple[int, float] | None = None,
        kernel: str | None = None,
    ) -> None:
        """``scheme`` (default leastload), ``hwm`` (tasks outstanding per engine: default
        ``"auto"``, as many as hide the round trip, measured, with queued tasks stolen back
        for idle engines (README "Pipelining"); an int >= 1: at most that many; 0: no limit;
        ValueError otherwise), ``heartbeat_timeout``
        (default 10 s) and ``restart`` configure the cluster ``engines=N`` starts; a running
        cluster has its own, set by ``ipylb cluster start``.  ``restart``: True (the default:
        an engine whose kernel dies is restarted through jupyter_client's KernelRestarter, a
        slot that dies more than 5 times in a row within 10 s of each death stays down),
        False (never), or ``(limit, seconds)`` for that policy's two numbers (its
        ``restart_limit`` and ``stable_start_time``).  ``kernel``: the kernelspec engines are
        started from, with any jupyter_client provisioner (default ``ipylb-engine``)."""
        self._local: LocalCluster | None = None
        if engines is not None and (url_or_file is not None or profile is not None):
            given = "a connection file or url" if url_or_file is not None else f"profile={profile!r}"
            raise ValueError(
                f"Client(engines={engines!r}) starts a private cluster, while {given} connects "
                "to a running one: pass one or the other (to add engines to a running cluster: "
                "`ipylb engine add -n K`)")
        if url_or_file is not None and profile is not None:
            raise ValueError(
                f"both a connection file or url ({str(url_or_file)!r}) and profile={profile!r} "
                "name a cluster: pass one of them")
        if engines is not None:
            hint = limits.check_engine_count(engines)
            if hint:
                warnings.warn(hint, RuntimeWarning, stacklevel=2)
            progress = limits.StartProgress(engines)  # its clock starts with the cluster's
            self._local = LocalCluster(engines, scheme or "leastload",
                                       DEFAULT_HWM if hwm is None else hwm,
                                       10.0 if heartbeat_timeout is None else heartbeat_timeout,
                                       restart=True if restart is None else restart,
                                       kernel=kernel)
            info = self._local.info
        else:
            given = [n for n, v in (("scheme", scheme), ("hwm", hwm),
                                    ("heartbeat_timeout", heartbeat_timeout),
                                    ("restart", restart), ("kernel", kernel)) if v is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} configure(s) a cluster this client starts (engines=N); "
                    "a running cluster keeps its own: `ipylb cluster start --scheme S --hwm H`"
                )
            path = _find_connection_file(url_or_file, profile)
            info = connection.read(path)
            pid = info.get("pid")
            local = info["client_url"].startswith(LOCAL_URLS)
            if local and isinstance(pid, int) and not connection.pid_alive(pid):
                raise NoCluster(
                    f"the cluster of {path} is not running (its controller, pid {pid}, is gone): "
                    "start one with `ipylb cluster start -n 4`, or use ipylb.Client(engines=4)"
                )
        self._info = info
        self._closed = False
        # The largest frame the controller reads (bytes; 0: not said, an older controller).
        self._max_frame: int = info.get("max_frame_bytes") or 0
        # Why the controller is gone (None while it serves): pending results have failed
        # with ControllerGone, and new submissions raise it.
        self._gone: str | None = None
        self._said_shut_down = False  # it said so before it went (ControllerGone.shut_down)
        self._why_closed = ""
        self._warned_empty = False
        self.block = False  # the block flag new views start with (as in ipyparallel)
        try:
            self._connect(info, timeout)
            if engines is not None:
                self._await_engines(engines, ENGINE_START_TIMEOUT_S
                                    + ENGINE_START_PER_ENGINE_S * engines, progress)
        except BaseException:
            self.shutdown() if self._local else self.close()
            raise
        _live_clients.add(self)

    # -- engines -----------------------------------------------------------------

    @property
    def ids(self) -> list[int]:
        """Sorted ids of the engines registered now.  Raises ClientClosed once closed."""
        self._check_open()
        return sorted(self._engine_ids)

    def __len__(self) -> int:
        """How many engines are registered now (as ipyparallel's ``len(rc)``)."""
        return len(self._engine_ids)

    def wait_for_engines(self, n: int, timeout: float | None = None,
                         block: bool = True, interactive: bool = False) -> Future | None:
        """Wait until at least ``n`` engines are registered (``timeout`` seconds; None or
        -1: no limit).  Raises TimeoutError if they are not in time, RuntimeError if an
        engine this cluster started failed to start.  With ``block=False`` returns at
        once a ``concurrent.futures.Future`` that ends the same way (as ipyparallel).
        ``interactive`` (ipyparallel's name; default False here): show ``ipylb: 12/64
        engines up`` on stderr once the wait lasts more than a moment
        (:class:`ipylb.limits.StartProgress`)."""
        timeout = wait_seconds(timeout)
        if not block:
            fut: Future = Future()

            def wait() -> None:
                try:
                    self.wait_for_engines(n, timeout, interactive=interactive)
                except BaseException as e:
                    fut.set_exception(e)
                else:
                    fut.set_result(None)

            threading.Thread(target=wait, daemon=True, name="ipylb-wait-for-engines").start()
            return fut
        self._await_engines(n, timeout, limits.StartProgress(n) if interactive else None)
        return None

    def _await_engines(self, n: int, timeout: float | None,
                       shown: limits.StartProgress | None = None) -> None:
        """Wait for ``n`` engines; with ``shown``, show ``12/64 engines up`` on stderr
        once the start takes more than a moment (:class:`ipylb.limits.StartProgress`)."""
        seen = len(self._engine_failures)  # only failures from now on count

        def enough() -> bool:
            return (len(self._engine_ids) >= n or len(self._engine_failures) > seen
                    or self._gone is not None)

        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            while True:
                if shown is not None:
                    shown.update(len(self._engine_ids))
                left = None if deadline is None else deadline - time.monotonic()
                step = left if shown is None else min(left or 0.5, 0.5)
                ok = self._state.wait_for(enough, step)
                if ok or (left is not None and left <= step):
                    break
        if shown is not None:
            shown.done(len(self._engine_ids))
        self._check_open()
        if len(self._engine_failures) > seen:
            raise RuntimeError("; ".join(self._engine_failures[seen:]))
        if not ok:
            raise TimeoutError(f"{len(self._engine_ids)} of {n} engines registered within {timeout} s")

    def _request(self, op: str, arg: Any = None, timeout: float | None = 30.0) -> Any:
        """Ask the controller something and wait for its answer."""
        self._check_open()
        fut: Future = Future()
        req_id = next(self._ids)
        self._replies[req_id] = fut
        with self._send_lock:
            self._check_open()
            if self._held is not None:  # the submissions it may be about go first
                self._send_held()
            wire.send(self._send_sock, self._signer.pack(wire.REQUEST, (req_id, op, arg)))
        try:
            ok, value = fut.result(timeout)
        except TimeoutError:
            self._replies.pop(req_id, None)
            raise TimeoutError(f"the controller did not answer {op!r} within {timeout} s") from None
        if not ok:
            ename, evalue = value
            error = _REQUEST_ERRORS.get(ename, RuntimeError)(evalue)
            if isinstance(error, ControllerGone):  # it went while this request waited
                error.shut_down = self._said_shut_down
            raise error
        return value

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed(f"this ipylb Client is closed ({self._why_closed}); "
                               "create a new one")
        if self._gone is not None:
            gone = ControllerGone(f"{self._gone}; connect a new Client once a cluster runs "
                                  "(`ipylb cluster start`, or Client(engines=N))")
            gone.shut_down = self._said_shut_down
            raise gone

    def load_balanced_view(self, targets: int | list[int] | None = None) -> Any:
        """A new LoadBalancedView on this client's cluster (its ``block`` starts as the
        client's); ``targets``: the engines its tasks may run on (None: all).  Raises
        ClientClosed once closed."""
        from .view import LoadBalancedView

        self._check_open()
        view = LoadBalancedView(self, targets)
        view.block = self.block
        return view

    # -- waiting and results -----------------------------------------------------

    def wait(self, jobs: Any = None, timeout: float | None = None) -> bool:
        """Wait for ``jobs`` (default: every task this client still waits for): AsyncResults,
        msg_ids, or Futures (``concurrent.futures.Future`` and the like; one whose result is
        an AsyncResult is waited for until that is done too, as ipyparallel does).
        ``timeout`` in seconds (None or -1: no limit).  True if all are done in time.
        An unknown msg_id raises KeyError."""
        timeout = wait_seconds(timeout)
        self._flush()
        if jobs is None:
            with self._state:
                return self._state.wait_for(lambda: not self._pending, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        jobs = as_list(jobs)
        while jobs:
            job = jobs.pop(0)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if isinstance(job, AsyncResult):
                if not job.wait(left):
                    return False
            elif hasattr(job, "add_done_callback") and hasattr(job, "result"):
                done = threading.Event()
                job.add_done_callback(lambda _f, done=done: done.set())
                if not done.wait(left):
                    return False
                if not job.cancelled() and job.exception() is None:
                    inner = job.result()
                    if isinstance(inner, AsyncResult) or (
                            hasattr(inner, "add_done_callback") and hasattr(inner, "result")):
                        jobs.append(inner)
            else:
                msg_id = job_ids(job, self.history)[0] if type(job) is int else str(job)
                if msg_id not in self._outcomes:
                    waiting = self._pending.get(msg_id) or next(iter(self._watchers.get(msg_id, ())), None)
                    if waiting is None:  # neither submitted here nor fetched with get_result
                        if msg_id in self._outcomes:  # (or its result has just come)
                            continue
                        raise KeyError(f"no such task: {msg_id!r} (never submitted here, nor "
                                       "fetched with get_result; or purged)")
                    if not waiting[0].wait(left):
                        return False
        return True

    def controller_stats(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """(ipylb) What the controller process has handled: ``messages``, the messages it
        received by kind (``{"submit": n, "done": n, "dones": n, "request": n, ...}``: a
        batch of tasks or results is one message, see README "Fewer messages per task"),
        ``messages_received`` (their sum), and ``gc``, its garbage collector's state:
        ``policy`` ("freeze survivors of full collections" for a controller started by
        ipylb, see :mod:`ipylb.controller.gcpolicy`), ``frozen`` (objects full collections
        skip), ``full_collections``, ``thaws``, ``thaw_every_s``, ``thresholds``; and
        ``pipeline`` (hwm="auto", README "Pipelining"; None at a fixed hwm): ``depth`` (tasks
        each engine may hold now), ``rtt`` and ``task_time`` (the measured moving averages,
        seconds; None until measured), ``steals`` (requests for queued tasks sent to
        engines: for idle engines, aborts and held engines), ``stolen`` (of those, answered
        "cancelled": the task had not started and went elsewhere), ``holds`` (times an
        engine was held behind a long task).
        TimeoutError if the controller does not answer within ``timeout`` seconds."""
        return self._request("stats", None, timeout)

    def queue_status(self, targets: int | list[int] | None = None, verbose: bool = False,
                     timeout: float | None = 30.0) -> dict[Any, Any]:
        """``{engine_id: {"queue": n, "completed": n, "tasks": n, "restarts": n}, ...,
        "unassigned": n}``: per engine, tasks queued behind the running one, finished,
        running, and (ipylb) how many times the controller restarted the kernel of its slot
        before it (a restarted kernel is a new engine id); and tasks not yet on any engine.
        ``targets`` (an engine id or a list; None: all) limits it to those engines, and an
        int gives just that engine's dict (as in ipyparallel).
        ``verbose``: lists of msg_ids instead of counts (``completed``: those still on
        record).  IndexError for an engine id that is not registered."""
        wanted = None
        if targets is not None:
            wanted = _engine_list(targets, self.ids)
        status = self._request("queue_status", bool(verbose), timeout)
        if wanted is None:
            return status
        if isinstance(targets, int):
            return status[targets]
        return {k: v for k, v in status.items() if k in wanted or not isinstance(k, int)}

    @property
    def closed(self) -> bool:
        """Whether this client has been closed (or shut down)."""
        return self._closed

    @property
    def cluster_info(self) -> dict[str, Any]:
        """The cluster's connection details, without its key: urls, controller pid, scheme, hwm."""
        return {k: v for k, v in self._info.items() if k != "key"}

    def add_engines(self, n: int, kernel: str | None = None) -> None:
        """Ask the controller to start ``n`` more engines (they register shortly;
        ``wait_for_engines`` waits for them), from kernelspec ``kernel`` (default: the
        cluster's), whose provisioner decides where they run.  ``n`` follows the
        engine-count rule of :mod:`ipylb.limits` (ValueError above ``MAX_ENGINES``, a
        warning above a few per CPU)."""
        hint = limits.check_engine_count(n, "n")
        if hint:
            warnings.warn(hint, RuntimeWarning, stacklevel=2)
        self._request("add_engines", n if kernel is None else (n, kernel))

    def stop_cluster(self, timeout: float | None = 30.0) -> None:
        """Stop the cluster this client is connected to (controller and its engines)."""
        self._request("shutdown", None, timeout)

    def story(self, msg_id: str) -> list[tuple]:
        """The scheduler's log for one task: (task, from state, to state, detail, time) rows,
        e.g. why it waited, where it went, why it failed."""
        return self._request("story", msg_id)

    def submissions(self) -> list[AsyncResult]:
        """This client's submissions (an AsyncResult per apply or map, imap left out) that
        are still referenced somewhere, oldest first: what progress monitors show.  Each
        has ``label``, ``msg_ids``, ``progress()`` (finished tasks) and ``ready()``."""
        with self._send_lock:  # (adds happen under it: no change while this copies)
            subs = list(self._submissions)
        return sorted(subs, key=lambda ar: ar._submitted)

    @property
    def outstanding(self) -> frozenset[str]:
        """The msg_ids of this client's tasks whose results have not arrived yet (as
        ipyparallel's ``rc.outstanding``; a snapshot, not a live set).  Tasks of other
        clients fetched with ``get_result`` are not in it."""
        return frozenset(self._pending)

    def validate(self, timeout: float | None = 30.0) -> dict[str, int]:
        """Ask the controller to check its scheduler's invariants and that its own tables
        agree with them (a self-test for soaks and tests, sound while tasks run).  Returns
        the sizes of what grows with use (``listeners``, ``senders``, ``records``,
        ``engines``); raises RuntimeError naming the first broken invariant, TimeoutError
        if there is no answer within ``timeout`` seconds."""
        return self._request("validate", None, timeout)

    def submission_of(self, msg_id: str) -> Any:
        """The AsyncResult a pending task of this client was submitted in (None if the task
        is not pending here: finished, another client's, or part of an imap)."""
        entry = self._pending.get(msg_id)
        return None if entry is None or not isinstance(entry[0], AsyncResult) else entry[0]

    def activity(self, seq: int = 0, second: int = 0, timeout: float | None = 30.0,
                 top: int | None = None) -> dict[str, Any]:
        """What the cluster has been doing, for monitors (the dashboard, ``ipylb top``), in
        one round trip.  ``seq``/``second``: the ``seq`` of the previous answer and the
        first second (epoch) of buckets wanted, so repeated calls get only what is new.

        Returns a dict: ``now`` (the controller's clock, seconds since the epoch), ``seq``,
        ``tasks`` (finished since ``seq``, oldest first, at most 2,000: ``(engine_id,
        started, completed, ok, label or function name)``, times in seconds since the
        epoch), ``skipped`` (True if more finished than were sent), ``buckets`` (per
        engine, ``[second, finished, failed, busy seconds]`` for each second of the last
        minute with a finished task), ``status`` (as :meth:`queue_status`), ``engines``
        (per live engine: ``host``, ``pid``, ``restarts``, ``cpu`` (%), ``rss`` (bytes),
        ``task``: ``(msg_id, label or function, started)`` or None; health is what the
        engine reported within the last second or two, None before its first report).

        ``top``: with more live engines than this, ``status``, ``engines`` and ``buckets``
        cover only the ``top`` busiest (most outstanding tasks, then most busy seconds in
        the last minute; their buckets are then the whole minute, whatever ``second``) and
        ``rest`` sums the others: ``engines`` (how many), ``busy``, ``outstanding``,
        ``completed``, ``restarts``, ``buckets`` (summed per second, the whole minute) and
        ``running`` (their running tasks' msg_ids, at most 2,000).  So a monitor of 1,000
        engines gets an answer of bounded size.  ValueError if ``top`` is not an int >= 1.
        Raises TimeoutError if the controller does not answer within ``timeout`` s."""
        if top is None:
            return self._request("activity", (seq, second), timeout)
        if type(top) is not int or top < 1:
            raise ValueError(f"top must be an int >= 1 (engines described one by one), got {top!r}")
        return self._request("activity", (seq, second, top), timeout)

    def engine_info(self) -> dict[int, dict[str, Any]]:
        """Per engine: pid, hostname and the kernel connection file
        (``jupyter console --existing FILE`` attaches to it)."""
        return self._request("engine_info")

    def interrupt(self, engine_ids: list[int] | None = None, *, jobs: Any = None) -> list[int]:
        """Interrupt engines (default: all) like Jupyter's Kernel > Interrupt: a running
        task raises KeyboardInterrupt and fails; the engine serves on.  Engines of
        ``ipylb engine join`` are interrupted by that process, on their own host.  Returns
        the ids interrupted; KeyError for an engine no one can interrupt.

        **(ipylb)** ``jobs`` (AsyncResults or msg_ids, instead of ``engine_ids``): interrupt
        those tasks where they run, and nothing else.  An engine may hold tasks queued
        behind its running one (``hwm="auto"`` or > 1): interrupting the engine of a queued
        task would stop the task in front of it, maybe another user's; with ``jobs`` the
        engine is told which task, and acts only if that task is the one running.  Returns
        the engines asked; tasks not on an engine now are left alone.  KeyError for an
        unknown task."""
        if jobs is not None:
            if engine_ids is not None:
                raise ValueError("interrupt takes engine_ids or jobs, not both")
            return self._request("interrupt_tasks", job_ids(jobs, self.history))
        return self._request("interrupt", engine_ids)

    def relay_interrupts(self, tags: list[str],
                         handler: Callable[[int, str, str | None], Any]) -> int:
        """Interrupt, when the controller asks, the engines that register with these tags
        (``IPYLB_ENGINE_TAG``): for a process that starts engine kernels itself with
        jupyter_client, on a host where the controller cannot signal them or reach their
        connection files (``ipylb engine join``).  From then on ``handler(engine_id, tag,
        task_id)`` is called (on the client's callback thread, in order) for each interrupt
        of such an engine: ``task_id`` None for :meth:`interrupt` (whatever runs stops),
        else only that task, if it still runs (its walltime passed);
        :meth:`ipylb.controller.launcher.EngineLauncher.interrupt` does both.  A second call
        replaces the handler.  Returns how many tags the controller took; ValueError if
        they are not a list of str."""
        self._interrupter = handler
        return self._request("relay_interrupts", list(tags))

    def abort(self, jobs: Any) -> None:
        """Tasks in ``jobs`` that have not started never run; they fail with TaskAborted."""
        self._request("abort", job_ids(jobs, self.history))

    def dashboard(self) -> Any:
        """A live ipywidgets panel of this cluster (queue depth, engines, throughput,
        failures), updated from a background thread; display it in a notebook."""
        from ..dashboard import Dashboard

        return Dashboard(self)

    # -- shutdown ----------------------------------------------------------------

    def close(self) -> None:
        """Disconnect; a cluster this client started keeps running only until shutdown().

        Results not yet received fail with ClientClosed (their tasks run on: another
        client can fetch them with ``get_result``)."""
        self._close("task {} had not finished when this client closed; it runs on in the "
                    "cluster: connect a new Client and use get_result({!r})", "closed by close()")

    def _close(self, why: str, how: str) -> None:
        """Close; results still expected fail with ``why`` (formatted with the msg_id twice);
        ``how`` says in later errors how the client came to be closed."""
        if self._closed:
            return
        self._closed = True
        self._why_closed = how
        receiver = getattr(self, "_receiver", None)
        if receiver is not None and receiver is not threading.current_thread():
            receiver.join(2)
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            with self._send_lock:
                if self._held is not None and self._gone is None:  # sent: they run on
                    self._send_held()
                self._held = None
                self._held_cond.notify()  # the sending thread ends
                self._send_sock.close(0)
            ctx.destroy(linger=0)  # closes what a stuck receiver still holds, never hangs
        if getattr(self, "_placer", None) is not None:
            self._placer.close()  # its spare segments (unnamed files) go now
        if hasattr(self, "_pending"):
            self._abandon(why)
        _live_clients.discard(self)

    def _abandon(self, why: str, ename: str = "ClientClosed", reply: str | None = None) -> None:
        """Fail every result and reply still expected, so nothing waits for it forever.

        ``why`` is formatted with each msg_id (twice); ``ename`` names the results' error;
        ``reply`` is what requests waiting for an answer raise (``ename``), else RuntimeError."""
        replies, self._replies = self._replies, {}
        answer = ((ename, reply) if reply is not None else
                  ("RuntimeError", "this ipylb Client closed before the controller answered"))
        for fut in replies.values():
            fut.set_result((False, answer))
        pending, self._pending = self._pending, {}
        watchers, self._watchers = self._watchers, {}
        for msg_id, waiting in [*pending.items(),
                                *((m, w) for m, ws in watchers.items() for w in ws)]:
            waiting[0]._deliver(waiting[1], Outcome.lost(msg_id, why.format(msg_id, msg_id), ename))
        with self._state:
            self._state.notify_all()

    def shutdown(self, *args: Any, reason: str | None = None, **kwargs: Any) -> None:
        """Stop the private cluster this client started (every process of it), then close.

        Results not yet received fail with ClientClosed, whose message says ``reason``:
        what stopped the cluster, as a clause (default ``"its cluster was shut down by
        rc.shutdown()"``; the magics say ``"%lb_stop stopped the magics' cluster"``).  A
        client of a running cluster (``Client()``, ``Client(profile=...)``) only
        disconnects: ``stop_cluster()`` stops that one.  ipyparallel's arguments
        (``hub=``, ``targets=``, ``restart=``) raise TypeError: ipylb has no direct
        interface to engines.
        """
        if args or kwargs:
            given = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            raise TypeError(
                f"rc.shutdown({given}): ipylb's shutdown() takes only reason=. It stops the "
                "private cluster of Client(engines=N); rc.stop_cluster() (or `ipylb cluster "
                "stop`) stops a running cluster, controller and engines; rc.close() only "
                "disconnects. ipylb has no direct interface to engines (ipyparallel's "
                "targets/restart/hub).")
        local, self._local = self._local, None
        if local is None:
            global _said_shutdown_disconnects
            if not self._closed and not _said_shutdown_disconnects:
                _said_shutdown_disconnects = True
                warnings.warn("rc.shutdown() only disconnects this client: its cluster was not "
                              "started by it and keeps running. rc.stop_cluster() (or `ipylb "
                              "cluster stop`) stops it.", UserWarning, stacklevel=2)
            self.close()
            return
        reason = reason or "its cluster was shut down by rc.shutdown()"
        escaped = reason.replace("{", "{{").replace("}", "}}")  # _close formats ``why``
        self._close(f"task {{}} had not finished when {escaped}", reason)
        local.stop()

    # -- ipyparallel's direct interface: not here, say what to use -----------------

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):  # as it was written: rc[:], rc[1:3]
            key = ":".join("" if k is None else repr(k)
                           for k in (key.start, key.stop, *([key.step] if key.step else [])))
        else:
            key = repr(key)
        raise TypeError(f"rc[{key}]: {TASK_INTERFACE_ONLY}")

    def __getattr__(self, name: str) -> Any:
        if name in _IPP_DIRECT:
            raise AttributeError(f"ipylb.Client has no {name!r}: {TASK_INTERFACE_ONLY}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown() if self._local is not None else self.close()

    def __del__(self) -> None:
        if getattr(self, "_local", None) is not None:
            self.shutdown()


_REQUEST_ERRORS = {"KeyError": KeyError, "ValueError": ValueError, "TypeError": TypeError,
                   "ControllerGone": ControllerGone}
# rc.shutdown() of a client that did not start its cluster says so once per process.
_said_shutdown_disconnects = False
_live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for c in list(_live_clients):
        c.shutdown() if c._local is not None else c.close()


def _engine_list(targets: Any, registered: list[int]) -> list[int]:
    """Engine ids from ``targets`` (an int or an iterable of ints); IndexError names any
    that is not registered (as ipyparallel), TypeError anything that is not an id."""
    ids = [targets] if isinstance(targets, int) else list(targets)
    bad = [t for t in ids if type(t) is not int]
    if bad:
        raise TypeError(f"engine ids are ints, got {bad[0]!r}")
    missing = [t for t in ids if t not in registered]
    if missing:
        raise IndexError(f"no such engine(s): {', '.join(map(str, missing))}; the engines "
                         f"registered now are {registered} (rc.ids)")
    return ids


def _find_connection_file(url_or_file: str | Path | None, profile: str | None) -> Path:
    if url_or_file is None:
        return connection.profile_file(profile or "default")
    text = str(url_or_file)
    if text.startswith("tcp://"):
        for path in sorted(connection.runtime_dir().glob("ipylb-*.json")):
            try:
                if connection.read(path)["client_url"] == text:
                    return path
            except NoCluster:
                continue
        raise NoCluster(
            f"no connection file in {connection.runtime_dir()} is for {text}: the key is needed "
            "too; pass the cluster's connection file (ipylb-<profile>.json) instead of its url"
        )
    return Path(text)

