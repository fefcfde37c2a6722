"""Pure rules for graph dependencies: when a DepSpec is met, when it never can be.

Two views of the same rules live here:

* :func:`check` / :func:`unreachable` take *sets* of finished ids.  The client's
  ``Dependency`` calls them, and the tests use them as an oracle.
* :class:`Tally` counts outcomes as they arrive, so the scheduler can re-evaluate
  a task in O(1) when one of its dependencies finishes instead of re-scanning a
  possibly large id set each time.

Terms: a finished dependency *counts* if its outcome is one the switches accept
(``success`` and it succeeded, or ``failure`` and it failed); otherwise it is
*bad*.  ``all=True`` is met when every id counts and unreachable once one is bad;
``all=False`` is met when one counts and unreachable once every id is bad.  An
empty dependency is always met and never unreachable.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Any

from .events import DepSpec

__all__ = ["check", "unreachable", "counts", "rule", "wants", "Tally"]


def _parts(spec: Any) -> tuple[Iterable[str], bool, bool, bool]:
    """(ids, all, success, failure) of a DepSpec or of a set with those attributes."""
    ids = getattr(spec, "ids", spec)
    return ids, spec.all, spec.success, spec.failure


def counts(spec: DepSpec, succeeded: bool) -> bool:
    """Whether a dependency that finished with this outcome satisfies ``spec``'s switches."""
    return spec.success if succeeded else spec.failure


def check(spec: Any, completed: Set[str], failed: Set[str]) -> bool:
    """Whether ``spec`` is met, given the ids that succeeded and the ids that failed.

    ``spec`` is a DepSpec, or any set of ids with ``all``/``success``/``failure``.
    """
    ids, all_, success, failure = _parts(spec)
    ids = frozenset(ids)
    if not ids:
        return True
    if success and failure:
        good = ids & (completed | failed)
    elif success:
        good = ids & completed
    elif failure:
        good = ids & failed
    else:
        good = frozenset()
    return len(good) == len(ids) if all_ else bool(good)


def unreachable(spec: Any, completed: Set[str], failed: Set[str]) -> bool:
    """Whether ``spec`` can never be met any more, given finished ids.

    Only ids already finished the wrong way make a dependency unreachable; an
    unfinished id can still go either way.
    """
    ids, all_, success, failure = _parts(spec)
    ids = frozenset(ids)
    if not ids:
        return False
    bad: frozenset[str] = frozenset()
    if not success:
        bad = bad | (ids & completed)
    if not failure:
        bad = bad | (ids & failed)
    return bool(bad) if all_ else len(bad) == len(ids)


def rule(spec: DepSpec) -> str:
    """The switches in words, for messages: ``all=True, success=True, failure=False``."""
    return f"all={spec.all}, success={spec.success}, failure={spec.failure}"


def wants(spec: DepSpec) -> str:
    """What a dependency must do to count, in words: succeed, fail, or finish."""
    if spec.success and spec.failure:
        return "finish"
    return "succeed" if spec.success else "fail"


class Tally:
    """Running counts of one DepSpec's finished ids: ``good`` counted, ``bad`` did not.

    The caller feeds each id's outcome once (:meth:`add`); :attr:`met` and
    :attr:`dead` then answer in O(1) what :func:`check`/:func:`unreachable` answer
    from sets.
    """

    __slots__ = ("spec", "n", "good", "bad")

    def __init__(self, spec: DepSpec) -> None:
        self.spec = spec
        self.n = len(spec.ids)
        self.good = 0
        self.bad = 0

    def add(self, counted: bool) -> None:
        """One more id finished; ``counted`` says whether its outcome counts."""
        if counted:
            self.good += 1
        else:
            self.bad += 1

    @property
    def pending(self) -> int:
        """Ids not finished yet."""
        return self.n - self.good - self.bad

    @property
    def met(self) -> bool:
        """The dependency is met now."""
        return self.good == self.n if self.spec.all else self.good > 0

    @property
    def dead(self) -> bool:
        """The dependency can never be met."""
        return self.bad > 0 if self.spec.all else self.bad == self.n
