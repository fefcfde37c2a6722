"""Turning functions, arguments and results into frames and back.

cloudpickle with pickle protocol 5: large contiguous buffers (numpy arrays,
bytes-like objects) travel as their own frames, out of band, never joined into
one big bytes object.
"""

from __future__ import annotations

import pickle
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
import zmq

from .error import SerializationError, safe_str
from .shm import Segment

# Buffers smaller than this stay inside the pickle: one frame beats many tiny ones.
OOB_MIN = 64 * 1024


# Values the C pickler handles exactly as cloudpickle would (no code, no classes of ours).
_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})
_CONTAINERS = frozenset({tuple, list, dict})


def _plain(obj: Any, depth: int = 4) -> bool:
    """Whether ``obj`` is plain data: scalars, or small tuples/lists/dicts of them nested at
    most ``depth`` deep.  The bound keeps the check cheap and finite: a cycle or a deeper
    value is simply not plain, and takes the general path (which accepts more, never less)."""
    t = type(obj)
    if t in _PLAIN:
        return True
    if depth == 0 or t not in _CONTAINERS or len(obj) > 64:
        return False
    depth -= 1
    if t is dict:
        return all(type(k) in _PLAIN and (type(v) in _PLAIN or _plain(v, depth)) for k, v in obj.items())
    return all(type(x) in _PLAIN or _plain(x, depth) for x in obj)


# How many more recursion levels a pickling that ran out of them gets for a second try:
# ipylb's own frames and wrapping (the arguments' tuple and dict) cost a few, so a value that
# pickle.dumps accepts where the caller stands is accepted here too.
_DEPTH_SLACK = 100


def _too_deep(e: BaseException) -> bool:
    """Whether a pickling error is pickle running out of recursion levels (cloudpickle
    re-raises RecursionError as a PicklingError caused by it)."""
    return isinstance(e, RecursionError) or isinstance(e.__cause__, RecursionError)


