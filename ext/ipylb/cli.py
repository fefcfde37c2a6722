"""The ``ipylb`` command: ``ipylb bench``, ``ipylb cluster ...``, ``ipylb engine ...``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch to a subcommand."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ipylb {bench,cluster,engine} ...\n\n"
              "  demo      run the task interface's examples on local engines\n"
              "  bench     measure ipylb beside ipyparallel (ipylb bench --help)\n")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        demo_main(rest)
    elif cmd == "bench":
        from .bench import main as bench_main

        bench_main(rest)
    else:
        sys.exit(f"ipylb: unknown command {cmd!r}; try `ipylb --help`")
