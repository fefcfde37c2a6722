"""Starting a private cluster on this machine for ``Client(engines=N)``.

The controller runs in a child process (``python -m ipylb.controller``), which
launches the engines.  Why a process and not a thread of the client: measured
with ``ipylb bench`` on this 2-core machine, a controller thread shares the
client's GIL with the user's submitting thread and the result thread, and the
three convoy; as its own process it runs beside them (see the closing notes of
issue 2 for the figures).  The child watches this process and exits, stopping
its engines, if we die without calling ``shutdown()``.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .. import connection, limits, shm
from ..connection import KERNEL_NAME
from ..core.pipeline import DEFAULT_HWM, parse_hwm

SCHEMES = ("leastload", "lru", "plainrandom", "twobin", "weighted", "pure")
# How long a new controller has to say it is ready (it launches engines, it does not wait for them).
READY_TIMEOUT_S = 60.0


def check_kernelspec(name: str | None = None) -> None:
    """Raise a helpful error if the engine kernelspec ``name`` (default: ipylb's own) is
    not installed: RuntimeError for ipylb's, ValueError for one the caller named."""
    custom = name is not None and name != KERNEL_NAME
    try:
        KernelSpecManager().get_kernel_spec(name if custom else KERNEL_NAME)
    except NoSuchKernel:
        if custom:
            raise ValueError(
                f"no Jupyter kernelspec {name!r} (`jupyter kernelspec list` shows those "
                "installed); `ipylb kernelspec install --name NAME` writes one for engines"
            ) from None
        raise RuntimeError(
            f"the Jupyter kernelspec {KERNEL_NAME!r} is not installed in this environment "
            f"({sys.prefix}). Reinstall ipylb with `pip install ipylb` (or `pip install -e .` "
            "in a checkout), which puts it under share/jupyter/kernels; "
            "`jupyter kernelspec list` should then show it."
        ) from None


def engine_env() -> dict[str, str]:
    """This process's environment, with PYTHONPATH extended (not replaced) by its sys.path:
    what imports here (a test module, a path appended in a notebook, a directory named in
    PYTHONPATH) imports on the engines too (API.md: engines inherit the client's environment).

    PYTHONPATH's own entries come first, in their order, then the sys.path entries not
    already named; no directory appears twice (compared as absolute paths)."""
    seen: set[str] = set()
    paths: list[str] = []
    given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for p in [*given, *(p or os.curdir for p in sys.path)]:
        full = os.path.abspath(p)
        if full not in seen:
            seen.add(full)
            paths.append(full)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def read_ready(proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> str:
    """The first line a starting controller prints ("ready", or its error), read within
    ``timeout`` seconds; a controller that says nothing in time is killed (so no caller
    waits on a hung start forever) and its silence is the answer."""
    assert proc.stdout is not None
    if select.select([proc.stdout], [], [], timeout)[0]:  # (a KeyboardInterrupt leaves it open)
        line = proc.stdout.readline().strip()
    else:
        proc.kill()
        line = f"it said nothing within {timeout:.0f} s (killed)"
    proc.stdout.close()
    return line


def _restart_policy(restart: object) -> list[str]:
    """The controller's options for ``Client(restart=...)``: True, False or (limit, seconds)."""
    if restart is True:
        return []
    if restart is False:
        return ["--no-restart"]
    if isinstance(restart, tuple) and len(restart) == 2 and \
            type(restart[0]) is int and restart[0] >= 0 and \
            isinstance(restart[1], (int, float)) and not isinstance(restart[1], bool) and \
            restart[1] >= 0:
        return ["--restart-limit", str(restart[0]), "--restart-stable", str(restart[1])]
    raise ValueError(f"restart must be True, False or (limit, seconds): an int >= 0 and a number "
                     f"of seconds >= 0 (at most `limit` restarts in a row, each within `seconds` "
                     f"of the last death), got {restart!r}")


class LocalCluster:
    """A controller child process plus its engines, owned by one client."""

    def __init__(self, engines: int, scheme: str = "leastload", hwm: int | str = DEFAULT_HWM,
                 heartbeat_timeout: float = 10.0,
                 restart: bool | tuple[int, float] = True, kernel: str | None = None) -> None:
        # The caller has shown its warning, if any; 0: engines join later (the swarm bench).
        limits.check_engine_count(engines, minimum=0)
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        hwm = parse_hwm(hwm)  # ValueError that says what is allowed
        policy = _restart_policy(restart)
        check_kernelspec(kernel)
        self.connection_file: Path = (
            connection.runtime_dir() / f"ipylb-local-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        )
        cmd = [
            sys.executable, "-m", "ipylb.controller",
            "--connection-file", str(self.connection_file),
            "--engines", str(engines), "--scheme", scheme,
            "--hwm", str(hwm),
            "--parent-pid", str(os.getpid()),
            "--heartbeat-timeout", str(heartbeat_timeout),
            *policy,
            *(["--kernel", kernel] if kernel else []),
        ]
        # A session of its own: a SIGINT to the client's process group (Ctrl-C in a terminal,
        # Jupyter's interrupt of the kernel, which signals its whole group) is the client's,
        # not a request to stop the cluster.  It still ends with the client (--parent-pid).
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, env=engine_env(), start_new_session=True)
        line = read_ready(self.proc)
        if line != "ready":
            self.proc.wait()
            raise RuntimeError(f"the ipylb controller failed to start: {line or 'no output'}")
        self.info: dict[str, Any] = connection.read(self.connection_file)

    def exit_reason(self) -> str | None:
        """How the controller process ended (None while it runs)."""
        code = self.proc.poll()
        if code is None:
            return None
        from ..controller.launcher import exit_reason

        text = exit_reason(code)
        return text if code >= 0 else f"its process was {text}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the controller (it stops its engines) and wait for it; remove what a killed
        controller leaves behind (its connection file, its shared-memory segments)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shm.sweep(self.info.get("shm_prefix"))  # what a killed controller could not remove
        self.connection_file.unlink(missing_ok=True)
