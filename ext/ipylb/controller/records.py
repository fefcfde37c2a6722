"""Task records the controller keeps: the request's buffers (for retries and
resubmit) and, once known, the result's."""

from __future__ import annotations

from typing import Any


class Record:
    """One task as the controller knows it."""

    __slots__ = ("msg_id", "client", "bufs", "bufs_mac", "flags", "watchers", "result",
                 "result_bufs", "result_mac")

    def __init__(self, msg_id: str, client: bytes, bufs: list[Any], bufs_mac: bytes,
                 flags: dict[str, Any] | None = None) -> None:
        self.msg_id = msg_id
        self.client = client  # the receive socket of the client that submitted it
        self.bufs = bufs
        self.bufs_mac = bufs_mac
        self.flags = flags
        self.watchers: list[bytes] = []  # other clients waiting for it (get_result)
        # (engine_id, status, started, completed, stdout, stderr, error) once finished
        self.result: tuple | None = None
        self.result_bufs: list[Any] = []
        self.result_mac = b""


class TaskStore(dict):
    """msg_id -> Record, in memory."""

    def add(self, rec: Record) -> None:
        """Keep ``rec`` under its msg_id."""
        self[rec.msg_id] = rec
