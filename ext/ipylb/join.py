"""``ipylb engine join``: engine kernels on this host for a controller on another host.

This is what a job script, a container or an SSH session runs.  The engines are
ordinary kernels from the ``ipylb-engine`` kernelspec, started through
jupyter_client (:class:`~ipylb.controller.launcher.EngineLauncher`, as the
controller starts its own); their Jupyter channels listen on tcp at an address
the controller can reach, because the controller watches them by heartbeat.  The
command stays in the foreground until every engine has ended (the controller
stopped them, or it is gone: an engine leaves when its connection to the
controller drops) or it gets SIGINT/SIGTERM, which stops them.
"""

from __future__ import annotations

import queue
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from . import connection
from .error import ControllerGone, NoCluster

# How long the controller has to accept a tcp connection before we say it cannot be reached.
REACH_TIMEOUT_S = 3.0
# How long the controller has to answer a --url probe.
PROBE_TIMEOUT_S = 10.0
# How often the foreground loop looks at the engines' processes.
POLL_S = 0.5


def _say(text: str) -> None:
    print(f"ipylb engine join: {text}", file=sys.stderr, flush=True)


def unreachable(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why a tcp connection to ``url`` fails from this host (a sentence), or None if it
    opens.  A loopback url gets the likely cause: the controller was started without
    ``--ip``, so only processes on its own host can reach it."""
    host, port = connection.split_url(url)
    try:
        socket.create_connection((host, port), timeout).close()
        return None
    except TimeoutError:
        why = f"no answer from {host}:{port} within {timeout:.0f} s (a firewall drops the " \
              "traffic, or that address is not routable from this host)"
    except ConnectionRefusedError:
        why = f"nothing listens at {host}:{port} on the host that address leads to"
    except socket.gaierror as e:
        return f"cannot resolve the controller's host name {host!r}: {e.strerror}; start the " \
               "controller with --location set to a name or address this host can resolve"
    except OSError as e:
        why = f"cannot connect to {host}:{port}: {e.strerror or e}"
    if connection.is_loopback(host):
        return (f"the controller listens on {host}, a loopback address: only processes on its "
                f"own host can reach it ({why}). Start it with `ipylb cluster start --ip 0.0.0.0` "
                "(or the address of an interface this host can reach), then copy its new "
                "connection file here.")
    return f"{why}. Is the controller running, and are its ports open to this host?"


def resolve(profile: str | None, cluster_file: str | None, url: str | None,
            key_file: str | None, timeout: float = PROBE_TIMEOUT_S) -> Path:
    """The connection file the engines read: ``--cluster-file``, the profile's, or one
    written here (0600) from what the controller at ``--url`` says, asked under the key in
    ``--key-file`` (ValueError, NoCluster: said why)."""
    if (url is None) != (key_file is None):
        raise ValueError("--url and --key-file go together: the controller's engine url "
                         "(`ipylb cluster status` prints it) and a file holding the cluster key")
    if url is not None and key_file is not None:
        return _from_url(url, Path(key_file), timeout)
    if cluster_file is not None:
        return Path(cluster_file).resolve()
    return connection.profile_file(profile or "default")


def _read_key(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read the key file {path}: {e.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"{path} is readable by others (mode {mode & 0o777:o}): the key lets its "
                         f"reader run code on every engine; `chmod 600 {path}` first")
    if not key:
        raise ValueError(f"the key file {path} is empty")
    return key.encode()


def _from_url(url: str, key_file: Path, timeout: float) -> Path:
    """Ask the controller at ``url`` (its engine url) for what joining needs, under the key
    (a signed PROBE carrying a nonce, answered by a signed ABOUT echoing it); write it with
    the key as a private connection file in this host's runtime dir."""
    import zmq

    from . import wire

    key = _read_key(key_file)
    connection.split_url(url)  # ValueError if it is not tcp://HOST:PORT
    why = unreachable(url)
    if why is not None:
        raise NoCluster(f"cannot reach the controller: {why}")
    me = f"probe-{uuid.uuid4().hex[:12]}".encode()
    signer = wire.Signer(key, me)
    nonce = uuid.uuid4().hex
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, me)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(url)
        wire.send(sock, signer.pack(wire.PROBE, nonce, to=b""))
        deadline = time.monotonic() + timeout
        while sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
            try:
                kind, sender, about, _b, _m = signer.unpack(wire.recv(sock))
            except wire.WireError:
                continue
            if kind == wire.ABOUT and isinstance(about, dict) and about.get("nonce") == nonce:
                break
        else:
            raise NoCluster(
                f"the controller at {url} accepts connections but did not answer within "
                f"{timeout:.0f} s: the key in {key_file} is not this cluster's (a restarted "
                "cluster has a new one), the url is not its engine url, or it runs with "
                "--curve (then pass its connection file with --cluster-file)")
    finally:
        sock.close(0)
    info = {k: v for k, v in about.items() if k != "nonce" and v is not None}
    info["key"] = key.decode()
    info["controller_id"] = sender.decode()
    host, port = connection.split_url(url)
    path = connection.runtime_dir() / f"ipylb-joined-{host.replace(':', '_')}-{port}.json"
    connection.write(path, info)
    return path


