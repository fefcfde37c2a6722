"""Large buffers between the processes of one machine, through shared memory.

Why: an 8 MB array sent by zmq crosses four TCP hops on a task's round trip
(client -> controller -> engine and back; ~3.7 ms each on this machine's
loopback) although the controller never looks at it.  Instead, a producer
(client or engine) writes a buffer larger than ``MIN_BYTES`` once into a file
in ``/dev/shm`` (a "segment") and sends only its name; consumers map it.

Ownership: the producer creates a segment, writes it and sends its name to the
controller, which from then on owns it: it keeps it exactly as long as the
task's record (retries, resubmit and ``get_result`` need it) and removes it with
the record.  Consumers map segments copy-on-write, so an engine (or a user)
that changes an array in place changes its own copy of the pages, never the
record.  A mapping outlives the file's removal, so a result already received
stays valid after the controller has dropped the record.  Segments left by a
crashed process are swept: by the controller at exit (its own) and at start
(those of controllers that are gone).

Security: a segment is created O_EXCL with mode 0600 in the sticky ``/dev/shm``
(no other user can create, replace or alter it); its name and size travel in
the signed head, and its content is covered by the message's MAC exactly like
an inline frame (the consumer hashes the mapping before unpickling).

Where it applies: only between processes that see the same ``/dev/shm`` as the
controller (same boot, same mount, same user: :func:`domain`).  Everyone else
gets the bytes inline; the controller reads a segment into a frame for a peer
on another machine.  ``IPYLB_SHM=off`` turns the path off for a process.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import re
import secrets
import stat
from collections.abc import Sequence
from functools import cache
from typing import Any

from .connection import pid_alive
from .digest import CHUNK, per_chunk
from .error import WireError

SHM_DIR = "/dev/shm"
# Buffers larger than this travel through a segment (below it, zmq is as quick).
MIN_BYTES = CHUNK
_SHA256 = hashlib.sha256
_OWN = re.compile(r"ipylb-(\d+)-[0-9a-f]+-")
_TAIL = re.compile(r"[0-9a-f]{1,32}-[0-9]{1,20}")


@cache
def domain() -> str | None:
    """A token naming the shared memory this process sees (None: no shared-memory path).

    Two processes with the same token can hand each other segments."""
    if os.environ.get("IPYLB_SHM", "").lower() in ("0", "off", "no", "false"):
        return None
    try:
        st = os.stat(SHM_DIR)
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:  # not Linux, or no /dev/shm: zmq carries everything
        return None
    if not stat.S_ISDIR(st.st_mode) or not os.access(SHM_DIR, os.W_OK | os.X_OK):
        return None
    return f"{boot}:{st.st_dev}:{st.st_ino}:{os.geteuid()}"


def controller_prefix(nonce: str) -> str:
    """The name prefix of every segment of one controller run (its pid lets a later
    controller sweep what a killed one left)."""
    return f"ipylb-{os.getpid()}-{nonce}-"


def shared_prefix(info: dict[str, Any]) -> str | None:
    """The segment prefix of the controller described by ``info`` (a connection file),
    if this process shares its /dev/shm; else None (everything travels inline)."""
    mine = domain()
    if mine is None or info.get("shm_domain") != mine:
        return None
    prefix = info.get("shm_prefix")
    return prefix if isinstance(prefix, str) and _OWN.fullmatch(prefix) else None


def valid_name(name: Any, prefix: str) -> bool:
    """Whether ``name`` is a segment name under ``prefix`` (and nothing else: no paths)."""
    return (isinstance(name, str) and name.startswith(prefix)
            and _TAIL.fullmatch(name, len(prefix)) is not None)


class Segment:
    """One buffer in shared memory, as it travels in place of a frame.

    ``digests`` are its chunk digests when this process wrote it (the MAC needs
    them); ``owned`` (the controller's segments) removes the file when the last
    reference to this object goes.
    """

    __slots__ = ("name", "nbytes", "digests", "owned", "_view")

    def __init__(self, name: str, nbytes: int, digests: bytes | None = None,
                 owned: bool = False) -> None:
        self.name = name
        self.nbytes = nbytes
        self.digests = digests
        self.owned = owned
        self._view: memoryview | None = None

    def __repr__(self) -> str:
        return f"<Segment {self.name} {self.nbytes} bytes>"

    def __len__(self) -> int:
        return self.nbytes

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise WireError(
                f"the payload in shared memory {self.path} is gone: its task record was "
                "dropped (store limit or purge_results) or the cluster stopped before it was read"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size != self.nbytes:
            os.close(fd)
            raise WireError(f"{self.path} is not the payload segment its message describes")
        return fd

    def view(self) -> memoryview:
        """The content, mapped copy-on-write: writable, and writes stay in this process."""
        if self._view is None:
            fd = self._open()
            try:
                try:
                    m: Any = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_PRIVATE,
                                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
                except OSError:  # out of mappings (vm.max_map_count) or address space
                    m = self._read(fd)
            finally:
                os.close(fd)
            self._view = memoryview(m)
        return self._view

    def _read(self, fd: int) -> bytearray:
        buf = bytearray(self.nbytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            n = f.readinto(buf)
        if n != self.nbytes:
            raise WireError(f"{self.path} was truncated")
        return buf

    def read(self) -> bytearray:
        """A copy of the content (for a peer that cannot map it, or the task database)."""
        fd = self._open()
        try:
            return self._read(fd)
        finally:
            os.close(fd)

    def pin(self) -> None:
        """Map now, so the content stays readable here even if the file goes; a gone
        segment is reported when the content is asked for."""
        try:
            self.view()
        except WireError:
            pass

    def __del__(self) -> None:
        if self.owned:
            try:
                os.unlink(self.path)
            except (OSError, TypeError, AttributeError):  # already gone / interpreter exit
                pass


def _write_all(fd: int, piece: memoryview, offset: int) -> None:
    while piece.nbytes:
        n = os.pwrite(fd, piece, offset)
        piece, offset = piece[n:], offset + n


class Placer:
    """The producer's side: moves large out-of-band buffers into new segments."""

    def __init__(self, prefix: str) -> None:
        self._prefix = f"{prefix}{secrets.token_hex(6)}-"
        self._count = itertools.count()

    def place(self, bufs: list[Any]) -> list[Any]:
        """``bufs`` with each memoryview larger than MIN_BYTES replaced by a Segment
        (kept inline if shared memory is full or refuses it)."""
        out = bufs
        for i, b in enumerate(bufs):
            if type(b) is memoryview and b.nbytes > MIN_BYTES:
                seg = self._write(b)
                if seg is not None:
                    if out is bufs:
                        out = list(bufs)
                    out[i] = seg
        return out

    def _write(self, view: memoryview) -> Segment | None:
        name = f"{self._prefix}{next(self._count)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        def write_and_digest(offset: int, piece: memoryview) -> bytes:
            _write_all(fd, piece, offset)
            return _SHA256(piece).digest()

        try:  # one pass per chunk, on every core
            digests = per_chunk(write_and_digest, view)
        except OSError:  # /dev/shm full (ENOSPC) or a quota: this one goes inline
            os.unlink(path)
            return None
        finally:
            os.close(fd)
        return Segment(name, view.nbytes, digests)


def inline(bufs: Sequence[Any]) -> list[Any]:
    """``bufs`` with segments read into bytes, for a peer that cannot map them."""
    return [b.read() if type(b) is Segment else b for b in bufs]


def sweep(prefix: str | None) -> None:
    """Remove every segment under ``prefix`` (a stopped controller's)."""
    if not prefix:
        return
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass


def sweep_stale() -> None:
    """Remove our segments whose controller process is gone (killed, so it could not)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    uid = os.geteuid()
    for name in names:
        m = _OWN.match(name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            if os.stat(path, follow_symlinks=False).st_uid == uid:
                os.unlink(path)
        except OSError:
            pass
