"""Unpickling a task's function and arguments on the engine, and saying what failed.

A function (or an argument's class) pickled *by reference* names a module the engine
must import.  When it cannot, the task never ran: that is not the task's error, so it
fails with :class:`ipylb.error.DeserializationError`, which names what could not be
unpickled (the function, or which argument), why, and the two ways out.  To name the
argument, a second pass (only on failure) unpickles with stand-ins for what does not
import and looks for them among the arguments.

ipylb's own wrappers (map chunks, ``dependent``, ``require``) are pickled by reference to
ipylb's modules: a task that broke ``sys.modules['ipylb...']`` (set it to None) would make
every later one of them fail on that engine, so on such a failure the engine's own modules
are put back and the unpickling tried once more.
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any

import zmq

from ..error import DeserializationError, safe_str
from ..serialize import loads
from ..shm import Segment

# The engine's own ipylb modules, as loaded when it started.
_OWN = {k: m for k, m in sys.modules.items() if k == "ipylb" or k.startswith("ipylb.")}


def _loads(frames: list[Any]) -> Any:
    """``loads``, and once more after putting ipylb's modules back if a task broke them."""
    try:
        return loads(frames)
    except ImportError as e:
        name = e.name or ""
        if not (name == "ipylb" or name.startswith("ipylb.")):
            raise
        broken = [k for k, m in _OWN.items() if sys.modules.get(k) is not m]
        if not broken:
            raise
        sys.modules.update((k, _OWN[k]) for k in broken)
        return loads(frames)


def function(frames: list[Any], msg_id: str) -> Any:
    """The task's function from its frames; DeserializationError if it does not unpickle."""
    try:
        return _loads(frames)
    except Exception as e:
        missing = _probe(frames)
        what = f"its function ({missing[0][0]})" if missing else "its function"
        raise DeserializationError(_message(msg_id, what, e)) from None


def arguments(frames: list[Any], msg_id: str) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from their frames; DeserializationError naming the argument(s)
    that do not unpickle."""
    try:
        return _loads(frames)
    except Exception as e:
        raise DeserializationError(_message(msg_id, _which_argument(frames), e)) from None


def _message(msg_id: str, what: str, e: BaseException) -> str:
    module = getattr(e, "name", None) if isinstance(e, ImportError) else None
    where = f"module {module!r}" if module else "the module that defines it"
    by_value = module.split(".")[0] if module else "the_module"
    return (
        f"task {msg_id} did not run: {what} could not be unpickled on the engine: "
        f"{type(e).__name__}: {safe_str(e)}. It was pickled by reference, so the engine must "
        f"import {where}. Either make it importable on the engines (install it there, or put "
        "its directory on their PYTHONPATH), or ship it by value from the client: "
        f"`import cloudpickle, {by_value}; cloudpickle.register_pickle_by_value({by_value})`"
    )


# -- the second pass: stand-ins for what does not import ----------------------------------


class _Missing:
    """Stands in for a class or function that could not be imported, and for what it
    would have made; ``_ref`` says which (``module.name``)."""

    _ref = "?"

    def __new__(cls, *_args: Any, **_kwargs: Any) -> Any:
        return object.__new__(cls)

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def __setstate__(self, _state: Any) -> None:
        pass


class _Probe(pickle.Unpickler):
    def __init__(self, data: Any, buffers: list[Any]) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self.missing: list[tuple[str, type]] = []

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except Exception:
            ref = f"{module}.{name}"
            stub = type(name, (_Missing,), {"_ref": ref})
            self.missing.append((ref, stub))
            return stub


def _plain(frame: Any) -> Any:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    if type(frame) is Segment:
        return frame.view()
    return frame


def _probe(frames: list[Any]) -> list[tuple[str, type]] | None:
    """The ``(module.name, stand-in)`` pairs that did not import (None if even the second
    pass fails)."""
    return _load_probe(frames)[0]


def _load_probe(frames: list[Any]) -> tuple[list[tuple[str, type]] | None, Any]:
    """Unpickle with stand-ins: (what did not import, the value made with stand-ins)."""
    try:
        probe = _Probe(_plain(frames[0]), [bytearray(_plain(f)) for f in frames[1:]])
        value = probe.load()
    except Exception:
        return None, None
    return probe.missing, value


def _which_argument(frames: list[Any]) -> str:
    missing, value = _load_probe(frames)
    if not missing or not isinstance(value, tuple) or len(value) != 2:
        return "its arguments"
    args, kwargs = value
    named = [(f"positional argument {i}", a) for i, a in enumerate(args)]
    named += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    found = [f"{name} ({ref})" for name, v in named if (ref := _stand_in(v, 3)) is not None]
    return ", ".join(found) if found else f"its arguments ({missing[0][0]})"


def _stand_in(value: Any, depth: int) -> str | None:
    """The reference of a stand-in in ``value`` (looking ``depth`` containers deep), or None."""
    if isinstance(value, _Missing) or (isinstance(value, type) and issubclass(value, _Missing)):
        return value._ref
    if depth <= 0:
        return None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple | set | frozenset):
        for item in value:
            ref = _stand_in(item, depth - 1)
            if ref is not None:
                return ref
    return None
