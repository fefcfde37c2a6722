"""``ipylb bench``: measured figures, side by side with a reference run."""

from __future__ import annotations

import argparse

from ..cli import HelpFormatter
from ..core.pipeline import DEFAULT_HWM

# What each mode reads; any other option given with it would be ignored, so it is refused.
_MODES = {
    "core": set(),
    "kernels": {"rounds", "tasks"},
    "schemes": {"rounds", "engines", "no_reference", "chart", "hwm"},
    "farm": {"rounds", "engines", "workloads", "no_reference", "standalone", "hwm"},
}


def parser() -> argparse.ArgumentParser:
    """``ipylb bench``'s options (each help line ends with its default)."""
    p = argparse.ArgumentParser(prog="ipylb bench", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--engines", type=int, default=2, help="engines of each cluster measured")
    p.add_argument("--workloads", default="latency,submit,map,payload,dag",
                   help="comma-separated: latency, submit, map, payload, dag")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the references (ipyparallel and ProcessPoolExecutor)")
    p.add_argument("--standalone", action="store_true",
                   help="compare the embedded cluster with a standalone one (instead of ipyparallel)")
    p.add_argument("--core", action="store_true", help="the scheduler core alone, no I/O")
    p.add_argument("--schemes", action="store_true",
                   help="every scheme on a heterogeneous workload and a no-op run, with a chart")
    p.add_argument("--kernels", type=int, metavar="N",
                   help="N real engine kernels: start-up seconds, a --tasks map, controller RSS")
    p.add_argument("--tasks", type=int, default=8000, help="tasks of the --kernels map")
    p.add_argument("--chart", default="schemes.png", help="where --schemes writes its PNG chart")
    p.add_argument("--hwm", default=str(DEFAULT_HWM),  # the clusters' own default
                   help="comma-separated hwm of the ipylb clusters (ints, auto), each measured in "
                        "the same alternating rounds; with --schemes, leastload's")
    return p


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks named on the command line (default: the core farm figures)."""
    p = parser()
    args = p.parse_args(argv)
    modes = [m for m, on in (("core", args.core), ("schemes", args.schemes),
                             ("kernels", args.kernels is not None)) if on]
    if len(modes) > 1:
        p.error(f"{', '.join('--' + m for m in modes)} are different runs: pick one")
    mode = modes[0] if modes else "farm"
    from ..core.pipeline import parse_hwm

    try:
        hwms = [parse_hwm(h) for h in args.hwm.split(",")]
    except ValueError as e:
        p.error(f"--hwm: {e}")
    ignored = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
               if name not in _MODES[mode] | {"core", "schemes", "kernels"} and value != p.get_default(name)]
    if ignored:
        p.error(f"{', '.join(ignored)} has no effect with "
                f"{'--' + mode if mode != 'farm' else 'the farm run (no --core/--schemes/--kernels)'}")
    if args.core:
        from .core_micro import main as core_main

        core_main([])
        return
    if args.kernels is not None:
        if args.kernels < 1 or args.tasks < 1:
            p.error("--kernels and --tasks must be at least 1")
        from .kernels import main as kernels_main

        kernels_main(args.rounds, args.kernels, args.tasks)
        return
    if args.schemes:
        from .schemes import main as schemes_main

        schemes_main(args.rounds, args.engines, not args.no_reference, args.chart, hwms)
        return
    from .farm import Ipylb, IpylbStandalone, Ipyparallel, ProcessPool, compare

    if args.standalone and args.no_reference:
        p.error("--standalone is the reference of that run; --no-reference would drop it")
    farms = [Ipylb(hwm=h) for h in hwms]
    if len(hwms) > 1:
        for f, h in zip(farms, hwms):
            f.name = f"ipylb hwm={h}"
    if args.standalone:
        farms.append(IpylbStandalone())
    elif not args.no_reference:
        try:
            import ipyparallel  # noqa: F401
        except ImportError:
            p.error("the reference run needs ipyparallel: pip install 'ipylb[bench]' (or --no-reference)")
        farms.append(Ipyparallel())
        farms.append(ProcessPool())
    compare(farms, args.rounds, args.engines, [w for w in args.workloads.split(",") if w])
