"""Starting, watching, restarting and stopping engine kernels through jupyter_client.

Restarts use jupyter_client's own machinery: each engine's :class:`EngineKernelManager`
gets a :class:`~jupyter_client.restarter.KernelRestarter` (its policy: restart a kernel whose
process died, and give up after ``restart_limit`` restarts in a row that each died within
``stable_start_time`` seconds of the previous death), polled from the controller's
housekeeping instead of a tornado timer.  A restarted kernel registers as a new engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import uuid
from typing import Any

import zmq
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.restarter import KernelRestarter
from jupyter_core.utils import ensure_event_loop
from traitlets import Bool, Unicode

from ..connection import KERNEL_NAME, runtime_dir
from ..error import UNREPORTABLE_EXIT

log = logging.getLogger("ipylb.controller")



# Why an engine may have been killed by a signal, for its tasks' EngineError.
_SIGNAL_HINTS = {
    signal.SIGKILL: ": out of memory?",
    signal.SIGABRT: (": C code aborted, e.g. zmq's, when a task closed the engine's own file "
                     "descriptors (its sockets or pipes: os.close, closerange, dup2 over them)"),
    signal.SIGXCPU: (": over its CPU-time limit (RLIMIT_CPU, which a task lowered for itself "
                     "with resource.setrlimit)"),
    signal.SIGXFSZ: ": a file outgrew its size limit (RLIMIT_FSIZE, which a task lowered)",
}


def exit_reason(returncode: int | None) -> str:
    """A sentence for how an engine process ended."""
    if returncode is None:
        return "its process ended (exit status unknown)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = _SIGNAL_HINTS.get(-returncode, "")
        return f"killed by {name}{hint}"
    if returncode == UNREPORTABLE_EXIT:
        return (f"its process exited with code {returncode}: it could not report a task's "
                "outcome (or receive the next task), as a task had broken what the engine uses "
                "to (the controller's log says how)")
    return f"its process exited with code {returncode}"


class PolledRestarter(KernelRestarter):
    """jupyter_client's KernelRestarter whose ``poll`` the controller calls from its
    housekeeping (the way IOLoopKernelRestarter calls it from a tornado PeriodicCallback)."""

    active = Bool(False)

    def start(self) -> None:
        """Start watching (KernelManager calls this after each start of the kernel)."""
        self.active = True

    def stop(self) -> None:
        """Stop watching (on shutdown, and after giving up)."""
        self.active = False


class EngineKernelManager(KernelManager):
    """The KernelManager of one engine slot: ``tag`` names the slot (the engine registers
    with it, restarts included); ``autorestart`` (jupyter_client's switch) gives it a
    :class:`PolledRestarter`; ``restarts`` counts its kernel's restarts."""

    tag = Unicode()
    restarts = 0

    def start_restarter(self) -> None:
        """As jupyter_client's IOLoopKernelManager does: a restarter while autorestart is on."""
        if self.autorestart and self.has_kernel:
            if self._restarter is None:
                self._restarter = PolledRestarter(kernel_manager=self, parent=self, log=self.log)
            self._restarter.start()

    def stop_restarter(self) -> None:
        """Pause the restarter (jupyter_client calls this when it shuts the kernel down)."""
        if self._restarter is not None:
            self._restarter.stop()

    @property
    def restarter(self) -> PolledRestarter | None:
        """The restarter, when one is watching the kernel now."""
        r = self._restarter
        return r if r is not None and r.active else None


def _local(km: KernelManager) -> bool:
    """Whether ``km``'s kernel is a child process here.  Others (a remote provisioner's,
    whose poll is a network round trip that can fail while the kernel lives) are watched
    by heartbeat, like any engine on another host."""
    return getattr(km.provisioner, "process", None) is not None


def _remote_spec(kernel_name: str) -> bool:
    """Whether kernelspec ``kernel_name`` names a provisioner other than jupyter_client's
    local one (its kernels are not child processes here, and start over a network).
    jupyter_client's NoSuchKernel if there is no such kernelspec."""
    if kernel_name == KERNEL_NAME:
        return False
    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    provisioner = (spec.metadata or {}).get("kernel_provisioner") or {}
    return provisioner.get("provisioner_name", "local-provisioner") != "local-provisioner"


def _check_curve_kernelspec() -> None:
    """RuntimeError, saying what to do, if the installed ``ipylb-engine`` kernelspec does not
    declare CurveZMQ support (one installed by an ipylb older than that support):
    jupyter_client refuses ``transport_encryption="required"`` for it, in its own words."""
    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    if "curve" not in (spec.metadata or {}).get("supported_encryption", []):
        raise RuntimeError(
            f"--curve: the {KERNEL_NAME!r} kernelspec in {spec.resource_dir} does not declare "
            "CurveZMQ support (metadata.supported_encryption), so jupyter_client will not "
            "encrypt its kernels' channels: it predates this ipylb; reinstall ipylb "
            "(`pip install -e .` in a checkout) to update it")


class EngineLauncher:
    """Starts engine kernels from the ``ipylb-engine`` kernelspec, notices when they die,
    and (``restart``) restarts them through jupyter_client's KernelRestarter.

    ``restart_limit`` and ``stable_start_time`` are KernelRestarter's (defaults 5 and
    10 s): a slot whose kernel dies more than ``restart_limit`` times in a row, each time
    within ``stable_start_time`` of the last death, stays down.
    """

    def __init__(self, cluster_file: str, cwd: str | None = None, kernel_name: str = KERNEL_NAME,
                 ip: str | None = None, restart: bool = True, restart_limit: int = 5,
                 stable_start_time: float = 10.0, joined: bool = False,
                 curve: bool = False) -> None:
        """``ip``: where the engines' Jupyter channels listen (tcp), for engines whose
        controller is on another host; None: unix sockets in the runtime dir.  ``joined``:
        the engines of a controller elsewhere (``ipylb engine join``), for which exit code 0
        is the normal end (their controller stopped them, or their connection to it
        dropped), where the controller's own launcher never lets one end so.  ``curve``
        (``ipylb cluster start --curve``): the engines' own Jupyter channels (shell, iopub,
        stdin, control, heartbeat) run CurveZMQ too, under keys jupyter_client provisions
        per kernel into its 0600 connection file (``KernelManager.transport_encryption``:
        "required" for the ``ipylb-engine`` kernelspec, "auto" for others, which get keys
        only if their kernelspec declares ``supported_encryption`` and their provisioner
        provisions them, as jupyter_client's LocalProvisioner does)."""
        self.cluster_file = cluster_file
        self.ip = ip
        self.cwd = cwd or os.getcwd()
        self.kernel_name = kernel_name
        self.autorestart = restart
        self.joined = joined
        self.curve = curve
        self.restart_limit = restart_limit
        self.stable_start_time = stable_start_time
        self.pending: dict[str, EngineKernelManager] = {}  # tag -> manager, not registered yet
        self.running: dict[int, EngineKernelManager] = {}  # engine id -> manager
        self.restarts = 0  # kernels restarted, all slots together
        # Jupyter clients of running engines' kernels, made on their first task interrupt.
        self._controls: dict[int, Any] = {}
        # What the restarters' callbacks saw during one poll: (engine id, reason, fate).
        self._seen: list[tuple[int | None, str, str]] = []
        # Starts and restarts of remote kernels in progress: tag -> (manager, the start or
        # restart as a task on this thread's event loop, which poll_dead advances a step at
        # a time, "starting" or "restarting").
        self._restarting: dict[str, tuple[EngineKernelManager, asyncio.Task, str]] = {}

    def start(self, n: int, kernel_name: str | None = None, wait: bool = True) -> None:
        """Start ``n`` engines (from kernelspec ``kernel_name``, default this launcher's);
        they boot in parallel and register themselves.  ``wait=False`` (``ipylb engine
        add`` on a serving controller): kernels of a provisioner other than jupyter_client's
        local one (SSH, a batch system) are started as tasks on this thread's event loop,
        advanced by :meth:`poll_dead`, as their restarts are: each start is a remote login
        and a wait for the kernel's connection info, seconds the loop must not wait."""
        kernel_name = kernel_name or self.kernel_name
        encryption = "disabled"
        if self.curve:
            encryption = "required" if kernel_name == KERNEL_NAME else "auto"
            if kernel_name == KERNEL_NAME:
                _check_curve_kernelspec()
        remote = not wait and _remote_spec(kernel_name)
        for _ in range(n):
            # The tag is also the kernel id: what remote provisioners pass on to the engine
            # (a full uuid, as they expect); short for ours (it names unix socket paths).
            tag = uuid.uuid4().hex[:12] if kernel_name == KERNEL_NAME else str(uuid.uuid4())
            # Local engines talk to Jupyter frontends over unix sockets in the private runtime
            # dir, next to their connection files (`jupyter console --existing` finds them).
            base = runtime_dir() / f"kernel-ipylb-{tag}"
            if kernel_name != KERNEL_NAME:
                # Another kernelspec: its provisioner (local, SSH, Kubernetes, a batch system)
                # decides where the kernel runs and how its channels are reached.
                km = EngineKernelManager(kernel_name=kernel_name, tag=tag,
                                         autorestart=self.autorestart,
                                         transport_encryption=encryption)
            elif self.ip is None:
                km = EngineKernelManager(kernel_name=kernel_name, transport="ipc",
                                         ip=str(base), connection_file=f"{base}.json", tag=tag,
                                         autorestart=self.autorestart,
                                         transport_encryption=encryption)
            else:  # the controller (another host) pings their heartbeat over tcp
                km = EngineKernelManager(kernel_name=kernel_name, transport="tcp",
                                         ip=self.ip, connection_file=f"{base}.json", tag=tag,
                                         autorestart=self.autorestart,
                                         transport_encryption=encryption)
            env = {**os.environ, "IPYLB_CLUSTER_FILE": self.cluster_file, "IPYLB_ENGINE_TAG": tag}
            # The engine's own stdout goes where our log goes: our stdout is a pipe that
            # the process which started us closes once we are ready.
            if remote:
                task = ensure_event_loop().create_task(km._async_start_kernel(
                    kernel_id=tag, env=env, cwd=self.cwd, stdout=sys.stderr.fileno()))
                self._restarting[tag] = (km, task, "starting")
                self.pending[tag] = km
                continue
            km.start_kernel(kernel_id=tag, env=env, cwd=self.cwd, stdout=sys.stderr.fileno())
            self._watch(km)
            self.pending[tag] = km

    def _watch(self, km: EngineKernelManager) -> None:
        """Give a started kernel's restarter this launcher's policy and callbacks."""
        r = km._restarter
        if r is not None:
            r.restart_limit, r.stable_start_time = self.restart_limit, self.stable_start_time
            r.add_callback(lambda km=km: self._died(km, "restarting it"), "restart")
            r.add_callback(lambda km=km: self._died(km, "down"), "dead")

    def registered(self, tag: str, engine_id: int) -> int | None:
        """An engine we started has registered as ``engine_id``; returns how many times its
        slot's kernel was restarted before (None: not one of ours)."""
        km = self.pending.pop(tag, None)
        if km is None:
            return None
        self.running[engine_id] = km
        return km.restarts

    def no_restart(self, tag: str) -> None:
        """Do not restart the kernel of slot ``tag`` when it ends (it was refused)."""
        km = self.pending.get(tag)
        if km is not None:
            km.stop_restarter()

    def manager(self, engine_id: int) -> EngineKernelManager | None:
        """The KernelManager of an engine this launcher started."""
        return self.running.get(engine_id)

    def interrupt(self, engine_id: int, task_id: str | None = None) -> bool:
        """Interrupt an engine this launcher started (False if it did not, or no longer
        runs it).  ``task_id`` None: like Jupyter's Kernel > Interrupt, through
        ``KernelManager.interrupt_kernel`` (SIGINT, or an ``interrupt_request`` for a
        kernelspec whose ``interrupt_mode`` is ``message``): whatever runs stops.  Else only
        that task, if it still runs (a walltime): an ``ipylb_interrupt_request`` on the
        kernel's control channel, which the engine's control thread serves while a task
        runs and acts on only if that task is the one running (ipylb.engine.kernel)."""
        km = self.running.get(engine_id)
        if km is None:
            return False
        if task_id is None:
            km.interrupt_kernel()
            return True
        kc = self._controls.get(engine_id)
        if kc is None:
            kc = self._controls[engine_id] = km.client(context=zmq.Context.instance())
        kc.control_channel.send(kc.session.msg("ipylb_interrupt_request", {"msg_id": task_id}))
        return True

    def _let_go(self, engine_id: int) -> EngineKernelManager:
        """Take ``engine_id`` out of the running engines (closing its control client)."""
        kc = self._controls.pop(engine_id, None)
        if kc is not None:
            kc.stop_channels()
        return self.running.pop(engine_id)

    def restart(self, engine_id: int) -> str | None:
        """Restart the kernel of ``engine_id`` now (KernelManager.restart_kernel; for a task
        past its walltime): the slot waits for the new kernel to register.  Returns why the
        restart failed (the slot is then down), or None."""
        km = self._let_go(engine_id)
        if not _local(km):
            # A remote provisioner's restart is signals through its listener, a remote login
            # and a wait for the new kernel's connection info: seconds the controller's loop
            # must not wait (its clients give a controller silent for 10 s up).  So it runs
            # as a task on the event loop jupyter_client uses in this thread (where such a
            # provisioner also receives the connection info), advanced by poll_dead.
            task = ensure_event_loop().create_task(km._async_restart_kernel(now=True))
            self._restarting[km.tag] = (km, task, "restarting")
            self.pending[km.tag] = km
            km.restarts += 1
            self.restarts += 1
            return None
        try:
            km.restart_kernel(now=True)
        except Exception as e:
            km.cleanup_resources()
            return f"restarting its kernel failed: {type(e).__name__}: {e}"
        self.pending[km.tag] = km
        km.restarts += 1
        self.restarts += 1
        return None

    def poll_dead(self) -> list[tuple[int | None, str, str]]:
        """Engines whose process has ended since the last call: (engine id or None if it had
        not registered yet, reason, fate).  fate: "restarting it" (the restarter is starting
        a new kernel in the slot), "down" (the restarter gave up: restart_limit reached), or
        "" (restarts are off)."""
        if self._restarting:  # a step of each remote restart (no waiting: I/O polled)
            ensure_event_loop().run_until_complete(asyncio.sleep(0))
            for tag, (km, task, what) in list(self._restarting.items()):
                if task.done():
                    del self._restarting[tag]
                    e = None if task.cancelled() else task.exception()
                    if e is not None:
                        self._restart_failed(km, e, what)
                    elif what == "starting":
                        self._watch(km)
        seen = self._seen
        for km in [*self.pending.values(), *self.running.values()]:
            if not _local(km):  # watched by heartbeat
                continue
            r = km.restarter
            if r is not None:
                try:
                    r.poll()  # a death fires _died through the restarter's callbacks
                except Exception as e:  # its restart_kernel failed: the slot is down
                    self._restart_failed(km, e)
            elif not km.is_alive():
                self._died(km, "")
        self._seen = []
        return seen

    def _restart_failed(self, km: EngineKernelManager, e: BaseException,
                        what: str = "restarting") -> None:
        log.error("%s an engine kernel failed: %s: %s", what, type(e).__name__, e)
        km.stop_restarter()
        self.pending.pop(km.tag, None)
        km.cleanup_resources()
        self._seen.append((None, f"{what} an engine's kernel failed: {type(e).__name__}: {e}",
                           "down"))

    def _died(self, km: EngineKernelManager, fate: str) -> None:
        """A slot's kernel died (called before the restarter restarts it, or gives up)."""
        engine_id = next((i for i, m in self.running.items() if m is km), None)
        if engine_id is not None:
            self._let_go(engine_id)
        else:
            self.pending.pop(km.tag, None)
        reason = self._reason(km)
        if engine_id is None:
            reason = f"an engine failed to start: {reason}"
        if fate == "restarting it":
            km.restarts += 1
            self.restarts += 1
            self.pending[km.tag] = km
        else:
            km.cleanup_resources()
            if fate == "down":
                n = self.restart_limit + 1
                reason += (f"; its kernel died {n} time{'s' if n > 1 else ''} in a row, each within "
                           f"{self.stable_start_time:g}s of the last death, so it is not restarted "
                           "again")
        self._seen.append((engine_id, reason, fate))

    def _reason(self, km: KernelManager) -> str:
        proc: Any = getattr(km.provisioner, "process", None)
        code = proc.returncode if proc is not None else None
        if code == 0 and not self.joined:  # the engine did not decide to leave (it asks to be restarted when it must)
            return (f"{exit_reason(code)} although no one asked it to stop: code running in it "
                    "ended it (os._exit in a thread a task started, or posix._exit; os._exit on "
                    "an engine's main thread is answered as the task's error instead)")
        return exit_reason(code)

    def stop_all(self) -> None:
        """Kill every engine this launcher started and remove their connection files."""
        managers = [*self.pending.values(), *self.running.values()]
        for engine_id in list(self.running):
            self._let_go(engine_id)
        self.pending.clear()
        for km in managers:
            try:
                km.shutdown_kernel(now=True)
            except Exception as e:  # already gone
                log.debug("stopping an engine: %s", e)
