"""Which globals a task's function runs with.

A function from ``__main__`` runs with the engine's user namespace as globals,
and so do the ``__main__`` functions it calls (they came in the same pickle, with
the same globals): ``@require``'s imports and pushed names are visible to all.

The client's globals that came with it are copied in, except the names these
functions assign with ``global`` that the engine already has: those belong to the
engine (state a task stored, as in ``global MODEL; MODEL = load()``), while names
they only read are refreshed to the client's value (README: "Engine state").

Binding happens when a task's function is not the last task's
(:class:`~ipylb.engine.taskchannel.TaskChannel` keeps the bound one), not for every task.
"""

from __future__ import annotations

import dis
import types
from typing import Any

__all__ = ["bind_interactive"]


def _shares_globals(v: Any, shipped: dict[str, Any]) -> bool:
    return isinstance(v, types.FunctionType) and v.__globals__ is shipped


_STORES = frozenset({dis.opmap["STORE_GLOBAL"], dis.opmap["DELETE_GLOBAL"]})


def _assigned_globals(code: types.CodeType) -> frozenset[str]:
    """The global names ``code`` (and the code nested in it) assigns or deletes."""
    names: set[str] = set()
    todo = [code]
    while todo:
        c = todo.pop()
        if not _STORES.isdisjoint(c.co_code[::2]):  # the rare case: decode the bytecode
            names.update(i.argval for i in dis.get_instructions(c) if i.opcode in _STORES)
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return frozenset(names)


def _rehome(f: types.FunctionType, ns: dict[str, Any]) -> types.FunctionType:
    """``f`` with ``ns`` as its globals."""
    g = types.FunctionType(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    g.__dict__.update(f.__dict__)
    g.__qualname__ = f.__qualname__
    return g


def bind_interactive(f: Any, ns: dict[str, Any]) -> Any:
    """``f`` made to run with the engine's user namespace ``ns`` as its globals (which
    take the client's globals that came with it, as above); a wrapper (``@dependent``,
    ``@require``, a map's chunk) has what it wraps bound."""
    rebind = getattr(f, "_ipylb_rebind", None)
    if rebind is not None:  # wrappers (dependent, map chunks) bind what they wrap
        return rebind(lambda g: bind_interactive(g, ns))
    if not isinstance(f, types.FunctionType) or f.__module__ != "__main__":
        return f
    shipped = f.__globals__
    if shipped is not ns:
        functions = [v for v in shipped.values() if _shares_globals(v, shipped)]
        owned = _assigned_globals(f.__code__).union(
            *(_assigned_globals(g.__code__) for g in functions))
        for k, v in shipped.items():
            if k.startswith("__") or (k in owned and k in ns):
                continue
            ns[k] = _rehome(v, ns) if _shares_globals(v, shipped) else v
    return _rehome(f, ns)
