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

import errno
import itertools
import mmap
import os
import re
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Callable
from functools import cache
from queue import SimpleQueue
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
# A producer keeps at most this many spare segments allocated ahead, of at most this many
# bytes in all, only while /dev/shm has SPARE_FREE times a spare's size free, and for at
# most SPARE_IDLE_S seconds each (see _Spares).
SPARE_COUNT = 2
SPARE_BYTES = 64 << 20
SPARE_FREE = 4
SPARE_IDLE_S = 10.0


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
            _remover.start()

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
                _remover.remove(self.path)
            except (TypeError, AttributeError):  # interpreter exit (the controller swept)
                pass


class _Remover:
    """Removes the files of the controller's dropped segments on a thread of its own.

    Why: removing a file frees its pages, ~0.9 ms per 8 MB here, and records are dropped
    (store budget) in the turn of the controller's main loop that delivers a result, before
    that turn's messages leave: measured on an 8 MB echo past the 1 GB budget, the
    controller's main thread spent 2.4 ms a round trip instead of 1.1.  ``remove`` is
    called from ``__del__``, so it only puts the path on a SimpleQueue (reentrant, safe
    there); the thread is started when the first owned segment is made, never in
    ``__del__``."""

    def __init__(self) -> None:
        self._queue: SimpleQueue[str | threading.Event] = SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread, once per process (again in a fork's child)."""
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="ipylb-shm-remover")
                    self._thread.start()

    def remove(self, path: str) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(path)
        else:  # a fork's child, or interpreter exit: here and now
            try:
                os.unlink(path)
            except OSError:
                pass

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if type(item) is str:
                try:
                    os.unlink(item)
                except OSError:  # already gone (a sweep, someone else)
                    pass
            else:
                item.set()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every file handed over so far is removed; False on timeout."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)


_remover = _Remover()


def settle_removals(timeout: float | None = None) -> bool:
    """Wait until the files of the segments dropped so far in this process are removed
    (the controller's records' are removed on a thread: see _Remover); False on timeout."""
    return _remover.settle(timeout)


def _write_all(fd: int, piece: memoryview, offset: int) -> None:
    while piece.nbytes:
        n = os.pwrite(fd, piece, offset)
        piece, offset = piece[n:], offset + n


