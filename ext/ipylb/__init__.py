"""ipylb: a load-balanced task farm over real Jupyter kernels.

IPython.parallel's task interface, re-made: ``Client(engines=4)`` starts a
controller and four engine kernels on this machine; ``rc.load_balanced_view()``
runs functions on whichever engine the scheduler picks.
"""

from . import error
from .client.asyncresult import AsyncHubResult, AsyncMapResult, AsyncResult
from .client.client import Client
from .client.view import LoadBalancedView
from .dependency import Dependency, depend, dependent, require

__version__ = "0.1.0"


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
