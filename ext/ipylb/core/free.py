"""The engines with a free slot, indexed so that every scheme picks in O(log engines).

The scheduler's plain placement used to list every engine with a free slot and
hand their loads, in least-recently-assigned order, to the scheme
(:mod:`ipylb.core.schemes`): O(engines) per task.  This index gives the same
choice, by the same rules, without the list:

* ``lru``: the free engine assigned longest ago: the smallest LRU key, from a heap.
* ``leastload``: the fewest outstanding tasks, ties to the least recently used:
  the smallest (load, LRU key), from a heap.
* ``plainrandom``: any free engine, uniformly: a list of the free engines (each
  knows its position; removal swaps the last one in).
* ``twobin``: two distinct free engines drawn uniformly, then the less recently
  used of the two.
* ``weighted``: two draws with weights 1/(load+1), then the less loaded of the
  two, ties to the less recently used: the free list plus a Fenwick tree of the
  weights (integers, ``_W // (load + 1)``, so sums never drift).

The random schemes draw from the scheduler's seeded ``random.Random`` as before,
so runs stay reproducible from a seed; the distribution of choices is the one
:mod:`ipylb.core.schemes` defines, though for a given seed the engine drawn may
differ from what the list-based version drew.

LRU keys: an engine's ``key`` grows with each assignment (``Scheduler`` stamps
it); an engine never assigned has a key below every assigned one, in
registration order (API.md: a new engine counts as least recently used).  Heap
entries are never removed in place: an entry whose engine's load or key has
changed since, or that is no longer free or registered, is stale and dropped
when it reaches the top; the heap is rebuilt from the live engines when stale
entries outnumber them, so its size stays O(engines).

Engines are the scheduler's ``_Engine`` records; this module reads their
``alive``, ``load``, ``key`` and ``held`` (hwm="auto": not free while held, see
:mod:`.pipeline`) and owns their ``pos`` (index in the free list, -1
when not listed).  Pure: no I/O, no clock.
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Any

from .schemes import _two

# Weight of an idle engine in the weighted scheme's integer Fenwick tree.
_W = 1 << 50


class FreeEngines:
    """Engines with a free slot (``load < cap``), for one scheme.

    Call :meth:`update` after anything that changes an engine's load, its key, or
    whether it is registered; :meth:`pick` returns the scheme's choice or None.
    """

    def __init__(self, scheme: str, cap: int, adaptive: bool = False) -> None:
        """``cap``: the hwm; ``adaptive``: it will change (hwm="auto": set ``cap``, then
        :meth:`update` every engine)."""
        self.cap = cap
        # At a fixed hwm=1 every free load is 0: order by key alone.
        self._by_load = scheme == "leastload" and (cap > 1 or adaptive)
        self._heap: list[tuple[Any, ...]] | None = None
        self._list: list[Any] | None = None
        self._tree: list[int] | None = None
        self._live = 0  # registered engines
        self._tie = itertools.count()  # heap entries never compare engines
        if scheme in ("lru", "leastload"):
            self._heap = []
            self.pick = self._pick_min  # type: ignore[method-assign]
        elif scheme in ("plainrandom", "twobin", "weighted"):
            self._list = []
            if scheme == "weighted":
                self._tree = [0]
            self.pick = {"plainrandom": self._pick_random, "twobin": self._pick_twobin,
                         "weighted": self._pick_weighted}[scheme]  # type: ignore[method-assign]
        else:
            raise ValueError(f"no free-engine index for scheme {scheme!r}")

    def pick(self, rng: random.Random) -> Any:  # replaced per scheme in __init__
        """The free engine the scheme chooses (drawing from ``rng`` if it draws), or None."""
        raise NotImplementedError

    # -- keeping the index up to date ------------------------------------------

    def update(self, e: Any) -> None:
        """Engine ``e``'s load, key or registration changed: index it again."""
        free = e.alive and e.load < self.cap and not e.held
        if self._heap is not None:
            if free:
                h = self._heap
                heapq.heappush(h, self._entry(e))
                if len(h) > 2 * self._live + 64:
                    self._rebuild_heap()
            return
        lst = self._list
        if free:
            if e.pos < 0:
                e.pos = len(lst)  # type: ignore[arg-type]
                lst.append(e)  # type: ignore[union-attr]
                if self._tree is not None:
                    self._grow(e)
                    return
            if self._tree is not None:
                self._set_weight(e.pos, _W // (e.load + 1))
        elif e.pos >= 0:
            self._unlist(e)

    def registered(self, e: Any) -> None:
        """A new engine (load 0): index it."""
        e.pos = -1
        self._live += 1
        self.update(e)

    def unregistered(self, e: Any) -> None:
        """Engine ``e`` is gone (its ``alive`` is False): drop it."""
        self._live -= 1
        if self._list is not None and e.pos >= 0:
            self._unlist(e)

    # -- heap schemes: lru, leastload -------------------------------------------

    def _entry(self, e: Any) -> tuple[Any, ...]:
        """(load, key, tie, e) for leastload, (key, key, tie, e) otherwise."""
        return (e.load if self._by_load else e.key, e.key, next(self._tie), e)

    def _pick_min(self, rng: random.Random) -> Any:
        h = self._heap
        cap = self.cap
        by_load = self._by_load
        while h:
            first, key, _, e = h[0]
            if (e.alive and e.load < cap and e.key == key and not e.held
                    and (not by_load or e.load == first)):
                return e
            heapq.heappop(h)
        return None

    def _rebuild_heap(self) -> None:
        """Drop the stale entries: one per free engine, the current one."""
        cap, seen = self.cap, set()
        fresh = []
        for entry in self._heap:  # type: ignore[union-attr]
            e = entry[-1]
            if e.alive and e.load < cap and not e.held and id(e) not in seen:
                seen.add(id(e))
                fresh.append(self._entry(e))
        heapq.heapify(fresh)
        self._heap = fresh

    # -- list schemes: plainrandom, twobin, weighted ----------------------------

    def _unlist(self, e: Any) -> None:
        lst = self._list
        i = e.pos
        last = lst.pop()  # type: ignore[union-attr]
        if last is not e:
            lst[i] = last  # type: ignore[index]
            last.pos = i
            if self._tree is not None:
                self._set_weight(i, _W // (last.load + 1))
        e.pos = -1
        if self._tree is not None:
            self._set_weight(len(lst), 0)  # type: ignore[arg-type]

    def _pick_random(self, rng: random.Random) -> Any:
        lst = self._list
        if not lst:
            return None
        return lst[rng.randrange(len(lst))]

    def _pick_twobin(self, rng: random.Random) -> Any:
        lst = self._list
        n = len(lst)  # type: ignore[arg-type]
        if n < 2:
            return lst[0] if lst else None  # type: ignore[index]
        a, b = _two(n, rng)  # the scheme's own two distinct draws
        ea, eb = lst[a], lst[b]  # type: ignore[index]
        return ea if ea.key < eb.key else eb

    def _pick_weighted(self, rng: random.Random) -> Any:
        lst = self._list
        n = len(lst)  # type: ignore[arg-type]
        if n < 2:
            return lst[0] if lst else None  # type: ignore[index]
        total = self._prefix(n)
        a = lst[self._find(rng.randrange(total))]  # type: ignore[index]
        b = lst[self._find(rng.randrange(total))]  # type: ignore[index]
        if a.load != b.load:
            return a if a.load < b.load else b
        return a if a.key <= b.key else b

    # Fenwick tree over free-list positions (1-based inside, 0-based outside).

    def _grow(self, e: Any) -> None:
        """``e`` was appended to the free list: give its position its weight."""
        tree = self._tree
        n = len(self._list)  # type: ignore[arg-type]
        if n >= len(tree):  # type: ignore[arg-type]
            self._rebuild_tree(2 * n)
        else:
            self._set_weight(n - 1, _W // (e.load + 1))

    def _rebuild_tree(self, size: int) -> None:
        tree = [0] * (size + 1)
        for i, e in enumerate(self._list, 1):  # type: ignore[arg-type]
            tree[i] += _W // (e.load + 1)
            j = i + (i & -i)
            if j <= size:
                tree[j] += tree[i]
        self._tree = tree

    def _weight(self, i: int) -> int:
        return self._prefix(i + 1) - self._prefix(i)

    def _set_weight(self, i: int, w: int) -> None:
        tree = self._tree
        delta = w - self._weight(i)
        if delta:
            size = len(tree) - 1  # type: ignore[arg-type]
            i += 1
            while i <= size:
                tree[i] += delta  # type: ignore[index]
                i += i & -i

    def _prefix(self, i: int) -> int:
        """Sum of the weights at positions below ``i``."""
        tree = self._tree
        s = 0
        while i > 0:
            s += tree[i]  # type: ignore[index]
            i -= i & -i
        return s

    def _find(self, r: int) -> int:
        """The position whose weight interval holds ``r`` (0 <= r < total)."""
        tree = self._tree
        size = len(tree) - 1  # type: ignore[arg-type]
        pos = 0
        step = 1 << size.bit_length()
        while step:
            nxt = pos + step
            if nxt <= size and tree[nxt] <= r:  # type: ignore[index]
                pos = nxt
                r -= tree[nxt]  # type: ignore[index]
            step >>= 1
        return pos

    # -- checking (the scheduler's validate) ------------------------------------

    def check(self, engines: list[Any]) -> str | None:
        """What is wrong with the index, given the registered engines in LRU order; None if
        nothing.  Slow: for tests."""
        keys = [e.key for e in engines]
        if keys != sorted(keys) or len(set(keys)) != len(keys):
            return f"LRU keys {keys} do not follow the LRU order"
        free = [e for e in engines if e.load < self.cap and not e.held]
        if self._heap is not None:
            top = self._pick_min(random.Random(0))
            want = (min(free, key=lambda e: (e.load, e.key) if self._by_load else e.key)
                    if free else None)
            return None if top is want else f"the heap offers {top}, not {want}"
        lst = self._list
        if {id(e) for e in lst} != {id(e) for e in free} or len(lst) != len(free):  # type: ignore[union-attr]
            return f"free list {lst} != free engines {free}"
        if any(e.pos != i for i, e in enumerate(lst)):  # type: ignore[arg-type]
            return "free list positions are off"
        if self._tree is not None:
            want_w = [_W // (e.load + 1) for e in lst]  # type: ignore[union-attr]
            got_w = [self._weight(i) for i in range(len(self._tree) - 1)]
            if got_w[:len(want_w)] != want_w or any(got_w[len(want_w):]):
                return "weights out of date"
        return None
