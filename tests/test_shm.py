"""Large buffers through shared memory: the segments, their MAC, their lifetime.

The first half drives :mod:`ipylb.shm` and :mod:`ipylb.wire` directly (real files
in /dev/shm); the second runs big arrays through real clusters.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import ipylb
import numpy as np
import pytest
from ipylb import serialize, shm, wire
from ipylb.error import RemoteError, WireError

pytestmark = pytest.mark.skipif(shm.domain() is None, reason="no shared memory on this machine")

KEY = b"k" * 32
BIG = 3 * shm.MIN_BYTES + 12345  # several chunks and a partial one


def files(prefix: str) -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix)}


@pytest.fixture
def prefix():
    """A fresh controller-style prefix; whatever is left under it is removed afterwards."""
    p = shm.controller_prefix(os.urandom(8).hex())
    yield p
    shm.sweep(p)


def mmap_backed(arr: np.ndarray) -> bool:
    """Whether an array's memory is a mapping (a segment), following .base / .obj."""
    b = arr
    while b is not None and not isinstance(b, mmap.mmap):
        b = b.obj if isinstance(b, memoryview) else getattr(b, "base", None)
    return b is not None


def pair(prefix: str, owns: bool = False) -> tuple[wire.Signer, wire.Signer]:
    producer = wire.Signer(KEY, b"producer", b"consumer")
    consumer = wire.Signer(KEY, b"consumer", shm_prefix=prefix, owns_segments=owns)
    return producer, consumer


# -- segments and the wire -----------------------------------------------------


