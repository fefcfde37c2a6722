"""The pure scheduler core: events in, commands out; no sockets, threads or clocks.

:mod:`.events` defines the interface, :mod:`.scheduler` the state machine,
:mod:`.schemes` the routing schemes and :mod:`.deps` the dependency rules.
"""

from .deps import check, unreachable
from .scheduler import Scheduler
from .schemes import SCHEMES

__all__ = ["Scheduler", "SCHEMES", "check", "unreachable"]
