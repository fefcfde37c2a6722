"""Dependencies: graph (``Dependency``: when and where) and functional
(``@require``, ``@depend``, ``dependent``: whether an engine can run a task).

Graph dependencies are data the scheduler core evaluates; functional ones run on
the engine, at the start of the task, and raise ``UnmetDependency`` to send the
task elsewhere.
"""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Callable, Iterable
from typing import Any

from .core import deps as _deps
from .core.events import DepSpec
from .error import UnmetDependency


def _ids_of(item: Any) -> list[str]:
    """msg_ids of one dependency item: a msg_id, an AsyncResult or a Dependency."""
    if isinstance(item, str):
        return [item]
    msg_ids = getattr(item, "msg_ids", None)
    if isinstance(msg_ids, list) and all(isinstance(m, str) for m in msg_ids):
        return msg_ids
    if isinstance(item, (set, frozenset)) and all(isinstance(m, str) for m in item):
        return list(item)
    raise TypeError(
        f"a dependency must be a msg_id string, an AsyncResult or a Dependency, "
        f"not {type(item).__name__}: {item!r}"
    )


class Dependency(set):
    """A set of msg_ids with the switches that say when it is met.

    ``all``: all (True) or any (False) of the tasks; ``success``/``failure``: which
    outcomes count.  Used as ``after=`` (when) or ``follow=`` (where).
    """

    def __init__(self, deps: Any = (), all: bool = True, success: bool = True,
                 failure: bool = False) -> None:
        if not (success or failure):
            raise ValueError("a Dependency must count success, failure, or both")
        items = [deps] if isinstance(deps, str) or hasattr(deps, "msg_ids") else deps
        if not isinstance(items, Iterable):
            raise ValueError(f"a Dependency takes a msg_id, an AsyncResult or an iterable of "
                             f"these, not {type(deps).__name__}: {deps!r}")
        ids: list[str] = []
        try:
            for item in items:
                ids.extend(_ids_of(item))
        except TypeError as e:
            raise ValueError(str(e)) from None
        super().__init__(ids)
        self.all = all
        self.success = success
        self.failure = failure

    def spec(self) -> DepSpec:
        """The core's view of this dependency."""
        return DepSpec(frozenset(self), self.all, self.success, self.failure)

    def check(self, completed: Iterable[str], failed: Iterable[str] | None = None) -> bool:
        """Whether the dependency is met given finished msg_ids."""
        return _deps.check(self.spec(), set(completed), set(failed or ()))

    def unreachable(self, completed: Iterable[str], failed: Iterable[str] | None = None) -> bool:
        """Whether the dependency can no longer be met given finished msg_ids."""
        return _deps.unreachable(self.spec(), set(completed), set(failed or ()))

    def as_dict(self) -> dict[str, Any]:
        """The dependency as plain data."""
        return {"dependencies": sorted(self), "all": self.all, "success": self.success,
                "failure": self.failure}

    def __repr__(self) -> str:
        return (f"Dependency({sorted(self)!r}, all={self.all}, success={self.success}, "
                f"failure={self.failure})")


def to_spec(value: Any) -> DepSpec | None:
    """Normalise an ``after``/``follow`` flag value; TypeError for anything else."""
    if value is None:
        return None
    if isinstance(value, Dependency):
        return value.spec() if value else None
    if isinstance(value, (str, set, frozenset)) or hasattr(value, "msg_ids"):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise TypeError(
            f"after/follow take msg_ids, AsyncResults, Dependency objects or a list of these, "
            f"not {type(value).__name__}"
        )
    ids: list[str] = []
    switches = set()
    for item in items:
        ids.extend(_ids_of(item))
        # A Dependency in a list keeps its switches (plain ids count with the defaults).
        switches.add((item.all, item.success, item.failure) if isinstance(item, Dependency)
                     else (True, True, False))
    if len(switches) > 1:
        raise ValueError(
            "after/follow got a list that mixes Dependency objects (or plain ids) with different "
            "all/success/failure settings; put the ids into one Dependency with the settings wanted"
        )
    return DepSpec(frozenset(ids), *switches.pop()) if ids else None


# -- functional dependencies ------------------------------------------------------


