"""The one module that knows ipylb's frame layout and its HMAC.

Every message on ipylb's own sockets (client <-> controller <-> engine) is::

    [signature, head, *bufs]

``head`` is a pickle of ``(kind, sender, to, seq, meta, bufs_mac, segs)`` and
``signature`` is HMAC-SHA256(key, head).  ``bufs_mac`` is HMAC-SHA256 over the
length-prefixed ``bufs`` (empty when there are none), so every frame, pickled
buffers included, is authenticated under the cluster key.  ``segs`` names the
buffers that travel through shared memory instead of a frame (:mod:`ipylb.shm`)
by name, size, device and inode: it is their identity that enters ``bufs_mac``,
not their content, and a consumer maps a segment only if the file it opened is
that one (same-host segments are authenticated by identity; see
:mod:`ipylb.shm`).  Bytes that cross hosts always travel inline under a MAC
over their content (:meth:`Signer.inline`).

Why the buffers get a MAC of their own, carried inside the head: a relay (the
controller) checks the head of each message it acts on, and forwards the task's
buffers untouched with the producer's ``bufs_mac`` in its own signed head.  The
consumer (engine or client) checks the buffers against it before unpickling.  A
large inline payload is so hashed twice end to end (by its producer and its
consumer) instead of once per hop, and never copied.

A buffer larger than ``CHUNK`` enters the MAC as the SHA-256 digests of its
1 MiB chunks (:mod:`ipylb.digest`): HMAC over collision-resistant digests
authenticates the same bytes, and an 8 MB array is hashed on every core.

Replay: ``seq`` grows strictly for each ``sender``; a receiver drops a message
whose seq is not above the last one it accepted from that sender, and one not
addressed ``to`` it.  A sender's seq is also never below its clock in
microseconds, so a receiver can forget senders gone for a while
(:meth:`Signer.forget_idle`) and still refuse their old messages: it keeps one
floor, the highest seq it forgot, and a sender it does not know must be above
it.  (So hosts' clocks must agree within the time after which peers are forgotten.)  The controller's name carries a fresh nonce each run, so a
message recorded in one run is refused by the next (even one that reuses the key
to read stored results), and one meant for engine A is refused by engine B.
Nothing is unpickled before its signature checks out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import time
from collections.abc import Sequence
from typing import Any

import zmq

from .digest import CHUNK, chunk_digests
from .error import UnreadableMessage, WireError
from .shm import MIN_BYTES as SHM_MIN_BYTES
from .shm import Segment
from .shm import valid_name as shm_valid_name

# Message kinds. Client -> controller.
HELLO, SUBMIT, REQUEST, BYE = 1, 2, 3, 4
# Controller -> client (RESULTS: several results in one message, see batch).
WELCOME, RESULT, REPLY, EVENT, RESULTS = 11, 12, 13, 14, 15
# Controller -> engine (WATCH: to an engine's health socket, a client wants the live output
# of the task it runs).
REGISTERED, TASK, CANCEL, STOP, REFUSED, ABOUT, FUNCTION, WATCH = 21, 22, 23, 24, 25, 26, 27, 28
# Engine -> controller (STARTED: a task with a walltime began to run; PROBE: `ipylb engine
# join --url` asks, under the key, what it needs to join: the only kind sent to no name;
# HEALTH: an engine's CPU, memory and current task, from its own socket <engine ident>/health
# every second; OUTPUT: from the same socket, what a watched running task printed lately;
# LEAVING: a task left the engine unfit to serve (out of file descriptors, it asked the
# process to exit): restart me, for this reason).
REGISTER, DONE, STARTED, PROBE, HEALTH, OUTPUT, LEAVING = 31, 32, 33, 34, 35, 36, 37
# STEAL (hwm="auto"): give back a task queued, not started, to <engine ident>/steal
STEAL = 29
# STOLEN: the answer to a STEAL from <engine ident>/steal, (msg_id, cancelled)
STOLEN = 38
# Several in one message (see batch): TASKS, controller -> engine; DONES, engine -> controller.
TASKS, DONES = 30, 39

_SHA256 = hashlib.sha256
_DIGEST = 32
_LEN = 8
# A segment's length prefix in the MAC has this bit set (an inline frame's never
# does), so a segment's identity can never pass for a frame's bytes.
_SEGMENT_TAG = 1 << 63


_SNDMORE, _RCVMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.RCVMORE), int(zmq.NOBLOCK)
_time_ns = time.time_ns


def send(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    """Send a multipart message, zero-copy for large frames.

    pyzmq's send_multipart does enum arithmetic per frame; on the hot path (every
    task crosses eight socket ends) plain ints halve the Python cost of a send+recv.
    """
    last = len(frames) - 1
    put = sock.send
    for i, frame in enumerate(frames):
        put(frame, _SNDMORE if i < last else 0, copy=False)


def recv(sock: zmq.Socket) -> list[Any]:
    """Receive a waiting multipart message as zmq.Frames; zmq.Again if none waits."""
    get, more = sock.recv, sock.getsockopt
    frames = [get(_NOBLOCK, copy=False)]
    while more(_RCVMORE):
        frames.append(get(_NOBLOCK, copy=False))
    return frames


# A received frame smaller than this is copied out before it is kept for long (a task record):
# libzmq receives small messages into shared 8 KiB batch buffers, and a kept zmq.Frame pins
# its whole buffer.  Measured: a 20,000-task map of pow kept 11.4 KB of controller RSS per
# task record with the frames kept as received, 3.2 KB with them copied.
DETACH_BELOW = 64 << 10


def detach(frames: list[Any]) -> list[Any]:
    """``frames`` with each small zmq.Frame copied into bytes of its own (see DETACH_BELOW)."""
    return [bytes(f.buffer) if type(f) is zmq.Frame and len(f) < DETACH_BELOW else f
            for f in frames]


def oversized(frames: Sequence[Any], limit: int) -> int:
    """The size in bytes of the first of ``frames`` larger than ``limit`` (0: none).
    Shared-memory segments travel as empty frames and do not count."""
    for b in frames:
        t = type(b)
        n = len(b) if t is bytes else b.nbytes if t is memoryview else \
            0 if t is Segment else _nbytes(_view(b))
        if n > limit:
            return n
    return 0


def batch(items: Sequence[tuple[Any, Sequence[Any], bytes]]) -> tuple[list[tuple], list[Any]]:
    """``(meta, bufs)`` of one message that carries several: each item is ``(meta, bufs,
    bufs_mac)``; the batch's meta lists ``(meta, len(bufs), bufs_mac)`` per item, its bufs
    are the items' bufs in order.  The batch is one message, signed once; each item keeps
    its producer's MAC over its own buffers, checked by the consumer (:func:`unbatch`)."""
    metas: list[tuple] = []
    bufs: list[Any] = []
    for meta, item_bufs, mac in items:
        metas.append((meta, len(item_bufs), mac))
        bufs.extend(item_bufs)
    return metas, bufs