class _Spares:
    """Files in SHM_DIR with their pages allocated ahead, for a producer's next buffers.

    Why: the kernel takes longer to allocate a fresh tmpfs file's pages than to copy a
    buffer into them (8 MB here: ~1.7 ms to allocate, ~1.0-1.3 ms to write into allocated
    pages, 2.5-3.8 ms to write a fresh file).  So after a producer wrote a buffer of n
    bytes, a thread readies a file of n bytes (``posix_fallocate``) while the producer
    waits for its answer or runs the next task, and the next buffer of that size is only
    copied in.  A spare is unnamed (``O_TMPFILE``) until used: it gets its segment name
    (``linkat`` of /proc/self/fd/N) only once its bytes are written, so consumers and the
    wire see exactly what a fresh segment gives them (a new inode, never written again),
    and a producer that dies holding spares leaves nothing in /dev/shm (the kernel frees an
    unnamed file with its last descriptor).  At most SPARE_COUNT spares and SPARE_BYTES per
    process, only while /dev/shm keeps SPARE_FREE times a spare's size free, and each for at
    most SPARE_IDLE_S: an idle producer gives the memory back.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        # (nbytes, fd, ident, made): ready, oldest first; sizes asked for; closing them.
        self._ready: list[tuple[int, int, tuple[int, int], float]] = []
        self._wanted: list[int] = []
        self._drop: list[tuple[int, int, tuple[int, int], float]] = []
        self._making = 0  # bytes of the spare being made now
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pid = os.getpid()  # a forked child must not write into its parent's spares
        self.works = True  # False once O_TMPFILE or the /proc link failed here

    def take(self, nbytes: int) -> int | None:
        """The descriptor of a ready spare of ``nbytes`` to twice that (the smallest),
        truncated to ``nbytes``; None if there is none.  (Cutting a spare frees its tail
        here, ~0.11 ms per MB, against ~0.2 ms per MB to allocate: a spare much larger than
        the buffer is left to the thread.)"""
        with self._cond:
            fit = [spare for spare in self._ready if nbytes <= spare[0] <= 2 * nbytes]
            if not fit or os.getpid() != self._pid:
                return None
            spare = min(fit)
            self._ready.remove(spare)
        n, fd, ident, _made = spare
        if not _ours(fd, ident):
            # Not our spare any more: a task closed the descriptor (os.closerange) and the
            # number may name another file now, which must not be written.  Leave it alone.
            return None
        try:
            if n != nbytes:
                os.ftruncate(fd, nbytes)
        except OSError:
            os.close(fd)
            return None
        return fd

    def want(self, sizes: list[int]) -> None:
        """Ready spares for buffers of these sizes, as far as SPARE_COUNT and SPARE_BYTES
        allow (the oldest ready ones make room: the latest sizes are the likeliest next)."""
        with self._cond:
            if self._closed or not self.works or os.getpid() != self._pid:
                return
            for nbytes in sizes:
                if nbytes > SPARE_BYTES:
                    continue
                while self._ready and (self._count() >= SPARE_COUNT
                                       or self._bytes() + nbytes > SPARE_BYTES):
                    self._drop.append(self._ready.pop(0))  # closed by the thread
                if self._count() >= SPARE_COUNT or self._bytes() + nbytes > SPARE_BYTES:
                    break
                self._wanted.append(nbytes)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ipylb-shm-spares",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _count(self) -> int:
        return len(self._ready) + len(self._wanted) + (self._making > 0)

    def _bytes(self) -> int:
        return sum(s[0] for s in self._ready) + sum(self._wanted) + self._making

    def _run(self) -> None:
        """The thread: make the spares asked for, close those dropped or idle too long."""
        cond = self._cond
        while True:
            with cond:
                now = time.monotonic()
                idle = [s for s in self._ready if now - s[3] > SPARE_IDLE_S]
                for s in idle:
                    self._ready.remove(s)
                if self._closed:
                    idle += self._ready
                    self._ready = []
                drop, self._drop = self._drop + idle, []
                nbytes = self._wanted.pop(0) if self._wanted and not self._closed else 0
                self._making = nbytes
                if not (drop or nbytes or self._closed):
                    oldest = min((s[3] for s in self._ready), default=None)
                    cond.wait(None if oldest is None else oldest + SPARE_IDLE_S - now + 0.01)
                    continue
            _close(drop)  # frees their pages: here, not on the producer's time
            made = self._make(nbytes) if nbytes else None
            with cond:
                self._making = 0
                closed = self._closed
                if made is not None and not closed:
                    self._ready.append(made)
                    made = None
                cond.notify_all()
            if closed:
                _close([made] if made is not None else [])
                return

    def _make(self, nbytes: int) -> tuple[int, int, tuple[int, int], float] | None:
        fd = -1
        try:
            st = os.statvfs(SHM_DIR)
            if st.f_bavail * st.f_frsize < SPARE_FREE * nbytes:  # keep /dev/shm for payloads
                return None
            fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)  # whatever the umask: consumers require exactly 0600
            os.posix_fallocate(fd, 0, nbytes)
            st = os.fstat(fd)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # no O_TMPFILE here
                self.works = False
            return None
        return nbytes, fd, (st.st_dev, st.st_ino), time.monotonic()

    def ready(self, timeout: float | None = None) -> list[int]:
        """The sizes of the spares ready, once those asked for are made (for tests)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._wanted and not self._making, timeout)
            return [s[0] for s in self._ready]

    def close(self) -> None:
        """Free every spare (those being made too, when they are)."""
        with self._cond:
            self._closed = True
            ready, self._ready = self._ready, []
            self._wanted.clear()
            self._cond.notify_all()
        _close(ready)


def _ours(fd: int, ident: tuple[int, int]) -> bool:
    """Whether descriptor ``fd`` is still the unnamed spare ``ident``."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident and not st.st_nlink


def _close(spares: list[tuple[int, int, tuple[int, int], float]]) -> None:
    """Close these spares' descriptors, those still ours (see _Spares.take)."""
    for _n, fd, ident, _made in spares:
        if _ours(fd, ident):
            os.close(fd)


