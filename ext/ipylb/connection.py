"""Cluster connection files: where they live, how they are written and found.

A connection file is JSON with the controller's URLs and the cluster key.  It lives
in the Jupyter runtime directory, ``ipylb-<profile>.json`` for a standalone
cluster, and is written with mode 0600 (the key lets its reader run code).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir

from .error import NoCluster

# The kernelspec engines are started from (shipped under kernelspec/, installed with the package).
KERNEL_NAME = "ipylb-engine"


def runtime_dir() -> Path:
    """The Jupyter runtime directory, created private if missing."""
    path = Path(jupyter_runtime_dir())
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def profile_file(profile: str = "default") -> Path:
    """Where the standalone cluster of ``profile`` keeps its connection file."""
    check_profile(profile)
    return runtime_dir() / f"ipylb-{profile}.json"


def check_profile(profile: str) -> None:
    """Raise ValueError unless ``profile`` is a plain name (it becomes part of file names)."""
    if not isinstance(profile, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", profile):
        raise ValueError(
            f"a profile name is letters, digits, '_', '.' and '-' (not first), got {profile!r}"
        )


def write(path: Path | str, info: dict[str, Any]) -> None:
    """Write ``info`` to ``path`` atomically with mode 0600."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)


def read(path: Path | str) -> dict[str, Any]:
    """Read a connection file, or raise NoCluster saying how to start one."""
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise NoCluster(
            f"no ipylb cluster connection file at {path}. Start a cluster with "
            "`ipylb cluster start -n 4` (or use ipylb.Client(engines=4) for a private one)."
        ) from None
    except (OSError, ValueError) as e:
        raise NoCluster(f"cannot read the ipylb connection file {path}: {e}") from None
    for field in ("key", "controller_id", "client_url", "engine_url"):
        if field not in info:
            raise NoCluster(f"{path} is not an ipylb connection file (no {field!r})")
    return info


def profile_dir(profile: str = "default") -> Path:
    """A private directory for what a profile keeps across restarts (its task database),
    in the Jupyter data directory: the runtime directory may be emptied at logout."""
    check_profile(profile)
    path = Path(jupyter_data_dir()) / "ipylb" / profile
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def log_file(profile: str = "default") -> Path:
    """Where a daemonized cluster of ``profile`` writes its controller's and engines' logs."""
    check_profile(profile)
    return runtime_dir() / f"ipylb-{profile}.log"


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a connection file may outlive it)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, but not our cluster's
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): kill(0) is all we have
        return True
