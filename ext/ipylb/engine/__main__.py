"""Entry point of the ``ipylb-engine`` kernelspec: ``python -m ipylb.engine -f CONNECTION_FILE``."""

from ipykernel.kernelapp import IPKernelApp

from .kernel import EngineKernel


class EngineApp(IPKernelApp):
    """IPKernelApp without its parent poller: EngineKernel watches the process that
    launched it itself, and removes its kernel connection file and ipc sockets before it
    exits (ipykernel's poller calls os._exit and leaves them behind)."""

    def init_poller(self) -> None:
        self.poller = None


def main() -> None:
    """Start an IPython kernel whose kernel class also serves ipylb tasks."""
    EngineApp.launch_instance(kernel_class=EngineKernel)


if __name__ == "__main__":
    main()
