"""Shared by the tests that run the installed ``ipylb`` command as a user would, that
check every process of a cluster is gone afterwards, and that drive a real Controller
object one turn at a time."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ipylb.connection import pid_alive

__all__ = ["IPYLB", "DrivenController", "ipylb_cmd", "pid_alive", "reap", "wait_gone"]

IPYLB = str(Path(sys.executable).with_name("ipylb"))


def ipylb_cmd(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``ipylb ARGS`` with no stdin; its output captured as text; ``timeout`` seconds."""
    return subprocess.run([IPYLB, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def reap(procs: Iterable[subprocess.Popen], timeout: float = 10) -> None:
    """Wait for each of our child ``procs`` to end (``timeout`` seconds each), killing any
    that does not."""
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_gone(pids: Iterable[int], timeout: float = 10) -> bool:
    """Whether every process of ``pids`` has ended (zombies count as ended) within
    ``timeout`` seconds.  They are not our children, so there is no exit event to wait on:
    this polls /proc every 50 ms."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class DrivenController:
    """A real Controller object on real sockets, driven one turn at a time by the test
    (time is an argument of its housekeeping), with one engine (``engine``, signing with
    ``esign``; its heartbeat socket takes pings and never answers) and one client (sockets
    ``submit``/``results``, signers ``ssign``/``rsign``) played by plain DEALER sockets.
    The engine is registered on construction; :meth:`close` closes everything."""

    def __init__(self, ctl: Any, key: bytes, tag: str) -> None:
        import zmq
        from ipylb import compat, wire

        self.ctl, self._ctx, self._socks = ctl, zmq.Context.instance(), []
        heartbeat = self._ctx.socket(zmq.ROUTER)
        self._socks.append(heartbeat)
        hb_port = heartbeat.bind_to_random_port("tcp://127.0.0.1")
        names = [f"engine-{tag}".encode(), f"client-{tag}-s".encode(), f"client-{tag}-r".encode()]
        self.engine = self.dealer(names[0], ctl.engine_url)
        self.submit = self.dealer(names[1], ctl.client_url)
        self.results = self.dealer(names[2], ctl.client_url)
        self.esign = wire.Signer(key, names[0], ctl.ident)
        self.ssign, self.rsign = wire.Signer(key, names[1], ctl.ident), wire.Signer(key, names[2])
        self.engine.send_multipart(self.esign.pack(wire.REGISTER, {
            "heartbeat": f"tcp://127.0.0.1:{hb_port}", "versions": compat.versions(), "pid": 1}))
        self.serve(ctl.engines, ctl._on_engine)
        assert self.receive(self.engine, self.esign)[0] == wire.REGISTERED

    def dealer(self, ident: bytes, url: str) -> Any:
        import zmq

        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, ident)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(url)
        self._socks.append(s)
        return s

    def serve(self, sock: Any, handler: Any) -> None:
        """One turn of the controller's loop on ``sock`` (a message must come)."""
        assert sock.poll(10_000)
        self.ctl._drain(sock, handler)

    @staticmethod
    def receive(sock: Any, signer: Any) -> tuple[int, Any, list[Any], bytes]:
        """The next message on ``sock``: (kind, meta, bufs, bufs_mac)."""
        assert sock.poll(10_000)
        kind, _sender, meta, bufs, mac = signer.unpack(sock.recv_multipart())
        return kind, meta, bufs, mac

    def close(self) -> None:
        for s in self._socks:
            s.close(0)
        self.ctl.close()
