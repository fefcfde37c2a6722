"""The version handshake: what must match between a cluster's controller and the clients
and engines that join it.

cloudpickle ships a function's bytecode, which is not portable across Python
versions: an engine of Python 3.11 running bytecode pickled by 3.12 may crash
(SIGSEGV) rather than fail.  So clients (in their hello) and engines (in their
registration) send :func:`versions`, and the controller refuses a peer whose
:func:`mismatch` is not None, before any task is sent either way.  Python is
compared by major.minor (bytecode changes between minor versions only); ipylb by
its version (the wire protocol); cloudpickle by its version (its pickles are only
promised to load in the same version).
"""

from __future__ import annotations

import sys
from typing import Any

# The fields that must be equal on both sides.
MUST_MATCH = ("python", "ipylb", "cloudpickle")


def versions() -> dict[str, str]:
    """This process's side of the handshake: the fields of ``MUST_MATCH`` and the
    interpreter's path (for the advice in a refusal)."""
    import cloudpickle

    from . import __version__

    return {
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "ipylb": __version__,
        "cloudpickle": cloudpickle.__version__,
        "executable": sys.executable,
    }


def describe(v: Any) -> str:
    """``Python 3.11, ipylb 0.1.0, cloudpickle 3.1.1`` for a versions dict (or what is known)."""
    if not isinstance(v, dict):
        return "unknown versions (an older ipylb?)"
    return (f"Python {v.get('python', '?')}, ipylb {v.get('ipylb', '?')}, "
            f"cloudpickle {v.get('cloudpickle', '?')}")


def mismatch(ours: dict[str, str], theirs: Any, we: str, they: str) -> str | None:
    """None if ``theirs`` matches ``ours``, else a message naming both sides and what to do.

    ``we``/``they`` name the two sides in the message ("the cluster's controller", "this
    client", "an engine on host X")."""
    if isinstance(theirs, dict) and all(ours[k] == theirs.get(k) for k in MUST_MATCH):
        return None
    where = ours.get("executable", "?") if we.startswith("the cluster") else \
        (theirs.get("executable", "?") if isinstance(theirs, dict) else "?")
    return (f"{they} runs {describe(theirs)}, but {we} runs {describe(ours)}: pickled "
            "functions carry bytecode, which another Python may run wrongly or crash on, so "
            f"nothing was sent. Use the cluster's Python ({where}) with the same ipylb and "
            "cloudpickle, or start a cluster from this environment (`ipylb cluster start`, "
            "or ipylb.Client(engines=N)).")
