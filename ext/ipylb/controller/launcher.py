"""Starting, watching and stopping engine kernels through jupyter_client."""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from typing import Any

from jupyter_client import KernelManager

from ..connection import KERNEL_NAME, runtime_dir

log = logging.getLogger("ipylb.controller")



def exit_reason(returncode: int | None) -> str:
    """A sentence for how an engine process ended."""
    if returncode is None:
        return "its process ended (exit status unknown)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = ": out of memory?" if returncode == -signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"its process exited with code {returncode}"


class EngineLauncher:
    """Starts engine kernels from the ``ipylb-engine`` kernelspec and notices when they die."""

    def __init__(self, cluster_file: str, cwd: str | None = None, kernel_name: str = KERNEL_NAME,
                 ip: str | None = None) -> None:
        """``ip``: where the engines' Jupyter channels listen (tcp), for engines whose
        controller is on another host; None: unix sockets in the runtime dir."""
        self.cluster_file = cluster_file
        self.ip = ip
        self.cwd = cwd or os.getcwd()
        self.kernel_name = kernel_name
        self.pending: dict[str, KernelManager] = {}  # tag -> manager, not registered yet
        self.running: dict[int, KernelManager] = {}  # engine id -> manager

    def start(self, n: int) -> None:
        """Start ``n`` engines; they boot in parallel and register themselves."""
        for _ in range(n):
            tag = uuid.uuid4().hex[:12]
            # Local engines talk to Jupyter frontends over unix sockets in the private runtime
            # dir, next to their connection files (`jupyter console --existing` finds them).
            base = runtime_dir() / f"kernel-ipylb-{tag}"
            if self.ip is None:
                km = KernelManager(kernel_name=self.kernel_name, transport="ipc", ip=str(base),
                                   connection_file=f"{base}.json")
            else:  # the controller (another host) pings their heartbeat over tcp
                km = KernelManager(kernel_name=self.kernel_name, transport="tcp", ip=self.ip,
                                   connection_file=f"{base}.json")
            env = {**os.environ, "IPYLB_CLUSTER_FILE": self.cluster_file, "IPYLB_ENGINE_TAG": tag}
            # The engine's own stdout goes where our log goes: our stdout is a pipe that
            # the process which started us closes once we are ready.
            km.start_kernel(env=env, cwd=self.cwd, stdout=sys.stderr.fileno())
            self.pending[tag] = km

    def registered(self, tag: str, engine_id: int) -> None:
        """An engine we started has registered as ``engine_id``."""
        km = self.pending.pop(tag, None)
        if km is not None:
            self.running[engine_id] = km

    def manager(self, engine_id: int) -> KernelManager | None:
        """The KernelManager of an engine this launcher started."""
        return self.running.get(engine_id)

    def poll_dead(self) -> list[tuple[int | None, str]]:
        """Engines whose process has ended since the last call: (engine id or None, reason)."""
        dead: list[tuple[int | None, str]] = []
        for tag, km in list(self.pending.items()):
            if not km.is_alive():
                del self.pending[tag]
                dead.append((None, f"an engine failed to start: {self._reason(km)}"))
        for engine_id, km in list(self.running.items()):
            if not km.is_alive():
                del self.running[engine_id]
                dead.append((engine_id, self._reason(km)))
                km.cleanup_resources()
        return dead

    @staticmethod
    def _reason(km: KernelManager) -> str:
        proc: Any = getattr(km.provisioner, "process", None)
        return exit_reason(proc.returncode if proc is not None else None)

    def stop_all(self) -> None:
        """Kill every engine this launcher started and remove their connection files."""
        managers = [*self.pending.values(), *self.running.values()]
        self.pending.clear()
        self.running.clear()
        for km in managers:
            try:
                km.shutdown_kernel(now=True)
            except Exception as e:  # already gone
                log.debug("stopping an engine: %s", e)
