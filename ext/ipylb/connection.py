"""Cluster connection files: where they live, how they are written and found.

A connection file is JSON with the controller's URLs and the cluster key.  It lives
in the Jupyter runtime directory, ``ipylb-<profile>.json`` for a standalone
cluster, and is written with mode 0600 (the key lets its reader run code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir

from .error import NoCluster


def runtime_dir() -> Path:
    """The Jupyter runtime directory, created private if missing."""
    path = Path(jupyter_runtime_dir())
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def profile_file(profile: str = "default") -> Path:
    """Where the standalone cluster of ``profile`` keeps its connection file."""
    return runtime_dir() / f"ipylb-{profile}.json"


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
    for field in ("key", "client_url", "engine_url"):
        if field not in info:
            raise NoCluster(f"{path} is not an ipylb connection file (no {field!r})")
    return info
