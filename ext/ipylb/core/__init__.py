"""The pure scheduler core: events in, commands out; no sockets, threads or clocks.

:mod:`.events` defines the interface, :mod:`.scheduler` the state machine (its parts:
:mod:`.task` the records, :mod:`.placement`, :mod:`.dependencies`, :mod:`.failures`,
:mod:`.deadlines`, :mod:`.validation`), :mod:`.schemes` the routing schemes,
:mod:`.free` the index of free engines and :mod:`.deps` the dependency rules.
"""

from .deps import check, unreachable
from .scheduler import Scheduler
from .schemes import SCHEMES

__all__ = ["Scheduler", "SCHEMES", "check", "unreachable"]
