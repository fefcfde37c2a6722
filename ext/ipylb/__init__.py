"""ipylb: a load-balanced task farm over real Jupyter kernels.

IPython.parallel's task interface, re-made: ``Client(engines=4)`` starts a
controller and four engine kernels on this machine; ``rc.load_balanced_view()``
runs functions on whichever engine the scheduler picks.

The client's names are imported on first use (PEP 562): an engine kernel or a controller
imports ``ipylb.engine`` / ``ipylb.controller`` without the client and its views, which
cost every engine kernel's boot ~0.1 s of CPU (64 kernels on 2 cores: seconds of start-up;
issue 14 item 7).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import error

if TYPE_CHECKING:
    from .client.asyncresult import AsyncHubResult, AsyncMapResult, AsyncResult
    from .client.client import Client
    from .client.view import LoadBalancedView
    from .dependency import Dependency, depend, dependent, require

__version__ = "0.1.0"

# Public name -> the module that defines it (imported when the name is first used).
_LAZY = {
    "AsyncHubResult": ".client.asyncresult", "AsyncMapResult": ".client.asyncresult",
    "AsyncResult": ".client.asyncresult", "Client": ".client.client",
    "LoadBalancedView": ".client.view", "Dependency": ".dependency", "depend": ".dependency",
    "dependent": ".dependency", "require": ".dependency",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ipylb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later uses find it without this call
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def load_ipython_extension(ipython):  # noqa: ANN001, ANN201 - IPython's hook signature
    """``%load_ext ipylb``: register the magics."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):  # noqa: ANN001, ANN201
    """``%unload_ext ipylb``: stop what the magics started."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "AsyncHubResult", "AsyncMapResult", "AsyncResult", "Client", "Dependency", "LoadBalancedView",
    "depend", "dependent", "error", "load_ipython_extension", "require", "unload_ipython_extension",
]
