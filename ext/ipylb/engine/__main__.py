"""Entry point of the ``ipylb-engine`` kernelspec: ``python -m ipylb.engine -f CONNECTION_FILE``."""

from ipykernel.kernelapp import IPKernelApp

from .kernel import EngineKernel


def main() -> None:
    """Start an IPython kernel whose kernel class also serves ipylb tasks."""
    IPKernelApp.launch_instance(kernel_class=EngineKernel)


if __name__ == "__main__":
    main()
