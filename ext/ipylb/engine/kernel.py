"""The engine's kernel class: IPythonKernel plus a task channel."""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from ipykernel.zmqshell import ZMQInteractiveShell
from traitlets import Type, observe

from ..connection import remove_kernel_files
from . import guard
from .taskchannel import TaskChannel

# How often an engine checks that the process that launched it is still there.
PARENT_POLL_S = 0.5
# Bound now: a task that patches os or time must not stop the watch (nor replace os._exit).
_getppid, _sleep, _exit = os.getppid, time.sleep, os._exit


def _remove_files_if_orphaned(parent: int, connection_file: str) -> None:
    """Remove our kernel connection file and ipc sockets if the process that launched us
    is gone: nobody else will (a living launcher's KernelManager does it itself)."""
    if connection_file and _getppid() != parent:
        remove_kernel_files(connection_file)


def _exit_when_orphaned(parent: int, connection_file: str) -> None:
    """Exit once the launching process is gone, so a killed client leaves no engine behind,
    and no file either."""
    while True:
        _sleep(PARENT_POLL_S)
        if _getppid() != parent:
            _remove_files_if_orphaned(parent, connection_file)
            _exit(1)


class EngineShell(ZMQInteractiveShell):
    """The engine's shell: a task that asks the kernel to exit (``exit()``, ``quit()``,
    ``exit_now = True``) does not stop the engine; the task fails saying so (guard)."""

    @observe("exit_now")
    def _update_exit_now(self, change: dict[str, Any]) -> None:
        channel = getattr(self.kernel, "task_channel", None)
        if change["new"] and channel is not None and channel.running is not None:
            channel.fault = guard.EXIT_ASKED
            return
        super()._update_exit_now(change)


class EngineKernel(IPythonKernel):
    """An IPython kernel that also takes ipylb tasks from the controller.

    Besides Jupyter's control messages it answers ``ipylb_interrupt_request`` (content
    ``{"msg_id": ...}``): interrupt that task if it is the one running (the controller sends
    it when a task's walltime expires).  Like ``interrupt_request`` it is served by the
    control thread while the main thread runs the task; it has no reply.
    """

    implementation = "ipylb-engine"
    shell_class = Type(EngineShell)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.control_handlers["ipylb_interrupt_request"] = self.ipylb_interrupt_request

    def ipylb_interrupt_request(self, _stream: Any, _ident: Any, parent: dict[str, Any]) -> None:
        """Interrupt the running task named by ``parent["content"]["msg_id"]``."""
        channel = getattr(self, "task_channel", None)
        msg_id = parent["content"].get("msg_id")
        if channel is not None and isinstance(msg_id, str):
            channel.interrupt(msg_id)

    def start(self) -> None:  # type: ignore[override]
        super().start()
        # In place of ipykernel's parent poller (see EngineApp), also for a plain kernel.
        connection_file = getattr(self.parent, "abs_connection_file", "")
        parent = os.getppid()
        # Not for a remote provisioner's engine (its kernelspec sets IPYLB_DETACHED): one
        # started over SSH by `nohup ... &` outlives that shell; it leaves when its
        # connection to the controller drops (see TaskChannel).
        if not os.environ.get("IPYLB_DETACHED"):
            threading.Thread(target=_exit_when_orphaned, args=(parent, connection_file),
                             daemon=True, name="ipylb-parent-watch").start()
        # Also when we leave on our own because the controller went (the task channel sees
        # its connection drop before this thread sees it is orphaned).
        atexit.register(_remove_files_if_orphaned, parent, connection_file)
        path = os.environ.get("IPYLB_CLUSTER_FILE")
        if not path:
            print("ipylb engine: IPYLB_CLUSTER_FILE is not set; serving cells only", file=sys.__stderr__)
            return
        with open(path) as f:
            cluster = json.load(f)
        self.task_channel = TaskChannel(self, cluster, connection_file)
        self.task_channel.start(self.io_loop.asyncio_loop)