class _Blob:
    """A large bytes or bytearray, pickled out of band like an array's data (pickle keeps
    exact bytes and bytearrays in the stream, buffer callback or not); it loads as a copy
    of its own type."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        return type(self.data), (pickle.PickleBuffer(self.data),)


def _blob(obj: Any) -> Any:
    t = type(obj)
    return _Blob(obj) if (t is bytes or t is bytearray) and len(obj) >= OOB_MIN else obj


def dumps(obj: Any) -> list[Any]:
    """Pickle ``obj`` into ``[pickle, *out_of_band_buffers]`` (buffers are not copied).

    Large buffers go out of band: numpy arrays and the like, and ``obj`` itself if it is
    a large bytes or bytearray.  Whatever ``pickle.dumps``/``cloudpickle.dumps`` accept at
    the caller's stack depth is accepted (cycles, shared references, deep nesting); raises
    what cloudpickle raises otherwise."""
    obj = _blob(obj)
    if _plain(obj):  # the common small case: the C pickler is several times faster
        return [pickle.dumps(obj, 5)]
    return _dumps_deep(obj)


def _dumps_deep(obj: Any) -> list[Any]:
    """:func:`_dumps_general`, tried once more with ``_DEPTH_SLACK`` more recursion levels
    if it ran out of them (data and functions alike: a closure or default can hold deep
    data too)."""
    try:
        return _dumps_general(obj)
    except Exception as e:
        if not _too_deep(e):
            raise
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + _DEPTH_SLACK)
    try:
        return _dumps_general(obj)
    finally:
        sys.setrecursionlimit(limit)


def _dumps_general(obj: Any) -> list[Any]:
    oob: list[memoryview] = []

    def keep(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: let the pickle carry it
            return True
        if raw.nbytes < OOB_MIN:
            return True
        oob.append(raw)
        return False

    return [cloudpickle.dumps(obj, protocol=5, buffer_callback=keep), *oob]


def _writable(frame: Any) -> Any:
    # A received zmq.Frame owns its memory and exposes it writable: no copy needed;
    # a shared-memory segment is mapped copy-on-write.
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    if type(frame) is Segment:
        return frame.view()
    return bytearray(frame)


def loads(frames: Sequence[Any]) -> Any:
    """Inverse of :func:`dumps`.

    Out-of-band buffers become writable memory (a received frame's own, a
    copy-on-write mapping of a segment, else a copy), so an array that arrives here can be modified in place like one made
    locally.
    """
    first = frames[0]
    if isinstance(first, zmq.Frame):
        first = first.buffer
    return pickle.loads(first, buffers=[_writable(f) for f in frames[1:]])


def reason(e: BaseException) -> str:
    """Why pickling failed, in words (for the messages of SerializationError)."""
    if _too_deep(e):
        return ("it is nested deeper than pickle can go (RecursionError); flatten it, or raise "
                "sys.setrecursionlimit")
    return f"{type(e).__name__}: {safe_str(e)}"


def _culprit(args: tuple, kwargs: dict, e: BaseException) -> str:
    """Name the first argument that does not pickle and why, for an error message."""
    named = [(f"positional argument {i}", a) for i, a in enumerate(args)]
    named += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for name, value in named:
        try:
            dumps(value)
        except Exception as each:
            return f"{name} ({type(value).__name__} object): {reason(each)}"
    return f"the arguments: {reason(e)}"


def _by_reference(f: Any) -> bool:
    """Whether cloudpickle would pickle ``f`` by reference too (an importable module-level
    function), so the C pickler gives the same bytes, faster."""
    module = getattr(f, "__module__", None)
    if module is None or module == "__main__" or not isinstance(f, types.FunctionType | types.BuiltinFunctionType):
        return False
    if module in cloudpickle.list_registry_pickle_by_value():
        return False
    mod = sys.modules.get(module)
    return mod is not None and getattr(mod, f.__qualname__, None) is f


# A function whose pickle (without its out-of-band buffers) is larger than this draws a
# warning, once per function: data a closure or global holds that cannot go out of band.
FUNCTION_WARN_BYTES = 4 << 20
_warned_functions: set[str] = set()


# The last function pickled by reference and its frames (not to be changed by callers).
_last_by_reference: tuple[Any, list[Any]] = (None, [])


def dumps_function(f: Any) -> list[Any]:
    """Pickle a task's function into ``[pickle, *out_of_band_buffers]`` (as :func:`dumps`:
    large arrays it closes over travel beside the pickle, through shared memory on one
    host), or raise SerializationError naming it.

    Warns (``UserWarning``, once per function) when the pickle itself is larger than
    ``FUNCTION_WARN_BYTES``: such data is sent to every engine; passed as an argument (or as
    a numpy array, which goes out of band), it would not weigh on the function.
    Messages name what ``f.__wrapped__`` is, if set (a map's chunk runner wraps the map's
    function)."""
    global _last_by_reference
    named = getattr(f, "__wrapped__", f)
    try:
        if _by_reference(f):
            last = _last_by_reference
            if last[0] is f:  # the same function again (apply_async in a loop): the same
                return last[1]  # frames, so the client also reuses their key (its MAC)
            frames = [pickle.dumps(f, 5)]
            _last_by_reference = (f, frames)
            return frames
        frames = _dumps_deep(f)
    except Exception as e:
        name = repr(getattr(named, "__qualname__", named))
        if _too_deep(e):
            raise SerializationError(
                f"could not pickle the function {name}: a value it closes over (or a default "
                "or global it uses) is nested deeper than pickle can go (RecursionError), even "
                f"with {_DEPTH_SLACK} more levels than here. Flatten that value, pass it as an "
                "argument, or raise sys.setrecursionlimit; nothing was sent."
            ) from e
        raise SerializationError(
            f"could not pickle the function {name}: {reason(e)}. Define it at module level "
            "or close over picklable values only; nothing was sent."
        ) from e
    size = len(frames[0])
    if size > FUNCTION_WARN_BYTES:
        name = (f"{getattr(named, '__module__', '?')}."
                f"{getattr(named, '__qualname__', type(named).__name__)}")
        if name not in _warned_functions:
            _warned_functions.add(name)
            warnings.warn(
                f"the task function {name} pickles to {size / 1e6:.1f} MB: it closes over (or "
                "uses globals holding) large data that cannot travel out of band. Pass the data "
                "as an argument instead (a numpy array or bytes goes through shared memory).",
                UserWarning, stacklevel=3)
    return frames


_NO_ARGS = pickle.dumps(((), {}), 5)


def dumps_args(args: tuple, kwargs: dict) -> list[Any]:
    """Pickle a task's arguments, or raise SerializationError naming the bad one."""
    if not args and not kwargs:
        return [_NO_ARGS]
    try:
        # Large bytes arguments (top level) go out of band too.
        return dumps((tuple(map(_blob, args)), {k: _blob(v) for k, v in kwargs.items()}))
    except Exception as e:
        raise SerializationError(
            f"could not pickle {_culprit(args, kwargs, e)}. "
            "Task arguments must be picklable (cloudpickle); nothing was sent."
        ) from e


def dumps_items(items: Sequence[tuple], first: int, chunked: bool, what: str = "map",
                sent: str | Callable[[], str] = "nothing was sent") -> list[Any]:
    """Pickle map items (argument tuples) as one task's arguments: a chunk runner's
    ``((list(items), first), {})`` if ``chunked``, else the single item's ``(item, {})``
    (large bytes arguments out of band, as :func:`dumps_args`).

    ``first`` is the position of ``items[0]`` in the whole ``what`` (``"map"``,
    ``"imap"``), so that an item that does not pickle is named by its own position, not by
    its chunk's: raises SerializationError ``could not pickle item 7 of the map,
    positional argument 0 (lock object): TypeError: ...``, ending with ``sent``: what the
    caller had already sent (``"nothing was sent"``, or what became of what was), or a
    function that says it (called only on failure)."""
    args = (list(items), first) if chunked else tuple(map(_blob, items[0]))
    try:
        return dumps((args, {}))
    except Exception as e:
        raise SerializationError(
            f"could not pickle {_item_culprit(items, first, what, e)}. Task arguments must be "
            f"picklable (cloudpickle); {sent if isinstance(sent, str) else sent()}."
        ) from e


def _item_culprit(items: Sequence[tuple], first: int, what: str, e: BaseException) -> str:
    """Name the first of ``items`` that does not pickle (by its position in the whole
    ``what``), which of its arguments, and why."""
    for k, item in enumerate(items):
        try:
            dumps(item)
        except Exception as each:
            return f"item {first + k} of the {what}, {_culprit(item, {}, each)}"
    return f"items {first} to {first + len(items) - 1} of the {what} together: {reason(e)}"