def unbatch(meta: Any, bufs: list[Any]) -> list[tuple[Any, list[Any], bytes]]:
    """The items of a message made by :func:`batch`, as ``(meta, bufs, bufs_mac)``;
    WireError if its meta does not describe exactly its buffers (a peer bug)."""
    if type(meta) is not list or not meta:
        raise WireError("a malformed batch: its meta is not a non-empty list")
    items = []
    pos, end = 0, len(bufs)
    for entry in meta:
        if type(entry) is not tuple or len(entry) != 3 or type(entry[1]) is not int \
                or not 0 <= entry[1] <= end - pos or type(entry[2]) is not bytes:
            raise WireError(f"a malformed batch entry ({entry!r:.80})")
        n = entry[1]
        items.append((entry[0], bufs[pos:pos + n], entry[2]))
        pos += n
    if pos != end:
        raise WireError(f"a batch with {end - pos} buffer(s) its entries do not account for")
    return items


def new_key() -> bytes:
    """A fresh random cluster key (32 bytes, hex-encoded so it fits in JSON)."""
    return os.urandom(32).hex().encode()


def _view(frame: Any) -> Any:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


def _nbytes(buf: Any) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


class Signer:
    """Signs and checks messages under one cluster key, for one sender."""

    def __init__(self, key: bytes, sender: bytes, peer: bytes = b"", shm_prefix: str | None = None,
                 owns_segments: bool = False, open_kinds: frozenset[int] = frozenset()) -> None:
        """Sign as ``sender``; ``peer`` is where messages go unless ``pack(to=...)`` says.

        ``open_kinds``: kinds accepted when addressed to no one (``to=b""``), from a peer
        that does not know our name yet (the controller's PROBE).

        ``shm_prefix``: the names of shared-memory segments this receiver accepts
        (None: none); ``owns_segments``: the received segments are ours to remove
        (the controller's)."""
        if not key:
            raise ValueError("ipylb needs a non-empty cluster key")
        self._key = key
        self._proto = hmac.new(key, digestmod=_SHA256)
        self.sender = sender
        self.peer = peer
        self.shm_prefix = shm_prefix
        self._owns_segments = owns_segments
        self._open_kinds = open_kinds
        self._seq = _time_ns() // 1000  # never below our clock in us (see forget_idle)
        self._last_seen: dict[bytes, int] = {}
        self._floor = 0  # the highest seq of a sender forgotten

    # -- producing -------------------------------------------------------------

    def bufs_mac(self, bufs: Sequence[Any]) -> bytes:
        """HMAC over the buffers, each prefixed by its length (so frames cannot shift)."""
        if not bufs:
            return b""
        h = self._proto.copy()
        for b in bufs:
            if type(b) is Segment:  # its identity, not its bytes (see the module docstring)
                dev, ino = b.ident
                h.update((b.nbytes | _SEGMENT_TAG).to_bytes(_LEN, "little"))
                h.update(dev.to_bytes(_LEN, "little") + ino.to_bytes(_LEN, "little"))
                continue
            v = _view(b)
            n = _nbytes(v)
            h.update(n.to_bytes(_LEN, "little"))
            h.update(v if n <= CHUNK else chunk_digests(memoryview(v)))
        return h.digest()

    def pack(
        self, kind: int, meta: Any, bufs: Sequence[Any] = (), bufs_mac: bytes | None = None,
        to: bytes | None = None,
    ) -> list[Any]:
        """Frames for one message to ``to`` (default: the peer); pass ``bufs_mac`` to
        forward another producer's buffers.  A Segment among ``bufs`` travels as its
        name, size, device and inode in the signed head, an empty frame in its place."""
        seq, now = self._seq + 1, _time_ns() // 1000
        self._seq = seq = seq if seq > now else now
        if bufs_mac is None:
            bufs_mac = self.bufs_mac(bufs)
        segs: tuple = ()
        for b in bufs:
            if type(b) is Segment:
                segs = tuple((i, b.name, b.nbytes, *b.ident)
                             for i, b in enumerate(bufs) if type(b) is Segment)
                bufs = [b"" if type(b) is Segment else b for b in bufs]
                break
        head = pickle.dumps((kind, self.sender, self.peer if to is None else to, seq, meta,
                             bufs_mac, segs), 5)
        return [hmac.digest(self._key, head, "sha256"), head, *bufs]

    # -- consuming -------------------------------------------------------------

    def unpack(self, frames: Sequence[Any]) -> tuple[int, bytes, Any, list[Any], bytes]:
        """Check a message's signature and freshness; return (kind, sender, meta, bufs, bufs_mac).

        The buffers are not checked here (see :meth:`check_bufs`): a relay forwards
        them untouched, the consumer checks them before it unpickles anything.
        """
        if len(frames) < 2:
            raise WireError(f"a message needs at least 2 frames, got {len(frames)}")
        sig, head = bytes(_view(frames[0])), _view(frames[1])
        if len(sig) != _DIGEST or not hmac.compare_digest(
            sig, hmac.digest(self._key, head, "sha256")
        ):
            raise WireError("bad or missing signature: message dropped (wrong cluster key?)")
        try:
            kind, sender, to, seq, meta, bufs_mac, segs = pickle.loads(head)
        except Exception as e:  # signed but malformed: a peer bug, not an attack
            raise UnreadableMessage(f"unreadable message head: {e!r}") from None
        if to != self.sender and not (to == b"" and kind in self._open_kinds):
            raise WireError(f"a message for {to!r} reached {self.sender!r}: replayed or misrouted")
        if seq <= self._last_seen.get(sender, self._floor):
            raise WireError(f"replayed or out-of-order message from {sender!r} (seq {seq})")
        self._last_seen[sender] = seq
        bufs = list(frames[2:])
        if segs:
            self._segments(bufs, segs)
        return kind, sender, meta, bufs, bufs_mac

    @property
    def senders(self) -> int:
        """How many senders' replay state is kept."""
        return len(self._last_seen)

    def knows(self, sender: bytes) -> bool:
        """Whether ``sender``'s replay state is kept (it was heard from, not forgotten)."""
        return sender in self._last_seen

    def forget_idle(self, idle_s: float) -> list[bytes]:
        """Forget the senders whose last message is older than ``idle_s`` seconds (by its
        seq, their clock); returns them.  Their old messages stay refused: each seq they
        sent is at most the floor, which a sender not known must exceed."""
        horizon = _time_ns() // 1000 - int(idle_s * 1e6)
        gone = [sender for sender, seq in self._last_seen.items() if seq < horizon]
        for sender in gone:
            self._floor = max(self._floor, self._last_seen.pop(sender))
        return gone

    def _segments(self, bufs: list[Any], segs: Any) -> None:
        """Put the segments a head describes in their places among ``bufs``."""
        prefix = self.shm_prefix
        if prefix is None:
            raise WireError("a message points to shared memory this process does not share")
        try:
            for i, name, nbytes, dev, ino in segs:
                if not (type(i) is int and 0 <= i < len(bufs) and type(nbytes) is int
                        and SHM_MIN_BYTES < nbytes < _SEGMENT_TAG and shm_valid_name(name, prefix)
                        and type(dev) is int and type(ino) is int
                        and 0 <= dev < 1 << 64 and 0 <= ino < 1 << 64):
                    raise ValueError
        except (TypeError, ValueError):
            raise WireError(f"malformed shared-memory segment list {segs!r}") from None
        # Only now: an owned Segment removes its file when dropped.
        for i, name, nbytes, dev, ino in segs:
            bufs[i] = Segment(name, nbytes, (dev, ino), owned=self._owns_segments)

    def check_bufs(self, bufs: Sequence[Any], bufs_mac: bytes) -> None:
        """Raise WireError unless ``bufs`` are exactly what their producer signed.

        Each segment is opened and mapped here: a file that is not the one its
        producer named (device, inode, owner, mode 0600, size) is refused."""
        self._check_mac(bufs, bufs_mac)
        for b in bufs:
            if type(b) is Segment:
                b.view()

    def _check_mac(self, bufs: Sequence[Any], bufs_mac: bytes) -> None:
        if not hmac.compare_digest(self.bufs_mac(bufs), bufs_mac):
            raise WireError("payload buffers fail authentication: altered or forged in transit")

    def inline(self, bufs: Sequence[Any], bufs_mac: bytes) -> tuple[Sequence[Any], bytes]:
        """``(bufs, bufs_mac)`` for a peer that cannot map segments (another host, no
        shared memory, the task database): each segment read into bytes, under a MAC
        over those bytes.

        The producer's MAC (over the segments' identities) is checked first and each
        read checks the file is the segment named, so nothing unauthenticated leaves
        with a fresh MAC.  Raises WireError for a segment gone or replaced, or buffers
        that fail authentication.  Without segments, returns its arguments as they are.
        """
        if not any(type(b) is Segment for b in bufs):
            return bufs, bufs_mac
        self._check_mac(bufs, bufs_mac)
        out = [b.read() if type(b) is Segment else b for b in bufs]
        return out, self.bufs_mac(out)