def test_placer_writes_a_private_segment_named_by_its_inode(prefix):
    data = np.random.default_rng(1).integers(0, 255, BIG, dtype="u1")
    head = b"pickle"
    out = shm.Placer(prefix).place([head, memoryview(data)])
    assert out[0] is head
    seg = out[1]
    assert isinstance(seg, shm.Segment) and seg.nbytes == BIG
    st = os.stat(seg.path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    with open(seg.path, "rb") as f:
        assert f.read() == data.tobytes()
    assert seg.ident == (st.st_dev, st.st_ino)


def test_small_and_in_band_buffers_stay_inline(prefix):
    small = memoryview(bytearray(shm.MIN_BYTES))  # not larger than the threshold
    big_bytes = bytes(BIG)  # the pickle itself (bytes) is never moved
    bufs = [big_bytes, small]
    assert shm.Placer(prefix).place(bufs) is bufs
    assert files(prefix) == set()


def test_a_segment_round_trips_under_the_mac_and_maps_copy_on_write(prefix):
    producer, consumer = pair(prefix)
    arr = np.arange(BIG // 8, dtype="f8")
    bufs = shm.Placer(prefix).place(serialize.dumps(arr))
    frames = producer.pack(wire.RESULT, "meta", bufs)
    assert sum(len(f) for f in frames) < 1000  # the array is not in the message
    _kind, _sender, meta, got, mac = consumer.unpack(frames)
    assert isinstance(got[1], shm.Segment) and meta == "meta"
    consumer.check_bufs(got, mac)
    out = serialize.loads(got)
    assert np.array_equal(out, arr) and mmap_backed(out) and out.flags.writeable
    out[:] = -1  # private pages: the segment (the controller's record) is unchanged
    with open(got[1].path, "rb") as f:
        assert np.array_equal(np.frombuffer(f.read(), "f8"), arr)


def received(prefix: str, data: bytes = bytes(BIG)) -> tuple[wire.Signer, list, bytes, shm.Segment]:
    """A segment written by a producer and unpacked (not yet checked) by a consumer."""
    producer, consumer = pair(prefix)
    bufs = shm.Placer(prefix).place([b"p", memoryview(bytearray(data))])
    _, _, _, got, mac = consumer.unpack(producer.pack(wire.RESULT, None, bufs))
    return consumer, got, mac, bufs[1]


def test_a_file_swapped_in_under_a_segments_name_is_refused(prefix):
    """Same name, same size, same owner, mode 0600, even the same bytes: another inode."""
    consumer, got, mac, seg = received(prefix)
    os.unlink(seg.path)
    fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, BIG)
    os.close(fd)
    with pytest.raises(WireError, match="not the payload segment its message describes"):
        consumer.check_bufs(got, mac)


def test_a_wider_mode_or_a_symlink_under_a_segments_name_is_refused(prefix):
    consumer, got, mac, seg = received(prefix)
    os.chmod(seg.path, 0o644)  # the right inode, but readable by others: not one of ours
    with pytest.raises(WireError, match="not the payload segment"):
        consumer.check_bufs(got, mac)
    consumer, got, mac, seg = received(prefix)
    target = f"{seg.path}-target"
    os.rename(seg.path, target)  # the very inode named, but reached through a symlink
    os.symlink(target, seg.path)
    try:
        with pytest.raises(WireError, match="cannot open"):  # O_NOFOLLOW
            consumer.check_bufs(got, mac)
    finally:
        os.unlink(target)


def test_a_segment_under_another_identity_fails_authentication(prefix):
    """The MAC covers device and inode: a relay cannot point a signed task at another file."""
    consumer, got, mac, _seg = received(prefix)
    other = shm.Placer(prefix).place([b"p", memoryview(bytearray(BIG))])[1]
    with pytest.raises(WireError, match="fail authentication"):
        consumer.check_bufs([got[0], other], mac)


def test_content_altered_within_the_segment_is_the_trusted_same_uid_case(prefix):
    """Same-host segments are authenticated by identity, not content (issue 14).  Only the
    segment's owner uid (or root) can write to it, and that uid can read the cluster key
    anyway: a write by it within the same inode is trusted, not hashed, and so arrives."""
    consumer, got, mac, seg = received(prefix)
    with open(seg.path, "r+b") as f:  # one byte in the last, partial chunk
        f.seek(BIG - 1)
        f.write(b"\x01")
    consumer.check_bufs(got, mac)
    assert got[1].view()[BIG - 1] == 1


def test_inline_reads_segments_under_a_mac_over_their_bytes(prefix):
    """The controller reads a segment into a frame for a peer on another machine (or the
    database): the peer checks a MAC over the bytes, so an altered frame is refused."""
    producer, consumer = pair(prefix)
    remote = wire.Signer(KEY, b"remote")  # no shared memory
    data = os.urandom(BIG)
    bufs = shm.Placer(prefix).place([b"p", memoryview(bytearray(data))])
    _, _, _, got, mac = consumer.unpack(producer.pack(wire.RESULT, None, bufs))
    inlined, inline_mac = consumer.inline(got, mac)
    assert inline_mac != mac and bytes(inlined[1]) == data
    _, _, _, frames, fmac = remote.unpack(consumer.pack(wire.RESULT, None, inlined, inline_mac,
                                                        to=b"remote"))
    remote.check_bufs(frames, fmac)
    assert bytes(frames[1]) == data
    frames[1] = bytes(frames[1][:-1]) + bytes([frames[1][-1] ^ 1])  # always a change
    with pytest.raises(WireError, match="fail authentication"):
        remote.check_bufs(frames, fmac)


def test_inline_refuses_what_its_producer_did_not_sign(prefix):
    """No fresh MAC for buffers that fail the producer's: inline checks before it signs."""
    consumer, got, mac, seg = received(prefix)
    with pytest.raises(WireError, match="fail authentication"):
        consumer.inline([b"forged", got[1]], mac)
    os.unlink(seg.path)
    with pytest.raises(WireError, match="is gone"):
        consumer.inline(got, mac)


@pytest.mark.parametrize("segs", [
    ((1, "../../etc/passwd", BIG, 1, 2),),
    ((1, "ipylb-1-ab-cd-1", BIG, 1, 2),),  # another controller's prefix
    ((5, None, BIG, 1, 2),),  # no such frame
    ((1, None, 10, 1, 2),),  # too small to be a segment
    ((1, None, BIG, -1, 2),),  # no such device
    ((1, None, BIG, 1, "2"),),  # an inode that is not a number
    ((1, None, BIG),),  # no identity
    "garbage",
])
def test_malformed_or_foreign_segment_lists_are_refused(prefix, segs):
    producer, consumer = pair(prefix)
    if isinstance(segs, tuple):  # None: a well-formed name under the consumer's prefix
        segs = tuple((e[0], e[1] or f"{prefix}ab-1", *e[2:]) for e in segs)
    frames = producer.pack(wire.RESULT, None, [b"p", b""])
    # Re-sign a head that describes the given segments (a buggy or malicious peer with the key).
    kind, sender, to, seq, meta, mac, _ = wire.pickle.loads(frames[1])
    head = wire.pickle.dumps((kind, sender, to, seq, meta, mac, segs))
    with pytest.raises(WireError, match="segment"):
        consumer.unpack([wire.hmac.digest(KEY, head, "sha256"), head, *frames[2:]])


def test_a_refused_segment_list_removes_nothing(prefix):
    """A list whose first entry names a real segment and whose second is malformed: the
    controller (which owns what it accepts) must not remove the first on the way out."""
    producer, owner = pair(prefix, owns=True)
    seg = shm.Placer(prefix).place([b"p", memoryview(bytearray(BIG))])[1]
    frames = producer.pack(wire.RESULT, None, [b"p", b"", b""])
    kind, sender, to, seq, meta, mac, _ = wire.pickle.loads(frames[1])
    head = wire.pickle.dumps((kind, sender, to, seq, meta, mac,
                              ((1, seg.name, BIG, *seg.ident), (2, "x", BIG, *seg.ident))))
    with pytest.raises(WireError, match="malformed"):
        owner.unpack([wire.hmac.digest(KEY, head, "sha256"), head, *frames[2:]])
    assert os.path.exists(seg.path)


def test_a_process_without_shared_memory_refuses_segments(prefix):
    producer = wire.Signer(KEY, b"producer", b"consumer")
    consumer = wire.Signer(KEY, b"consumer")  # shm_prefix None: another machine
    bufs = shm.Placer(prefix).place([b"p", memoryview(bytearray(BIG))])
    with pytest.raises(WireError, match="shared memory"):
        consumer.unpack(producer.pack(wire.RESULT, None, bufs))


def test_a_gone_segment_says_what_happened(prefix):
    seg = shm.Placer(prefix).place([b"p", memoryview(bytearray(BIG))])[1]
    os.unlink(seg.path)
    with pytest.raises(WireError, match="is gone: its task record was dropped"):
        seg.view()


def test_an_owned_segment_is_removed_with_its_last_reference(prefix):
    seg = shm.Placer(prefix).place([b"p", memoryview(bytearray(BIG))])[1]
    owned = [shm.Segment(seg.name, seg.nbytes, seg.ident, owned=True)]
    kept = owned[0]  # e.g. a resubmitted task's record shares the request's buffers
    del owned
    assert shm.settle_removals(30) and files(prefix) == {seg.name}
    del kept
    assert shm.settle_removals(30) and files(prefix) == set()  # on the remover's thread


def test_dropped_segments_are_removed_off_the_dropping_thread(prefix, monkeypatch):
    """The controller drops records (and their segments) in the turn of its loop that
    delivers a result: the files, whose removal frees their pages, go on another thread."""
    removed_by: list[str] = []
    unlink = os.unlink

    def spy(path, *args, **kwargs):
        if os.path.basename(path).startswith(prefix):
            removed_by.append(threading.current_thread().name)
        return unlink(path, *args, **kwargs)

    seg = shm.Placer(prefix).place([b"p", memoryview(bytearray(BIG))])[1]
    owned = shm.Segment(seg.name, seg.nbytes, seg.ident, owned=True)
    monkeypatch.setattr(shm.os, "unlink", spy)
    del owned
    assert shm.settle_removals(30) and files(prefix) == set()
    assert removed_by == ["ipylb-shm-remover"]


def test_out_of_mappings_reads_a_copy(prefix, monkeypatch):
    def no_more(*_args, **_kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    data = os.urandom(BIG)
    seg = shm.Placer(prefix).place([b"p", memoryview(data)])[1]
    monkeypatch.setattr(shm.mmap, "mmap", no_more)
    consumer = shm.Segment(seg.name, seg.nbytes, seg.ident)
    view = consumer.view()
    assert bytes(view) == data and not view.readonly


def test_full_shared_memory_falls_back_to_inline(prefix, monkeypatch):
    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm.os, "pwrite", full)
    data = memoryview(bytearray(BIG))
    out = shm.Placer(prefix).place([b"p", data])
    assert out[1] is data and files(prefix) == set()


def test_stale_segments_of_dead_controllers_are_swept(prefix):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ns = shm._pid_namespace()
    stale = os.path.join(shm.SHM_DIR, f"ipylb-{ns}-{dead}-abcdef-0123-1")
    # The same pid in another pid namespace (another container sharing /dev/shm): not ours to judge.
    foreign = os.path.join(shm.SHM_DIR, f"ipylb-{ns + 1}-{dead}-abcdef-0123-1")
    live = shm.Placer(prefix).place([b"p", memoryview(bytearray(BIG))])[1]
    for path in (stale, foreign):
        open(path, "wb").close()
    try:
        shm.sweep_stale()
        assert not os.path.exists(stale) and os.path.exists(foreign) and os.path.exists(live.path)
    finally:
        for path in (stale, foreign):
            if os.path.exists(path):
                os.unlink(path)


def test_orphans_are_swept_after_their_grace_but_owned_segments_never(prefix):
    placer = shm.Placer(prefix)
    orphan = placer.place([b"p", memoryview(bytearray(BIG))])[1]  # its producer "died"
    kept = placer.place([b"p", memoryview(bytearray(BIG))])[1]
    owned = shm.Segment(kept.name, kept.nbytes, kept.ident, owned=True)
    shm.sweep_orphans(prefix, grace_s=60)
    assert files(prefix) == {orphan.name, kept.name}  # young: maybe still in flight
    shm.sweep_orphans(prefix, grace_s=-1)
    assert files(prefix) == {kept.name}
    del owned
    assert shm.settle_removals(30) and files(prefix) == set()


def test_a_gone_producers_unsent_segments_are_swept_and_nothing_else(prefix):
    placer, other = shm.Placer(prefix), shm.Placer(prefix)
    assert shm.valid_producer(placer.prefix, prefix)
    for bad in (None, prefix, placer.prefix + "0", prefix + "../x-", "ipylb-1-2-ab-0123456789ab-"):
        assert not shm.valid_producer(bad, prefix)
    unsent = placer.place([b"p", memoryview(bytearray(BIG))])[1]
    sent = placer.place([b"p", memoryview(bytearray(BIG))])[1]
    owned = shm.Segment(sent.name, sent.nbytes, sent.ident, owned=True)  # the controller's
    link = owned.link()  # a client's, not claimed yet
    theirs = other.place([b"p", memoryview(bytearray(BIG))])[1]
    shm.sweep_producer(placer.prefix)
    assert files(prefix) == {sent.name, link.name, theirs.name}
    assert not os.path.exists(unsent.path)


def test_a_claimed_link_outlives_the_record(prefix):
    """The controller links a result for each client; the client maps and removes its link,
    so the controller dropping the record at once (budget, purge) loses nothing."""
    data = os.urandom(BIG)
    seg = shm.Placer(prefix).place([b"p", memoryview(data)])[1]
    owned = shm.Segment(seg.name, seg.nbytes, seg.ident, owned=True)
    link = owned.link()
    del owned  # the record is dropped before the client reads its message
    received = shm.Segment(link.name, link.nbytes, link.ident)
    received.claim()
    assert shm.settle_removals(30) and files(prefix) == set() and bytes(received.view()) == data


def spares(placer: shm.Placer) -> list[tuple[int, tuple[int, int]]]:
    """(size, identity) of the spares a placer holds ready, once it has readied them."""
    placer.spares.ready(60)
    return [(n, ident) for n, _fd, ident, _made in placer.spares._ready]


def test_a_spare_becomes_the_next_segment_and_never_touches_one_sent(prefix):
    """After writing a buffer, a producer readies an unnamed file of its size; the next
    buffer is written into it and only then named: a new segment (its own inode), while
    the segment sent before keeps its bytes (a consumer still maps it)."""
    placer = shm.Placer(prefix)
    first = os.urandom(BIG)
    seg1 = placer.place([b"p", memoryview(first)])[1]
    held = shm.Segment(seg1.name, seg1.nbytes, seg1.ident).view()
    [(size, ident)] = spares(placer)
    assert size == BIG and files(prefix) == {seg1.name}  # unnamed until used
    second = os.urandom(BIG)
    seg2 = placer.place([b"p", memoryview(second)])[1]
    assert seg2.ident == ident != seg1.ident and seg2.name != seg1.name
    assert bytes(shm.Segment(seg2.name, seg2.nbytes, seg2.ident).view()) == second
    assert bytes(held) == first and bytes(shm.Segment(seg1.name, BIG, seg1.ident).view()) == first
    assert os.stat(seg2.path).st_mode & 0o777 == 0o600 and files(prefix) == {seg1.name, seg2.name}
    placer.close()
    assert placer.spares._ready == []


def test_a_larger_spare_is_cut_to_the_buffer_and_passes_the_consumers_checks(prefix):
    producer, consumer = pair(prefix)
    placer = shm.Placer(prefix)
    placer.place([b"p", memoryview(bytearray(2 * BIG))])
    [(size, ident)] = spares(placer)
    small = placer.place([b"p", memoryview(bytearray(BIG // 2))])[1]  # over twice its size
    assert small.ident != ident and spares(placer)[0] == (size, ident)
    data = np.random.default_rng(3).integers(0, 255, BIG, dtype="u1")
    bufs = placer.place(serialize.dumps(data))
    assert bufs[1].ident == ident and bufs[1].nbytes == os.stat(bufs[1].path).st_size == BIG
    frames = producer.pack(wire.TASK, None, bufs)
    _k, _s, _m, got, mac = consumer.unpack(frames)
    consumer.check_bufs(got, mac)
    assert np.array_equal(serialize.loads(got), data)


def test_a_spare_descriptor_a_task_closed_and_reused_is_never_written(prefix, tmp_path):
    """A task may close descriptors it does not own (os.closerange) and open files that get
    their numbers: the placer then must not write (or close) that file."""
    placer = shm.Placer(prefix)
    placer.place([b"p", memoryview(bytearray(BIG))])
    spares(placer)
    fd = placer.spares._ready[0][1]
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.close(fd)
    other = os.open(victim, os.O_RDWR)
    try:
        if other != fd:
            os.dup2(other, fd)
        data = os.urandom(BIG)
        seg = placer.place([b"p", memoryview(data)])[1]
        assert bytes(shm.Segment(seg.name, BIG, seg.ident).view()) == data  # a fresh one
        assert victim.read_bytes() == b"keep me"
        os.fstat(fd)  # still open: not closed by the placer either
    finally:
        os.close(other)
        if other != fd:
            os.close(fd)


def test_spares_stay_within_their_count_bytes_and_free_space(prefix, monkeypatch):
    placer = shm.Placer(prefix)
    for _ in range(4):
        placer.place([b"p"] + [memoryview(bytearray(BIG))] * 3)
        assert len(spares(placer)) == shm.SPARE_COUNT
    placer.close()
    placer = shm.Placer(prefix)
    placer.spares.want([shm.SPARE_BYTES + 1])
    assert spares(placer) == []

    class Tight:  # /dev/shm with room for 3 spares of BIG bytes only
        f_frsize, f_bavail = 1, 3 * BIG

    monkeypatch.setattr(shm.os, "statvfs", lambda _path: Tight)
    placer.spares.want([BIG])
    assert spares(placer) == []  # a spare would leave too little room for payloads


def test_an_idle_spare_is_given_back(prefix, monkeypatch):
    monkeypatch.setattr(shm, "SPARE_IDLE_S", 0.2)
    placer = shm.Placer(prefix)
    placer.place([b"p", memoryview(bytearray(BIG))])
    [(_n, ident)] = spares(placer)
    fd = placer.spares._ready[0][1]
    spares_ = placer.spares
    with spares_._cond:
        assert spares_._cond.wait_for(lambda: not spares_._ready, 30)
    assert not shm._ours(fd, ident)  # closed: its pages are free


def test_ipylb_shm_off_turns_the_path_off(monkeypatch):
    info = {"shm_domain": shm.domain(), "shm_prefix": shm.controller_prefix("ab12")}
    assert shm.shared_prefix(info) == info["shm_prefix"]
    assert shm.shared_prefix({**info, "shm_domain": "another machine"}) is None
    monkeypatch.setenv("IPYLB_SHM", "off")
    shm.domain.cache_clear()
    try:
        assert shm.domain() is None and shm.shared_prefix(info) is None
    finally:
        monkeypatch.delenv("IPYLB_SHM")
        shm.domain.cache_clear()


# -- on real clusters ----------------------------------------------------------


def where_is(x: np.ndarray) -> tuple[bool, bool]:
    """On the engine: (is the argument a mapped segment, is it writable)."""
    b = x
    while b is not None and type(b).__name__ != "mmap":
        b = b.obj if isinstance(b, memoryview) else getattr(b, "base", None)
    return b is not None, x.flags.writeable


def test_big_arrays_travel_through_shared_memory_both_ways(rc, view):
    arr = np.arange(BIG, dtype="u1")
    assert view.apply_sync(where_is, arr) == (True, True)
    out = view.apply_sync(lambda x: x, arr)
    assert np.array_equal(out, arr) and mmap_backed(out) and out.flags.writeable
    small = np.arange(1000)
    assert view.apply_sync(where_is, small)[0] is False


def test_big_bytes_arguments_and_results_go_out_of_band(rc, view):
    """pickle keeps bytes in its stream; ipylb sends large ones (arguments and results at
    top level) as buffers of their own, so they too take the shared-memory path."""
    data = os.urandom(BIG)
    frames = serialize.dumps_args((data,), {"extra": bytearray(data)})
    assert [len(f) if isinstance(f, bytes) else f.nbytes for f in frames[1:]] == [BIG, BIG]
    assert view.apply_sync(lambda b, extra: (type(b), type(extra), b == extra), data,
                           extra=bytearray(data)) == (bytes, bytearray, True)
    out = view.apply_sync(lambda b: b[::-1], data)
    assert type(out) is bytes and out == data[::-1]


def bump(x: np.ndarray) -> float:
    x += 1  # in place, on the engine's private copy of the pages
    return float(x.sum())


def test_changing_an_argument_in_place_leaves_the_record_intact(rc, view):
    arr = np.zeros(BIG // 8)
    ar = view.apply_async(bump, arr)
    assert ar.get(30) == arr.size
    assert rc.resubmit(ar).get(30) == [arr.size]  # the stored argument is still zeros
    assert not arr.any()


def engine_spares() -> list[int]:
    """On the engine: the sizes of the spares its placer holds ready (after settling)."""
    import gc

    from ipylb import shm as engine_shm

    [placer] = [o for o in gc.get_objects() if type(o) is engine_shm.Placer]
    return placer.spares.ready(60)


def test_echoes_through_spares_keep_every_value_the_client_holds():
    """Round trips of distinct big arrays, each result kept: client and engine write later
    buffers into spares readied meanwhile, and no result (a mapping of a segment) ever
    changes.  Nothing is left in /dev/shm afterwards."""
    rng = np.random.default_rng(5)
    with ipylb.Client(engines=1) as rc:
        prefix = rc.cluster_info["shm_prefix"]
        view = rc.load_balanced_view()
        sent, got = [], []
        for _ in range(6):
            arr = rng.integers(0, 255, BIG, dtype="u1")
            sent.append(arr.copy())
            got.append(view.apply_sync(lambda x: x, arr))
            arr[:] = 0  # the client's own array changes after sending: the record's must not
            assert mmap_backed(got[-1])
        # Both sides hold spares of that size (a second one if a write came before the
        # first was ready: the machine is loaded), which their later writes used.
        assert set(view.apply_sync(engine_spares)) == {BIG}
        assert {n for n, _ident in spares(rc._placer)} == {BIG}
        for a, b in zip(sent, got, strict=True):
            assert np.array_equal(a, b)
        assert np.array_equal(rc.resubmit(rc.history[0]).get(30)[0], sent[0])
    assert files(prefix) == set() and rc._placer.spares._ready == []  # closed with the client


def shm_files_open() -> list[str]:
    """On the engine: where its descriptors into /dev/shm point (an unnamed file reads
    '/dev/shm/#<inode> (deleted)')."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(shm.SHM_DIR + "/"):
            out.append(target)
    return out


def test_a_killed_engine_leaves_no_spare_and_its_results_stay_with_the_records():
    """An engine holds its spare as an unnamed file: SIGKILL frees it with the process,
    nothing of it can be left in /dev/shm; what it sent stays the controller's (its
    results are still read), and nothing is left once the cluster stops."""
    arr = np.arange(BIG, dtype="u1")
    with ipylb.Client(engines=1) as rc:
        prefix = rc.cluster_info["shm_prefix"]
        view = rc.load_balanced_view()
        ars = [view.apply_async(lambda x: x, arr) for _ in range(2)]
        for ar in ars:
            ar.get(60)
        assert set(view.apply_sync(engine_spares)) == {BIG}
        held = view.apply_sync(shm_files_open)
        assert held and all(t.endswith("(deleted)") for t in held), held  # spares, unnamed
        before = files(prefix)
        assert len(before) == 4  # 2 arguments, 2 results: the records'
        os.kill(rc.engine_info()[rc.ids[0]]["pid"], signal.SIGKILL)
        assert files(prefix) == before
        assert all(np.array_equal(rc.get_result(ar.msg_ids[0]).get(30), arr) for ar in ars)
    assert files(prefix) == set()


def place_unsent() -> str:
    """On the engine: write a segment through the engine's own placer and send it nowhere
    (as an engine killed between writing a result and sending it would leave it)."""
    import gc

    from ipylb import shm as engine_shm

    [placer] = [o for o in gc.get_objects() if type(o) is engine_shm.Placer]
    return placer.place([b"", memoryview(bytearray(3 << 20))])[1].name


def test_a_killed_engines_unsent_segments_are_swept_when_it_is_found_gone():
    """Not after the 5-minute orphan grace: as soon as the controller finds the engine gone.
    What it sent (the records' segments) stays."""
    arr = np.arange(BIG, dtype="u1")
    with ipylb.Client(engines=1) as rc:
        prefix = rc.cluster_info["shm_prefix"]
        view = rc.load_balanced_view()
        ar = view.apply_async(lambda x: x, arr)
        ar.get(60)
        unsent = view.apply_sync(place_unsent)
        victim = rc.ids[0]
        assert unsent.startswith(rc.engine_info()[victim]["shm_producer"])
        kept = files(prefix) - {unsent}
        assert len(kept) == 2 and unsent in files(prefix)
        os.kill(rc.engine_info()[victim]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in rc.ids:  # remote state, polled: no event says the controller noticed
            assert time.monotonic() < deadline, "the killed engine was never found gone"
            time.sleep(0.05)
        assert files(prefix) == kept
        assert np.array_equal(rc.get_result(ar.msg_ids[0]).get(30), arr)
    assert files(prefix) == set()


def test_purge_and_shutdown_remove_the_segments():
    with ipylb.Client(engines=1) as rc:
        prefix = rc.cluster_info["shm_prefix"]
        view = rc.load_balanced_view()
        ar = view.apply_async(lambda x: x, np.ones(BIG, "u1"))
        out = ar.get(30)
        assert len(files(prefix)) == 2  # the argument and the result, kept for the record
        rc.purge_results(ar)
        assert files(prefix) == set()
        assert out.sum() == BIG  # the result received earlier is still mapped here
        view.apply_sync(lambda x: x, np.ones(BIG, "u1"))
        assert len(files(prefix)) == 2
    assert files(prefix) == set()


def test_a_client_without_shared_memory_gets_the_bytes_inline(rc, view, tmp_path):
    """A client on 'another machine' (IPYLB_SHM=off) shares the cluster: the controller
    reads segments into frames for it, and its own big arguments travel inline."""
    ar = view.apply_async(lambda: np.full(BIG, 7, "u1"))  # produced through shared memory
    ar.get(30)
    cluster_file = rc._local.connection_file
    script = textwrap.dedent(f"""
        import numpy as np, ipylb
        rc = ipylb.Client({str(cluster_file)!r})
        out = rc.get_result({ar.msg_ids[0]!r}).get(30)
        assert out.shape == ({BIG},) and (out == 7).all()
        arr = np.arange({BIG}, dtype="u1")
        assert (rc.load_balanced_view().apply_sync(lambda x: x + 1, arr) == arr + 1).all()
        print("ok", out.base is not None and type(out.base).__name__)
        rc.close()
    """)
    env = {**os.environ, "IPYLB_SHM": "off"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok") and "mmap" not in done.stdout


@contextlib.contextmanager
def after_placing(rc, act):
    """While inside: ``act(segment)`` on every segment the client writes, right after it is
    written and before the controller passes it on."""
    place = rc._placer.place

    def place_then_act(bufs):
        out = place(bufs)
        for b in out:
            if isinstance(b, shm.Segment):
                act(b)
        return out

    rc._placer.place = place_then_act
    try:
        yield
    finally:
        del rc._placer.place


def lose(seg: shm.Segment) -> None:
    """As systemd's RemoveIPC would."""
    os.unlink(seg.path)


def swap(seg: shm.Segment) -> None:
    """Another file of ours under the segment's name: same size, owner and mode, zeros."""
    os.unlink(seg.path)
    fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, seg.nbytes)
    os.close(fd)


@pytest.mark.parametrize("act,error", [
    (lose, "is gone"),  # e.g. systemd's RemoveIPC empties /dev/shm of a user who logged out
    # The engine maps only the inode the signed head names: another file there fails the task.
    (swap, "not the payload segment its message describes"),
])
def test_a_task_whose_segment_vanished_or_was_swapped_fails_clearly_unrun(rc, view, act, error):
    arr = np.ones(BIG, "u1")
    with after_placing(rc, act):
        ar = view.apply_async(lambda x: int(x.sum()), arr)
    with pytest.raises(RemoteError, match=error):
        ar.get(30)
    assert view.apply_sync(lambda x: int(x.sum()), arr) == BIG  # the engine serves on


def start_controller(tmp_path, *args: str) -> tuple[subprocess.Popen, str]:
    path = str(tmp_path / "ipylb-shm.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipylb.controller", "--connection-file", path,
         "--parent-pid", str(os.getpid()), *args],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc, path


def test_results_survive_their_records_being_dropped_before_they_are_read(tmp_path):
    """A 20 MB record budget, 8 MB results, and a client whose receiving thread lags
    (the user's thread holds the GIL): every record is evicted soon after it is sent."""
    import random

    proc, path = start_controller(tmp_path, "--engines", "2", "--store-limit-mb", "20")
    rc = ipylb.Client(path)
    try:
        rc.wait_for_engines(2, 60)
        ar = rc.load_balanced_view().map_async(lambda i: np.full(1 << 20, float(i)), range(12))
        sorted(random.random() for _ in range(2_000_000))  # ~1 s without releasing the GIL
        out = ar.get(60)
        assert [float(a[0]) for a in out] == [float(i) for i in range(12)]
        assert all(a.sum() == i * (1 << 20) for i, a in enumerate(out))
    finally:
        rc.stop_cluster()
        rc.close()
        proc.wait(30)
    assert files(rc.cluster_info["shm_prefix"]) == set()


def test_an_engine_on_another_machine_gets_bytes_inline(tmp_path):
    """An engine that does not share /dev/shm (IPYLB_SHM=off stands in for another host):
    the controller reads segments into frames for it; one whose segment vanished fails
    its task and the engine serves on."""
    from ipylb.connection import KERNEL_NAME
    from jupyter_client import KernelManager

    proc, path = start_controller(tmp_path)
    km = KernelManager(kernel_name=KERNEL_NAME)
    km.start_kernel(env={**os.environ, "IPYLB_CLUSTER_FILE": path, "IPYLB_SHM": "off",
                         "PYTHONPATH": os.path.dirname(__file__)})  # where_is imports from here
    rc = ipylb.Client(path)
    try:
        rc.wait_for_engines(1, 60)
        view = rc.load_balanced_view()
        arr = np.arange(BIG, dtype="u1")
        assert view.apply_sync(where_is, arr) == (False, True)  # arrived as a frame, writable
        assert np.array_equal(view.apply_sync(lambda x: x, arr), arr)
        with after_placing(rc, lose):
            lost = view.apply_async(lambda x: x, arr)
        with pytest.raises(RemoteError, match="is gone"):
            lost.get(30)
        assert view.apply_sync(lambda: 42) == 42
    finally:
        rc.stop_cluster()
        rc.close()
        proc.wait(30)
        km.shutdown_kernel(now=True)