class dependent:
    """``f`` guarded by ``df(*dargs, **dkwargs)``: a return of exactly False is unmet.

    The same ``f`` can be wrapped several times with different dependencies.
    """

    def __init__(self, _wrapped_f: Callable, _wrapped_df: Callable, *dargs: Any, **dkwargs: Any):
        self.f = _wrapped_f
        self.df = _wrapped_df
        self.dargs = dargs
        self.dkwargs = dkwargs
        self.__name__ = getattr(_wrapped_f, "__name__", "dependent")
        functools.update_wrapper(self, _wrapped_f, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        check = getattr(self.df, "__name__", repr(self.df))
        try:
            met = self.df(*self.dargs, **self.dkwargs)
        except Exception as e:
            e.add_note(f"(raised by the dependency check {check}(), so {self.__name__}() did not run)")
            raise
        if met is False:
            raise UnmetDependency(f"{self.__name__}: {check}() is False here")
        return self.f(*args, **kwargs)

    def _ipylb_rebind(self, bind: Callable[[Any], Any]) -> dependent:
        """Engine hook: give interactive functions inside the engine's namespace."""
        return type(self)(bind(self.f), bind(self.df), *self.dargs, **self.dkwargs)


def depend(_wrapped_df: Callable, *dargs: Any, **dkwargs: Any) -> Callable[[Callable], dependent]:
    """Decorator: run the task only where ``df(*dargs, **dkwargs)`` is not False."""
    return lambda f: dependent(f, _wrapped_df, *dargs, **dkwargs)


class _Require:
    """The check behind ``@require``: import the modules, push the functions and the
    named objects."""

    def __init__(self, names: tuple[Any, ...], objects: dict[str, Any] | None = None) -> None:
        self.modules: list[str] = []
        self.functions: list[Callable] = []
        self.objects: dict[str, Any] = dict(objects or {})
        for n in names:
            if isinstance(n, str):
                self.modules.append(n)
            elif isinstance(n, types.ModuleType):
                self.modules.append(n.__name__)
            elif callable(n):
                self.functions.append(n)
            else:
                raise TypeError(f"require() takes module names, modules or functions, not {n!r}; "
                                f"push other objects by keyword: require(name=obj)")
        bad = [k for k in self.objects if not k.isidentifier()]
        if bad:
            raise ValueError(f"require() pushes keyword objects under their names, and "
                             f"{bad[0]!r} is not a Python name")

    def __call__(self, namespaces: list[dict[str, Any]]) -> bool:
        """Import and push into ``namespaces``; raise UnmetDependency naming a module that
        does not import here."""
        found: dict[str, Any] = {}
        for name in self.modules:
            try:
                module = importlib.import_module(name)
            except ImportError as e:
                raise UnmetDependency(f"cannot import {name!r} here ({e})") from None
            top = name.split(".", 1)[0]
            found[top] = module if top == name else importlib.import_module(top)
        for fn in self.functions:
            found[fn.__name__] = fn
        found.update(self.objects)
        for ns in namespaces:
            ns.update(found)
        return True


class required(dependent):
    """``f`` that runs only where its required modules import (see :func:`require`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        namespaces = [getattr(self.f, "__globals__", {})]
        try:
            from IPython import get_ipython

            shell = get_ipython()
            if shell is not None:
                namespaces.append(shell.user_ns)
        except ImportError:
            pass
        self.df(namespaces)
        return self.f(*args, **kwargs)

    def _ipylb_rebind(self, bind: Callable[[Any], Any]) -> required:
        req = self.df
        req.functions = [bind(fn) for fn in req.functions]
        req.objects = {k: bind(v) for k, v in req.objects.items()}
        return type(self)(bind(self.f), req)


def require(*names: Any, **objects: Any) -> Callable[[Callable], required]:
    """Decorator: run the task only where the named modules import; import them into its
    namespace, and push the given functions there by name and the keyword arguments under
    their keywords (``@require("numpy", scale=2.5)``: ``scale`` is a global of the task
    on the engine), before the task runs (ipyparallel's ``require(*objects, **mapping)``).
    TypeError for a positional argument that is not a module or a function."""
    req = _Require(names, objects)
    return lambda f: required(f, req)
