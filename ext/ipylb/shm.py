"""Large buffers between the processes of one machine, through shared memory.

Why: an 8 MB array sent by zmq crosses four TCP hops on a task's round trip
(client -> controller -> engine and back; ~3.7 ms each on this machine's
loopback) although the controller never looks at it.  Instead, a producer
(client or engine) writes a buffer larger than ``MIN_BYTES`` once into a file
in ``/dev/shm`` (a "segment") and sends only its name; consumers map it.

Ownership: the producer creates a segment, writes it and sends its name to the
controller, which from then on owns it: it keeps it exactly as long as the
task's record (retries, resubmit and ``get_result`` need it) and removes it with
the record.  A result goes to each client as a hard link of its own, which the
client maps and removes at once: the controller may drop the record meanwhile,
the client's data stays.  Consumers map segments copy-on-write, so an engine (or
a user) that changes an array in place changes its own copy of the pages, never
the record.  Leftovers are swept: segments a producer wrote but never sent (it
died) and links no client claimed, by the controller after a grace period; its
own at exit; those of controllers that are gone, by the next one to start.

Security: identity, not content.  A segment is created O_EXCL with mode 0600
in the sticky ``/dev/shm``: no other user can create, replace, rename or alter
it, and the one uid that can (its owner, or root) can read the cluster key
anyway.  So the signed head names the segment (name, size, device and inode),
and a consumer checks that the file it opens is that one (``fstat`` of the
opened descriptor: same device and inode, a regular file owned by its own uid,
mode 0600, the size) and maps it without hashing its bytes.  A file swapped in
under the name is refused; the owner changing bytes within the file is trusted,
like the owner changing the process.  Bytes that leave the machine are hashed:
the controller reads a segment into a frame, under a MAC over its bytes, for a
peer that cannot map it (:meth:`ipylb.wire.Signer.inline`).

Where it applies: only between processes that see the same ``/dev/shm`` as the
controller (same boot, same mount, same user: :func:`domain`).  Everyone else
gets the bytes inline; the controller reads a segment into a frame for a peer
on another machine.  ``IPYLB_SHM=off`` turns the path off for a process.
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from functools import cache
from typing import Any

from .connection import pid_alive
from .digest import CHUNK
from .error import WireError

SHM_DIR = "/dev/shm"
# Buffers larger than this travel through a segment (below it, zmq is as quick).  At least
# CHUNK: an inline frame this large enters the MAC as chunk digests, on every core.
MIN_BYTES = CHUNK
# ipylb-<pid namespace>-<controller pid>-<nonce>-, then <producer>-<n>[-<link n>]
_OWN = re.compile(r"ipylb-(\d+)-(\d+)-[0-9a-f]+-")
_TAIL = re.compile(r"[0-9a-f]{1,32}-[0-9]{1,20}(-[0-9a-f]{16})?")
# Names of the segments owned in this process (the controller's records'), never swept.
_owned: set[str] = set()


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


@cache
def _pid_namespace() -> int:
    """This process's pid namespace (0: unknown): a pid means something only within it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def controller_prefix(nonce: str) -> str:
    """The name prefix of every segment of one controller run (its pid and pid namespace
    let a later controller sweep what a killed one left)."""
    return f"ipylb-{_pid_namespace()}-{os.getpid()}-{nonce}-"


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

    ``ident`` is the file's (device, inode) as its producer created it: what the
    MAC covers and what :meth:`view` and :meth:`read` check the opened file
    against.  ``owned`` (the controller's segments) removes the file when the
    last reference to this object goes.
    """

    __slots__ = ("name", "nbytes", "ident", "owned", "_view")

    def __init__(self, name: str, nbytes: int, ident: tuple[int, int], owned: bool = False) -> None:
        self.name = name
        self.nbytes = nbytes
        self.ident = ident
        self.owned = owned
        self._view: memoryview | None = None
        if owned:
            _owned.add(name)

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
        except OSError as e:
            raise WireError(f"cannot open the payload in shared memory {self.path}: {e}") from None
        st = os.fstat(fd)
        if ((st.st_dev, st.st_ino) != self.ident or not stat.S_ISREG(st.st_mode)
                or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o600
                or st.st_size != self.nbytes):
            os.close(fd)
            raise WireError(f"{self.path} is not the payload segment its message describes "
                            "(another file under its name): refused")
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
        except OSError as e:
            raise WireError(f"cannot read the payload in shared memory {self.path}: {e}") from None
        finally:
            os.close(fd)

    def claim(self) -> None:
        """Map a link made for this process, then remove it: the data is ours alone now.
        A gone segment is reported when the content is asked for."""
        try:
            self.view()
        except WireError:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def link(self) -> Segment:
        """A hard link of this segment for one consumer, which claims (removes) it.  Its
        name is random: nobody can take it first."""
        name = f"{self.name}-{secrets.token_hex(8)}"
        try:
            os.link(self.path, os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            raise WireError(f"the payload in shared memory {self.path} is gone (removed by "
                            "someone else: systemd's RemoveIPC?)") from None
        except OSError as e:
            raise WireError(f"cannot link the payload in shared memory {self.path}: {e}") from None
        return Segment(name, self.nbytes, self.ident)  # a link is the same inode

    def __del__(self) -> None:
        if self.owned:
            try:
                _owned.discard(self.name)
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
            st = os.statvfs(SHM_DIR)
            if st.f_bavail * st.f_frsize < 2 * view.nbytes:  # nearly full: don't fill it up
                return None
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: consumers require exactly 0600
            st = os.fstat(fd)
            # One writer: tmpfs serializes writes to a file, so threads would only add overhead.
            _write_all(fd, view.cast("B") if view.ndim != 1 or view.itemsize != 1 else view, 0)
        except BaseException as e:  # /dev/shm full (ENOSPC), a quota...: this one goes inline
            os.close(fd)
            os.unlink(path)
            if isinstance(e, OSError):
                return None
            raise
        os.close(fd)
        return Segment(name, view.nbytes, (st.st_dev, st.st_ino))


def _remove(selected: Callable[[str], bool], older_than: float | None = None) -> None:
    """Remove our files in SHM_DIR whose name is ``selected`` (and, if given, whose
    ctime, set by writing or linking, is before ``older_than``)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    uid = os.geteuid()
    for name in names:
        if not selected(name):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            st = os.stat(path, follow_symlinks=False)
            if st.st_uid == uid and (older_than is None or st.st_ctime < older_than):
                os.unlink(path)
        except OSError:
            pass


def sweep(prefix: str | None) -> None:
    """Remove every segment under ``prefix`` (a stopped controller's)."""
    if prefix:
        _remove(lambda name: name.startswith(prefix))


def sweep_orphans(prefix: str | None, grace_s: float) -> None:
    """Remove segments under ``prefix`` that nobody here owns and that were written (or
    linked) more than ``grace_s`` ago: a producer died before sending one, or a client
    never claimed its link."""
    if prefix:
        _remove(lambda name: name.startswith(prefix) and name not in _owned,
                older_than=time.time() - grace_s)


def sweep_stale() -> None:
    """Remove our segments whose controller process is gone (killed, so it could not).
    Only controllers of our pid namespace are judged: elsewhere a pid says nothing."""
    namespace = _pid_namespace()

    def stale(name: str) -> bool:
        m = _OWN.match(name)
        return m is not None and int(m.group(1)) == namespace and not pid_alive(int(m.group(2)))

    if namespace:
        _remove(stale)
