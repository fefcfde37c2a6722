"""Entry point of the ``ipylb-engine`` kernelspec: ``python -m ipylb.engine -f CONNECTION_FILE``."""

from __future__ import annotations

import os
import sys
from typing import Any

from ipykernel.kernelapp import IPKernelApp

from ..error import safe_str
from .kernel import EngineKernel


class EngineApp(IPKernelApp):
    """IPKernelApp without its parent poller: EngineKernel watches the process that
    launched it itself, and removes its kernel connection file and ipc sockets before it
    exits (ipykernel's poller calls os._exit and leaves them behind)."""

    def init_poller(self) -> None:
        self.poller = None

    def initialize(self, argv: Any = None) -> None:
        """IPKernelApp's, with IPython's history in memory (not in the user's history
        database), and without the Jupyter debugger unless ``IPYLB_ENGINE_DEBUGGER=1``:
        making the kernel imports debugpy, ~0.09 s of each engine's ~0.4 s boot CPU (64
        engines on 2 cores: ~3 s of start-up; issue 14 item 7), for a debugger that serves a
        notebook frontend stepping through cells, not tasks.  debugpy is hidden only while
        the kernel is made (ipykernel then reports ``debugger: false``); a task may still
        import it."""
        # Tasks never reach IPython's history; without this, each engine's start added a
        # session to the user's ~/.ipython history database (thousands a day under a test
        # suite) and ran a history-saving thread.  An IPython config file may still set one.
        self.config.HistoryManager.hist_file = ":memory:"
        hide = os.environ.get("IPYLB_ENGINE_DEBUGGER") != "1" and "debugpy" not in sys.modules
        if hide:
            sys.modules["debugpy"] = None  # type: ignore[assignment]  # import fails: no debugger
        try:
            super().initialize(argv)
        finally:
            if hide and sys.modules.get("debugpy", 0) is None:
                del sys.modules["debugpy"]

    def start(self) -> None:
        """Serve until the engine is stopped on purpose (by ipylb, a shutdown request, or
        ``exit`` typed in an attached console): a loop stopped by anyone else (a task's
        ``loop.call_soon(loop.stop)``, a thread it left) is started again.  A loop that
        fails (an exception out of asyncio's own code: a task replaced a function it uses,
        such as ``math.ceil``) fails between tasks: the engine asks to be restarted, and
        the tasks sent to it run elsewhere, no retry used."""
        try:
            super().start()
        except Exception as e:  # noqa: BLE001
            self._loop_failed(e)
        kernel = self.kernel
        channel = getattr(kernel, "task_channel", None)
        while channel is not None and not channel.stopping and not kernel.shell.exit_now \
                and getattr(kernel, "_shutdown_message", None) is None:
            channel.capture.log(f"ipylb engine {channel.engine_id}: its event loop was stopped "
                                "by code not ipylb's (a task's loop.stop() scheduled for later, "
                                "or from a thread it left): starting it again")
            try:
                self.io_loop.start()
            except KeyboardInterrupt:
                pass
            except Exception as e:  # noqa: BLE001
                self._loop_failed(e)

    def _loop_failed(self, e: Exception) -> None:
        channel = getattr(self.kernel, "task_channel", None)
        if channel is None:
            raise e
        channel.leave_now(f"its event loop failed between tasks ({type(e).__name__}: "
                          f"{safe_str(e, 500)}): a task replaced a function the engine's loop "
                          "uses (asyncio, selectors, math, time ...)", idle=True)


def main() -> None:
    """Start an IPython kernel whose kernel class also serves ipylb tasks."""
    EngineApp.launch_instance(kernel_class=EngineKernel)


if __name__ == "__main__":
    main()
