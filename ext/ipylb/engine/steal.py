"""The engine's answers to steal requests (``hwm="auto"``, :mod:`ipylb.core.pipeline`).

With ``hwm="auto"`` the controller sends an engine more tasks than the one it runs, and
may ask for a queued one back (STEAL) when another engine is idle.  The engine runs its
tasks on the main thread and cannot read its task socket while one runs, so requests
come to a socket of their own, ``<engine ident>/steal``, served by a thread.  Every
frame is signed under the cluster key, as on the task socket.

The rule that makes a task never run twice: the controller numbers the tasks it sends
to each engine (1, 2, ...; the number is in each task's head).  The main thread takes
tasks in that order and, before it runs one, records its number and checks, under a
lock, that the task was not given back.  The thread answers a request for task number
``n`` under the same lock: ``cancelled`` if the main thread has not taken ``n`` yet
(the task is then marked, and skipped unrun when its turn comes), else "too late" (it
has started, or ended: its result comes as usual).  Only a "cancelled" answer lets the
controller send the task elsewhere.
"""

from __future__ import annotations

import threading
from typing import Any

import zmq

from .. import connection, wire

__all__ = ["StealDesk"]


class StealDesk:
    """Serves one engine's steal requests from a daemon thread, started by :meth:`start`."""

    def __init__(self, cluster: dict[str, Any], ident: bytes, url: str) -> None:
        self._cluster = cluster
        self._ident = ident + b"/steal"
        self._url = url
        self._lock = threading.Lock()
        self.taken = 0  # the number of the last task the main thread took to run
        # Answered "cancelled", not yet reached: by number, as the same task may be queued
        # here twice (given back, retried elsewhere, sent here again) and given back twice.
        self.given_back: dict[int, str] = {}
        self._thread: threading.Thread | None = None

    def take(self, number: int, msg_id: str) -> bool:
        """The main thread is about to run task ``number`` (``msg_id``): False if it was
        given back (skip it: it runs elsewhere), else True (it may no longer be).  Starts
        serving if it does not yet (an engine whose cluster file did not say hwm "auto")."""
        if self._thread is None:
            self.start()
        with self._lock:
            self.taken = number
            if self.given_back.pop(number, None) == msg_id:
                return False
        return True

    def answer(self, msg_id: str, number: int) -> bool:
        """A request for task ``number``: True (cancelled) if it was not taken yet."""
        with self._lock:
            if number <= self.taken:
                return False
            self.given_back[number] = msg_id
            return True

    def start(self) -> None:
        """Connect and serve (once; later calls do nothing).  Only clusters with hwm "auto"
        need it: an engine starts it at registration when its cluster file says so, else
        at its first numbered task (a request before it connects is answered for it by
        the controller: "too late", the task stays)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, daemon=True, name="ipylb-steal")
            self._thread.start()

    def _serve(self) -> None:
        cluster = self._cluster
        signer = wire.Signer(cluster["key"].encode(), self._ident,
                             cluster["controller_id"].encode())
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self._ident)
        sock.setsockopt(zmq.LINGER, 0)
        connection.secure(sock, cluster)
        sock.connect(self._url)
        while True:  # (a daemon thread: it ends with the engine)
            frames = sock.recv_multipart(copy=False)  # blocks: requests are rare
            try:
                kind, _sender, meta, _bufs, _mac = signer.unpack(frames)
            except wire.WireError:
                continue
            if kind != wire.STEAL or type(meta) is not tuple or len(meta) != 2:
                continue
            msg_id, number = meta
            wire.send(sock, signer.pack(wire.STOLEN, (msg_id, self.answer(msg_id, number))))

