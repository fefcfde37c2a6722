"""Cluster connection files: where they live, how they are written and found.

A connection file is JSON with the controller's URLs and the cluster key.  It lives
in the Jupyter runtime directory, ``ipylb-<profile>.json`` for a standalone
cluster, and is written with mode 0600 (the key lets its reader run code).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
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


# Leftovers in the runtime directory: files of kernels and private clusters whose processes
# were killed (SIGKILL, OOM) before they could remove them.  Judged only after this long, so
# a kernel that is starting (its connection file is written before it binds) is left alone.
LEFTOVER_GRACE_S = 60.0


def remove_kernel_files(path: Path | str) -> None:
    """Remove a kernel's connection file and, for the ipc transport, its socket files
    (``<ip>-<port>``, which a killed kernel leaves behind)."""
    try:
        with open(path) as f:
            info = json.load(f)
        if info.get("transport") == "ipc" and isinstance(info.get("ip"), str):
            for name, port in info.items():
                if name.endswith("_port") and isinstance(port, int):
                    Path(f"{info['ip']}-{port}").unlink(missing_ok=True)
    except (OSError, ValueError):
        pass
    Path(path).unlink(missing_ok=True)


def _kernel_alive(info: dict[str, Any]) -> bool:
    """Whether something listens on the ipc heartbeat socket of a kernel connection file
    (a unix socket nobody listens on refuses connections)."""
    if info.get("transport") != "ipc":
        return True  # not one of ours: leave it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(f"{info['ip']}-{info['hb_port']}")
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except (OSError, KeyError, TypeError):
        return True
    finally:
        sock.close()
    return True


def sweep_leftovers(grace_s: float = LEFTOVER_GRACE_S) -> list[str]:
    """Remove, from the runtime directory, engine kernel files (``kernel-ipylb-*.json`` and
    their ipc sockets) whose kernel no longer listens, and private clusters' connection files
    (``ipylb-local-*.json``) whose controller is gone; returns the names removed.  Files
    younger than ``grace_s`` seconds are left alone."""
    removed = []
    old = time.time() - grace_s
    rt = runtime_dir()
    for path in [*rt.glob("kernel-ipylb-*.json"), *rt.glob("ipylb-local-*.json")]:
        try:
            if path.stat().st_mtime > old:
                continue
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if path.name.startswith("kernel-"):
            if not _kernel_alive(info):
                remove_kernel_files(path)
                removed.append(path.name)
        elif not pid_alive(info.get("pid")):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


# -- addresses that work from other hosts -------------------------------------------

_WILDCARDS = ("0.0.0.0", "*", "::", "[::]", "")


def is_wildcard(ip: str) -> bool:
    """Whether ``ip`` means "every interface" (a bind address, not one to connect to)."""
    return ip in _WILDCARDS


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) is this machine's loopback."""
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_address() -> str:
    """An address of this host that other hosts can connect to (ipyparallel's "location"):
    the host's name if it resolves to a non-loopback address here, else the first
    non-loopback IPv4 (then IPv6) address of an interface that is up, else 127.0.0.1."""
    import psutil

    name = socket.gethostname()
    try:
        resolved = {a[4][0] for a in socket.getaddrinfo(name, None)}
    except OSError:
        resolved = set()
    if resolved and not any(is_loopback(a) for a in resolved):
        return name
    up = {n for n, s in psutil.net_if_stats().items() if s.isup}
    for family in (socket.AF_INET, socket.AF_INET6):
        for nic, addrs in psutil.net_if_addrs().items():
            for a in addrs:
                if nic in up and a.family == family and not is_loopback(a.address) \
                        and not a.address.startswith("fe80"):
                    return a.address
    return "127.0.0.1"


def connect_url(bound: str, location: str | None = None) -> str:
    """The url others connect to for a socket bound at ``bound`` (``tcp://IP:PORT``).

    A wildcard bind (``0.0.0.0``, ``::``) is replaced by ``location`` or, if none, by
    :func:`host_address`: ``tcp://0.0.0.0:PORT`` would make a peer on another host
    connect to itself.  An explicit ``location`` replaces any address (a NAT, a DNS name)."""
    scheme, _, rest = bound.partition("://")
    host, _, port = rest.rpartition(":")
    if location is None and not is_wildcard(host):
        return bound
    where = location or host_address()
    if ":" in where and not where.startswith("["):
        where = f"[{where}]"
    return f"{scheme}://{where}:{port}"


def split_url(url: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (HOST, PORT); ValueError for anything else."""
    scheme, _, rest = url.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not port.isdigit():
        raise ValueError(f"not a tcp://HOST:PORT url: {url!r}")
    return host.strip("[]"), int(port)


def route_address(host: str, port: int) -> str:
    """The local address this host would use to reach ``host:port`` (no packet is sent:
    connecting a UDP socket only asks the kernel for a route)."""
    import socket

    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(info[0], socket.SOCK_DGRAM) as s:
        s.connect(info[4])
        return s.getsockname()[0]


def secure(sock: Any, info: dict[str, Any]) -> None:
    """Before ``sock`` connects to the controller described by ``info``: if the cluster
    runs with CurveZMQ (``ipylb cluster start --curve``), encrypt the connection under
    the controller's public key, with a fresh key pair of our own."""
    server = info.get("curve_serverkey")
    if not server:
        return
    import zmq

    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = server.encode()
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def engine_host(meta: dict[str, Any]) -> str:
    """Where an engine runs, from its ``engine_info()`` entry: its host name, and the address
    the controller pings it at when that is tcp (two hosts may share a name)."""
    name = str(meta.get("hostname") or "?")
    url = meta.get("heartbeat") or ""
    if isinstance(url, str) and url.startswith("tcp://"):
        try:
            host = split_url(url)[0]
        except ValueError:
            return name
        if not is_loopback(host):
            return f"{name} ({host})"
    return name
