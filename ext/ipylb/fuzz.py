"""Bad traffic at a serving controller: ``ipylb soak --fuzz`` and the test suite use it.

A :class:`Fuzzer` connects DEALERs of its own to both of the controller's sockets (the
clients' and the engines') and sends, in a bounded loop, messages of six kinds:

- ``random``: 1-4 frames of random bytes;
- ``truncated``: a genuine message cut short (frames dropped, head or signature cut);
- ``unsigned``: a genuine head without its signature (empty, or missing);
- ``wrong_key``: a genuine head signed under another key;
- ``replayed``: a genuine message sent again (the first copy is sent as ``genuine``: a ping
  on the clients' socket, a result for no task on the engines');
- ``malformed``: signed under the cluster key with a fresh seq, but carrying what no peer
  sends: random kinds, heads and metas, submissions with random flags and task lists,
  registrations with ill-typed fields, requests with random arguments.

It holds the key, so it stays away from what a key holder may rightly do: it never asks the
controller to shut down, abort, interrupt, purge or add engines, and never registers a
well-formed engine.  Everything it sends must be dropped (or answered with an error) while
real tasks run on: that is what the caller checks.
"""

from __future__ import annotations

import hmac
import os
import pickle
import random
import threading
import time
from collections import Counter
from typing import Any

import zmq

from . import compat, wire

KINDS = ("random", "truncated", "unsigned", "wrong_key", "replayed", "malformed")
SOCKETS = ("client", "engine")
# Requests a key holder may send without changing what real clients get.
_HARMLESS_OPS = ("queue_status", "story", "engine_info", "get_result", "resubmit", "ping",
                 "validate", "stream", "no_such_op", "")
_ALL_KINDS = (wire.HELLO, wire.SUBMIT, wire.REQUEST, wire.BYE, wire.REGISTER, wire.DONE,
              wire.DONES, wire.WELCOME, wire.RESULT, wire.RESULTS, wire.TASK, wire.TASKS,
              wire.STOP, wire.HEALTH, wire.OUTPUT, wire.WATCH, 0, 99, -1)


