"""A one-node SLURM cluster on this machine, for tests/test_slurm.py.

Debian's ``slurm-wlm`` and ``munge`` (installed by .ci/run): a throw-away munge key,
``munged``, ``slurmctld`` and ``slurmd`` started as root with a minimal
``slurm.conf`` under a temporary directory (the node's real CPUs and memory, as
``slurmd -C`` reports them; every daemon on 127.0.0.1), and stopped, every one of
them, on exit.  Client commands find it through ``SLURM_CONF``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def unavailable() -> str | None:
    """Why a SLURM cluster cannot be started here (None: it can)."""
    if os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root (CI runs as root)"
    missing = [d for d in (*DAEMONS, "sbatch", "scancel") if shutil.which(d) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This node as slurmd sees it: ``NodeName=... CPUs=... RealMemory=...``."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True, timeout=30)
    line = out.stdout.splitlines()[0]
    mem = int(line.rsplit("RealMemory=", 1)[1].split()[0])
    # Leave room for what the daemons' own accounting sees as used.
    return line.replace(f"RealMemory={mem}", f"RealMemory={max(1, mem - 512)}")


def _conf(root: Path, node: str, name: str) -> str:
    return "\n".join([
        "ClusterName=ipylbtest",
        f"SlurmctldHost={name}(127.0.0.1)",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={root}/munge.socket",
        "CredType=cred/munge",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "MpiDefault=none", "ReturnToService=2", "SchedulerType=sched/builtin",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=2",
        f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def cluster(root: Path, timeout: float = 60) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under ``root``; yields the environment that
    points SLURM's commands at it.  Everything is stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("state", "spool"):
        (root / d).mkdir(exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    node = _node_line()
    name = node.split()[0].split("=", 1)[1]
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node, name))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started: list[Path] = []
    try:
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
                        f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                        f"--seed-file={root}/munged.seed"], check=True, timeout=30,
                       capture_output=True)
        started.append(root / "munged.pid")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(conf)], check=True, env=env, timeout=30,
                           capture_output=True)
            started.append(root / f"{daemon}.pid")
        _wait_idle(env, name, timeout, root)
        yield env
    finally:
        for pidfile in reversed(started):
            _stop(pidfile)


def _wait_idle(env: dict[str, str], name: str, timeout: float, root: Path) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-n", name, "-o", "%t"], env=env,
                             capture_output=True, text=True, timeout=30)
        state = out.stdout.strip()
        if state in ("idle", "mix", "alloc"):
            return
        time.sleep(0.5)
    logs = "".join((root / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log")
                   if (root / f).exists())
    raise RuntimeError(f"the SLURM node did not become idle in {timeout} s (state {state!r})\n"
                       f"{logs}")


def _stop(pidfile: Path, timeout: float = 20) -> None:
    pid = _pid(pidfile)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
