"""A task's report: what its outcome becomes on the wire, the frames of its return value
or its error as ``(ename, evalue, traceback)``.

A value may not pickle (SerializationError names the culprit: for a map's chunk, the
item); an exception's ``str`` may fail and its traceback may be huge.  The engine answers
every task whatever it did, so these never raise beyond what they are for, and cut long
text to :data:`EVALUE_LIMIT` and :data:`TRACEBACK_LIMIT` characters.  A traceback starts
at the user's code: ipylb's own frames on top are dropped.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from ..error import SerializationError, safe_str
from ..serialize import dumps, reason

__all__ = ["EVALUE_LIMIT", "TRACEBACK_LIMIT", "describe", "pickle_result", "safe_name"]

# A task's error text (characters): the value of the exception, and its traceback.
EVALUE_LIMIT = 64 * 1024
TRACEBACK_LIMIT = 256 * 1024

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _remote_traceback(e: BaseException) -> str:
    """The traceback of ``e`` from the user's code on: without ipylb's own frames on top
    (this channel, the wrappers of dependencies, map chunks and cells)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None and \
            tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))


def pickle_result(msg_id: str, value: Any, f: Any, args: tuple) -> list[Any]:
    """The frames of a task's return value, or SerializationError saying why not (which
    item, for a map's chunk: its runner ``f`` traces it, ``f._ipylb_culprit(args, value)``)."""
    try:
        return dumps(value)
    except KeyboardInterrupt:  # the task's walltime or rc.interrupt(): the task's own error
        raise
    except BaseException as e:  # noqa: B036 - a __reduce__ may raise anything
        why = f"({safe_name(value)} object) could not be pickled: {reason(e)}"
        culprit = getattr(f, "_ipylb_culprit", None)
        if culprit is not None:
            try:
                why = f"could not be pickled: {culprit(args, value) or reason(e)}"
            except BaseException:  # noqa: B036 - the items' own __reduce__ again
                pass
        raise SerializationError(
            f"the result of task {msg_id} {why}. Return a picklable value.") from None


def safe_name(obj: Any) -> str:
    """The name of ``obj``'s class (of ``obj`` itself if it is an exception)."""
    try:
        return str(type(obj).__name__)
    except BaseException:  # noqa: B036 - a metaclass may make even this fail
        return "object"


def describe(e: BaseException) -> tuple[str, str, str]:
    """``(ename, evalue, traceback)`` of a task's exception, each within its limit; never
    raises (an exception whose ``str`` or notes fail gets a fallback text)."""
    evalue = safe_str(e, EVALUE_LIMIT)
    if isinstance(e, SystemExit):
        evalue = f"the task called sys.exit({evalue}); the engine serves on"
    try:
        notes = getattr(e, "__notes__", None)
        if isinstance(notes, list | tuple):
            evalue += "".join(f" {safe_str(n, EVALUE_LIMIT)}" for n in notes)
    except BaseException:  # noqa: B036 - a __getattr__ may raise anything
        pass
    try:
        tb = _remote_traceback(e)
    except BaseException as fail:  # noqa: B036
        tb = f"<the traceback could not be formatted: {safe_name(fail)}>"
    if len(tb) > TRACEBACK_LIMIT:  # keep where it started and where it ended
        half = TRACEBACK_LIMIT // 2
        tb = (f"{tb[:half]}\n... [{len(tb) - 2 * half} characters of traceback cut by ipylb] ...\n"
              f"{tb[-half:]}")
    return safe_name(e), evalue, tb
