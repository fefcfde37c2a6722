"""The engine: a stock IPython kernel with a task channel of its own.

The kernel keeps every standard Jupyter channel (so ``jupyter console --existing``
attaches to it); tasks arrive on a dedicated zmq socket read by the kernel's
main-thread event loop (see ``../shared/notes/hot-path.md``: ~5x the shell channel's
throughput, and a kernel interrupt can stop the running task).
"""
