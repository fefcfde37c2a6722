"""SHA-256 over large buffers, one CHUNK at a time, on every core.

hashlib releases the GIL while it hashes, so the chunks of an 8 MB array are
digested in parallel on a small thread pool.  The MAC (:mod:`ipylb.wire`) covers
the digests.  (Shared-memory segments are not hashed: they are authenticated by
identity, see :mod:`ipylb.shm`.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

CHUNK = 1 << 20
_SHA256 = hashlib.sha256
_pool: ThreadPoolExecutor | None = None


def per_chunk(fn: Callable[[int, memoryview], bytes], view: memoryview) -> bytes:
    """``fn(offset, piece)`` for each CHUNK-sized piece of ``view`` (bytes), in parallel,
    results joined in order; the first error is raised once every piece is done."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="ipylb-mac")
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    futures = [_pool.submit(fn, off, view[off:off + CHUNK]) for off in range(0, view.nbytes, CHUNK)]
    wait(futures)  # every chunk finished before anything is raised (fn may use a file)
    return b"".join(f.result() for f in futures)


def chunk_digests(view: memoryview) -> bytes:
    """SHA-256 of each CHUNK-sized piece of ``view``, concatenated."""
    return per_chunk(lambda _off, piece: _SHA256(piece).digest(), view)