class Placer:
    """The producer's side: moves large out-of-band buffers into new segments."""

    def __init__(self, prefix: str) -> None:
        # This producer's names: <prefix><12 hex>-<n> (see producer_of).
        self.prefix = f"{prefix}{secrets.token_hex(6)}-"
        self._count = itertools.count()
        self.spares = _Spares()
        # Spares are descriptors: close them when this placer goes (or at exit).
        weakref.finalize(self, self.spares.close)

    def place(self, bufs: list[Any]) -> list[Any]:
        """``bufs`` with each memoryview larger than MIN_BYTES replaced by a Segment
        (kept inline if shared memory is full or refuses it)."""
        out = bufs
        sizes = []
        for i, b in enumerate(bufs):
            if type(b) is memoryview and b.nbytes > MIN_BYTES:
                seg = self._write(b)
                if seg is not None:
                    if out is bufs:
                        out = list(bufs)
                    out[i] = seg
                    sizes.append(b.nbytes)
        if sizes:
            self.spares.want(sizes)
        return out

    def close(self) -> None:
        """Free the spares now (they are freed anyway when this placer is collected)."""
        self.spares.close()

    def _write(self, view: memoryview) -> Segment | None:
        flat = view.cast("B") if view.ndim != 1 or view.itemsize != 1 else view
        fd = self.spares.take(view.nbytes)
        if fd is not None:
            seg = self._fill(fd, flat)
            if seg is not None:
                return seg
        name = f"{self.prefix}{next(self._count)}"
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
            _write_all(fd, flat, 0)
        except BaseException as e:  # /dev/shm full (ENOSPC), a quota...: this one goes inline
            os.close(fd)
            os.unlink(path)
            if isinstance(e, OSError):
                return None
            raise
        os.close(fd)
        return Segment(name, view.nbytes, (st.st_dev, st.st_ino))

    def _fill(self, fd: int, flat: memoryview) -> Segment | None:
        """Write ``flat`` into a spare (descriptor ``fd``, consumed) and name it: a new
        segment; None if that failed (the caller writes a fresh one)."""
        name = f"{self.prefix}{next(self._count)}"
        try:
            _write_all(fd, flat, 0)
            st = os.fstat(fd)
            # Named only now, complete: linkat(AT_SYMLINK_FOLLOW) of the unnamed file, which
            # fails (EEXIST) rather than replace a file someone put under the name.
            os.link(f"/proc/self/fd/{fd}", os.path.join(SHM_DIR, name), src_dir_fd=fd,
                    follow_symlinks=True)  # a dir fd makes Python use linkat (ignored: absolute)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ENOENT, errno.EPERM, errno.EINVAL):
                self.spares.works = False  # no /proc, or it cannot link here: fresh files only
            return None
        finally:
            os.close(fd)
        return Segment(name, flat.nbytes, (st.st_dev, st.st_ino))


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


def valid_producer(producer: Any, prefix: str | None) -> bool:
    """Whether ``producer`` is a Placer's name prefix under the controller prefix ``prefix``
    (what an engine tells the controller when it registers)."""
    return (isinstance(producer, str) and prefix is not None and producer.startswith(prefix)
            and re.fullmatch(r"[0-9a-f]{12}-", producer[len(prefix):]) is not None)


def sweep_producer(producer: str) -> None:
    """Remove the segments a producer that is gone (a killed engine) wrote and nobody here
    owns: those it named but never sent.  Its segments the controller received are owned,
    and clients' links of them (``<name>-<16 hex>``) are not its names: both are kept."""
    tail = re.compile(r"[0-9]{1,20}")
    _remove(lambda name: name.startswith(producer) and name not in _owned
            and tail.fullmatch(name, len(producer)) is not None)


def sweep_stale() -> None:
    """Remove our segments whose controller process is gone (killed, so it could not).
    Only controllers of our pid namespace are judged: elsewhere a pid says nothing."""
    namespace = _pid_namespace()

    def stale(name: str) -> bool:
        m = _OWN.match(name)
        return m is not None and int(m.group(1)) == namespace and not pid_alive(int(m.group(2)))

    if namespace:
        _remove(stale)