class Fuzzer:
    """Sends ``per_kind`` messages of each kind to each of the controller's two sockets."""

    def __init__(self, info: dict[str, Any], per_kind: int = 500, seed: int = 0) -> None:
        """``info``: the cluster's connection file contents (urls, key, controller id)."""
        self.key = info["key"].encode()
        self.to = info["controller_id"].encode()
        self.urls = {"client": info["client_url"], "engine": info["engine_url"]}
        self.per_kind = per_kind
        self.rng = random.Random(seed)
        self.sent: Counter[str] = Counter()  # kind -> messages sent (both sockets)
        self.frames = 0  # zmq frames sent in all
        self.answers = 0  # messages the controller sent back (replies to pings and errors)
        self._genuine: dict[str, list[list[bytes]]] = {name: [] for name in SOCKETS}
        self._seq = time.time_ns() // 1000  # for heads built by hand (sender "fuzz-hand")

    def run(self, duration: float = 0.0, stop: threading.Event | None = None) -> Counter[str]:
        """Send everything, spread over about ``duration`` seconds (0: as fast as possible),
        until done or ``stop`` is set; returns the counts per kind."""
        ctx = zmq.Context.instance()
        socks, signers = {}, {}
        tag = os.urandom(4).hex()
        for name in SOCKETS:
            ident = f"fuzz-{tag}-{name}-r".encode()
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, ident)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self.urls[name])
            socks[name] = s
            signers[name] = wire.Signer(self.key, ident, self.to)
        pause = duration / max(1, self.per_kind)
        stop = stop or threading.Event()
        try:
            for _ in range(self.per_kind):
                for name in SOCKETS:
                    for kind in KINDS:
                        self._send(socks[name], name, signers[name], kind)
                    self._drain(socks[name])
                if stop.wait(pause) if pause else stop.is_set():
                    break
        finally:
            for s in socks.values():
                s.close(0)
        return self.sent

    # -- one message of each kind -----------------------------------------------------

    def _send(self, sock: zmq.Socket, name: str, signer: wire.Signer, kind: str) -> None:
        frames = getattr(self, f"_{kind}")(name, signer)
        sock.send_multipart(frames, copy=True)
        self.sent[kind] += 1
        self.frames += len(frames)

    def _drain(self, sock: zmq.Socket) -> None:
        while True:
            try:
                sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.answers += 1

    def _genuine_message(self, name: str, signer: wire.Signer) -> list[bytes]:
        """A message the controller accepts and acts on harmlessly (sent, and kept to replay)."""
        if name == "client":
            frames = signer.pack(wire.REQUEST, (-1, "ping", None))
        else:  # a result for a task that does not exist: authentic, then dropped
            frames = signer.pack(wire.DONE, (f"fuzz-{self.rng.random()}", "ok", 0.0, 0.0, "", "",
                                             None))
        frames = [bytes(f) for f in frames]
        self._genuine[name].append(frames)
        del self._genuine[name][:-64]
        return frames

    def _random(self, _name: str, _signer: wire.Signer) -> list[bytes]:
        rng = self.rng
        return [rng.randbytes(rng.choice((0, 1, 31, 32, 33, rng.randrange(2000))))
                for _ in range(rng.randint(1, 4))]

    def _truncated(self, name: str, signer: wire.Signer) -> list[bytes]:
        sig, head, *bufs = self._forged_source(name, signer)
        rng = self.rng
        how = rng.randrange(3)
        if how == 0:
            return [sig]  # the head (and buffers) missing
        if how == 1:
            return [sig, head[:rng.randrange(len(head))], *bufs]
        return [sig[:rng.randrange(32)], head, *bufs]

    def _unsigned(self, name: str, signer: wire.Signer) -> list[bytes]:
        sig, head, *bufs = self._forged_source(name, signer)
        return [b"", head, *bufs] if self.rng.random() < 0.5 else [head, *bufs]

    def _wrong_key(self, name: str, signer: wire.Signer) -> list[bytes]:
        _sig, head, *bufs = self._forged_source(name, signer)
        return [hmac.digest(os.urandom(32), head, "sha256"), head, *bufs]

    def _replayed(self, name: str, signer: wire.Signer) -> list[bytes]:
        pool = self._genuine[name]
        if not pool:  # nothing genuine sent yet: send one first (counted as genuine)
            frames = self._genuine_message(name, signer)
            return frames
        return self.rng.choice(pool)

    def _forged_source(self, name: str, signer: wire.Signer) -> list[bytes]:
        """A well-formed, signed message to mangle (never sent as it is: its seq is used up)."""
        return [bytes(f) for f in signer.pack(wire.REQUEST if name == "client" else wire.DONE,
                                              (1, "ping", None))]

    def _malformed(self, name: str, signer: wire.Signer) -> list[bytes]:
        rng = self.rng
        if rng.random() < 0.1:  # replenish the genuine pool now and then
            return self._genuine_message(name, signer)
        choice = rng.randrange(8)
        bufs = [rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(4))]
        if choice == 0:  # a head that is not the 7-tuple a head is
            return self._signed(_junk(rng, 3), bufs)
        if choice == 1:  # a random kind with a random meta
            return signer.pack(rng.choice(_ALL_KINDS), _junk(rng, 3), bufs)
        if choice == 2:  # a submission with random flags and task list
            flags = rng.choice((None, _junk(rng, 2), {k: _junk(rng, 1) for k in rng.sample(
                ("after", "follow", "timeout", "retries", "walltime", "label", "targets", "x"),
                rng.randrange(1, 4))}))
            tasks = rng.choice((_junk(rng, 2), [(f"fuzz-{rng.random()}", rng.randrange(-1, 5),
                                                 rng.randbytes(rng.choice((0, 32))))
                                                for _ in range(rng.randrange(3))]))
            fn = rng.choice(((1, b"k" * 32, b""), (rng.randrange(-1, 5), _junk(rng, 1), b""),
                             _junk(rng, 1)))
            tag = rng.choice(((None, "f"), _junk(rng, 1)))
            return signer.pack(wire.SUBMIT, rng.choice(((flags, fn, tasks, tag), (flags, tasks),
                                                        (flags,), flags)), bufs)
        if choice == 3:  # a request with random arguments, for harmless operations only
            meta = (rng.randrange(1 << 30), rng.choice(_HARMLESS_OPS), _junk(rng, 2))
            return signer.pack(wire.REQUEST, rng.choice((meta, meta[:2], _junk(rng, 1))))
        if choice == 4:  # a registration with at least one ill-typed field
            meta = {"connection_file": "x", "pid": 1, "hostname": "h", "tag": "t",
                    "heartbeat": "", "shm_domain": None, "versions": compat.versions()}
            for field in rng.sample(sorted(meta), rng.randint(1, 3)):
                meta[field] = rng.choice((1.5, [], {"a": 1}, b"x", -1 if field != "pid" else "1"))
            return signer.pack(wire.REGISTER, meta)
        if choice == 5:  # a result with a random meta
            return signer.pack(wire.DONE, (_junk(rng, 1), *_junk_list(rng, rng.randrange(8))), bufs)
        if choice == 6:  # segment lists that point anywhere
            self._seq += 1
            return self._signed((wire.SUBMIT, b"fuzz-hand", self.to, self._seq,
                                 (None, (1, b"k" * 32, b""), [(f"fuzz-{rng.random()}", 1, b"")],
                                  (None, "f")),
                                 b"",
                                 _junk(rng, 2)), [b"f", b""])
        # a genuine head addressed to someone else
        return wire.Signer(self.key, signer.sender, b"controller-elsewhere").pack(
            wire.REQUEST, (1, "ping", None))


    def _signed(self, head_value: Any, bufs: list[bytes]) -> list[bytes]:
        """A head of our making, signed under the cluster key."""
        head = pickle.dumps(head_value)
        return [hmac.digest(self.key, head, "sha256"), head, *bufs]


def _junk_list(rng: random.Random, n: int) -> list[Any]:
    return [_junk(rng, 1) for _ in range(n)]


def _junk(rng: random.Random, depth: int) -> Any:
    """A random plain Python value, nested up to ``depth``."""
    leaves = (None, True, 0, -1, 2**70, 1.5, float("nan"), float("inf"), "", "x" * 40, b"",
              b"\0" * 33, "ok", "error", "unmet")
    if depth <= 0 or rng.random() < 0.4:
        return rng.choice(leaves)
    n = rng.randrange(4)
    shape = rng.randrange(5)
    if shape == 0:
        return tuple(_junk(rng, depth - 1) for _ in range(n))
    if shape == 1:
        return [_junk(rng, depth - 1) for _ in range(n)]
    if shape == 2:
        return {rng.choice(("a", "engines", "heartbeat", 1, None)): _junk(rng, depth - 1)
                for _ in range(n)}
    if shape == 3:
        return frozenset(rng.choice(("a", "b", 1)) for _ in range(n))
    return rng.choice(leaves)
