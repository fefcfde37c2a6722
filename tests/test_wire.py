"""The frame layout and its HMAC: forged, altered, replayed and malformed messages."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from ipylb import wire
from ipylb.serialize import dumps, loads


def pair(key: bytes = b"k" * 64):
    return wire.Signer(key, b"alice", b"bob"), wire.Signer(key, b"bob", b"alice")


def test_round_trip_with_buffers():
    a, b = pair()
    arr = np.arange(100_000, dtype="f8")
    frames = a.pack(wire.SUBMIT, ("m1", None), dumps(arr))
    kind, sender, meta, bufs, mac = b.unpack(frames)
    assert (kind, sender, meta) == (wire.SUBMIT, b"alice", ("m1", None))
    b.check_bufs(bufs, mac)
    out = loads(bufs)
    assert np.array_equal(out, arr) and out.flags.writeable


def test_large_arrays_travel_out_of_band():
    arr = np.ones(1 << 20, dtype="u1")
    frames = dumps(arr)
    assert len(frames) == 2 and len(frames[0]) < 1000  # pickle head + one raw buffer


def test_wrong_key_is_rejected():
    a, _ = pair(b"a" * 64)
    _, b = pair(b"b" * 64)
    with pytest.raises(wire.WireError, match="signature"):
        b.unpack(a.pack(wire.HELLO, None))


@pytest.mark.parametrize("which", [1, 2])
def test_altered_frames_are_rejected(which):
    a, b = pair()
    frames = a.pack(wire.SUBMIT, ("m", None), [b"payload-one", b"payload-two"])
    frames[which] = bytes(frames[which])[:-1] + b"X"
    with pytest.raises(wire.WireError):
        kind, s, meta, bufs, mac = b.unpack(frames)
        b.check_bufs(bufs, mac)


def test_altered_buffer_is_rejected():
    a, b = pair()
    frames = a.pack(wire.SUBMIT, ("m", None), [b"payload-one", b"payload-two"])
    frames[3] = b"payload-tw0"
    *_, bufs, mac = b.unpack(frames)
    with pytest.raises(wire.WireError, match="payload"):
        b.check_bufs(bufs, mac)


def test_frames_cannot_shift_between_buffers():
    a, b = pair()
    frames = a.pack(wire.SUBMIT, ("m", None), [b"ab", b"cd"])
    *_, bufs, mac = b.unpack(frames)
    with pytest.raises(wire.WireError):
        b.check_bufs([b"a", b"bcd"], mac)


def test_replay_is_rejected():
    a, b = pair()
    frames = a.pack(wire.HELLO, None)
    b.unpack(frames)
    with pytest.raises(wire.WireError, match="replayed"):
        b.unpack(frames)


@pytest.mark.parametrize(
    "frames",
    [[], [b"x"], [b"\0" * 32, b"garbage"], [b"short", b"head"], [b"\0" * 32, b"", b""]],
)
def test_malformed_messages_raise_wire_error(frames):
    _, b = pair()
    with pytest.raises(wire.WireError):
        b.unpack(frames)


def test_signed_but_unreadable_head_is_a_wire_error():
    key = b"k" * 64
    import hmac as _hmac

    head = b"not a pickle"
    sig = _hmac.digest(key, head, "sha256")
    with pytest.raises(wire.WireError, match="unreadable"):
        wire.Signer(key, b"b").unpack([sig, head])


def test_a_message_for_someone_else_is_refused():
    key = b"k" * 64
    a = wire.Signer(key, b"alice", b"bob")
    carol = wire.Signer(key, b"carol")
    with pytest.raises(wire.WireError, match="reached"):
        carol.unpack(a.pack(wire.HELLO, None))


def test_nothing_is_unpickled_before_the_signature_checks(monkeypatch):
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    _, b = pair()
    with pytest.raises(wire.WireError):
        b.unpack([b"\0" * 32, pickle.dumps((1, b"x", b"bob", 1, None, b""))])
    assert calls == []


def test_large_buffers_are_authenticated_chunk_by_chunk():
    a, b = pair()
    big = bytearray(3 * wire.CHUNK + 17)
    frames = a.pack(wire.SUBMIT, ("m", None), [big])
    *_, bufs, mac = b.unpack(frames)
    b.check_bufs(bufs, mac)
    big[2 * wire.CHUNK + 5] = 1  # one byte in the third chunk
    with pytest.raises(wire.WireError, match="payload"):
        b.check_bufs([big], mac)


def test_forgotten_senders_stay_refused(monkeypatch):
    """A receiver forgets senders gone for a while (their replay state would grow forever)
    and still refuses their old messages: a floor, the highest seq it forgot, which an
    unknown sender must exceed; seqs never run below the sender's clock in microseconds."""
    clock = [1_700_000_000 * 10**9]  # ns
    monkeypatch.setattr(wire, "_time_ns", lambda: clock[0])
    key = b"k" * 64
    rx = wire.Signer(key, b"rx")
    gone, back = wire.Signer(key, b"gone", b"rx"), wire.Signer(key, b"back", b"rx")
    old = [gone.pack(wire.REQUEST, i) for i in range(3)]
    for frames in old:
        rx.unpack(frames)
    rx.unpack(back.pack(wire.HELLO, None))
    clock[0] += 400 * 10**9  # 400 s later; "back" was silent too
    live = wire.Signer(key, b"live", b"rx")
    rx.unpack(live.pack(wire.HELLO, None))
    assert rx.senders == 3
    assert sorted(rx.forget_idle(300.0)) == [b"back", b"gone"]
    assert rx.senders == 1
    for frames in old:  # accepted once each: refused for good, though "gone" is forgotten
        with pytest.raises(wire.WireError, match="replayed"):
            rx.unpack(frames)
    assert rx.unpack(back.pack(wire.REQUEST, "again"))[2] == "again"  # its seq caught up
    assert rx.unpack(wire.Signer(key, b"new", b"rx").pack(wire.HELLO, 1))[2] == 1
    assert rx.forget_idle(300.0) == []


def test_oversized_counts_frames_not_segments():
    from ipylb.shm import Segment

    seg = Segment("ipylb-test-none", 1 << 20, (0, 0))
    assert wire.oversized([b"x" * 10, memoryview(b"y" * 20)], 15) == 20
    assert wire.oversized([b"x" * 10, seg], 15) == 0