def join(path: Path, n: int, ip: str | None, timeout: float) -> int:
    """Start ``n`` engines for the cluster of connection file ``path``; serve until they
    end.  Returns the exit status: 0 when the controller stopped them or a signal did,
    1 when they could not join or some died."""
    from .client.client import Client
    from .controller.launcher import EngineLauncher

    info = connection.read(path)
    for field in ("engine_url", "client_url"):
        why = unreachable(info[field])
        if why is not None:
            _say(f"cannot reach the controller: {why}")
            return 1
    host, port = connection.split_url(info["engine_url"])
    ip = ip or connection.route_address(host, port)
    answer = min(timeout, PROBE_TIMEOUT_S)  # it accepts connections: it answers at once
    try:
        rc = Client(path, timeout=answer)
    except NoCluster:
        _say(f"the controller at {info['client_url']} accepts connections but did not answer "
             f"within {answer:.0f} s: {path} is probably not its current connection file "
             "(a restarted cluster has a new key); copy the new one here")
        return 1
    # Not restarted here: they end when their controller stops them (exit code 0).
    launcher = EngineLauncher(str(path), ip=ip, restart=False, joined=True,
                              curve=bool(info.get("curve_serverkey")))
    stop = threading.Event()
    # The controller's interrupt requests for our engines, (engine_id, tag, task_id), carried
    # out on this thread (the launcher's only user); None: a signal came.
    asked: queue.SimpleQueue = queue.SimpleQueue()

    def on_signal(*_: Any) -> None:
        stop.set()
        asked.put(None)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start(n)
        ids = _wait_registered(rc, launcher, n, timeout, stop, asked)
        if ids is None:
            return 0 if stop.is_set() else 1
        _say(f"{n} engine(s) joined the cluster at {info['engine_url']} as engine(s) "
             f"{', '.join(map(str, ids))}; their Jupyter channels listen on {ip}. "
             "Ctrl-C stops them.")
        return _serve(launcher, stop, asked)
    finally:
        rc.close()
        launcher.stop_all()
        for s, h in previous.items():
            signal.signal(s, h)


def _wait_registered(rc: Any, launcher: Any, n: int, timeout: float, stop: threading.Event,
                     asked: queue.SimpleQueue) -> list[int] | None:
    """Offer to interrupt the engines we started (the controller cannot reach their
    processes: ``rc.relay_interrupts``), then wait until it lists each of them (by tag);
    None (said why) if one dies first, a signal comes, or ``timeout`` passes."""
    tags = set(launcher.pending)
    waited = 0.0
    try:
        rc.relay_interrupts(sorted(tags), lambda *request: asked.put(request))
        while waited < timeout:
            for engine_id, meta in rc.engine_info().items():
                if meta.get("tag") in tags:
                    launcher.registered(meta["tag"], engine_id)
            if not launcher.pending:
                return sorted(launcher.running)
            dead = launcher.poll_dead()
            if dead:
                _say("; ".join(reason for _id, reason, _fate in dead))
                return None
            _relay(launcher, asked, POLL_S)
            if stop.is_set():
                return None
            waited += POLL_S
    except ControllerGone as gone:  # stopped before we saw them register: theirs to end
        _say(str(gone))
        if gone.shut_down:
            stop.set()
        return None
    _say(f"{len(launcher.pending)} of {n} engine(s) did not register within {timeout:.0f} s "
         "(their log is above)")
    return None


def _relay(launcher: Any, asked: queue.SimpleQueue, wait: float) -> None:
    """Carry out the controller's interrupt requests that come within ``wait`` seconds (and
    those waiting), through the KernelManager of each engine (``launcher.interrupt``)."""
    try:
        request = asked.get(timeout=wait)
        while request is not None:
            engine_id, tag, task_id = request
            if engine_id not in launcher.running:  # asked before we saw it register
                launcher.registered(tag, engine_id)
            try:
                if not launcher.interrupt(engine_id, task_id):
                    _say(f"asked to interrupt engine {engine_id}, which this process does not run")
            except Exception as e:  # its kernel is gone: its end is noticed by the poll
                _say(f"interrupting engine {engine_id} failed: {type(e).__name__}: {e}")
            request = asked.get_nowait()
    except queue.Empty:
        pass


def _serve(launcher: Any, stop: threading.Event, asked: queue.SimpleQueue) -> int:
    """Until every engine has ended or a signal comes (carrying out the controller's
    interrupt requests meanwhile); 1 if an engine died on its own."""
    status = 0
    while launcher.running and not stop.is_set():
        _relay(launcher, asked, POLL_S)
        for engine_id, reason, _fate in launcher.poll_dead():
            if reason != "its process exited with code 0":
                status = 1
            _say(f"engine {engine_id} ended: {reason}")
    if not stop.is_set():
        _say("every engine has ended")
    return status
